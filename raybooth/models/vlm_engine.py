"""The generation engine: one batched decode loop for the batch jobs and the chat route, for vision-language
models and text-only LLMs alike (the families and how their inputs batch: `vlm_family.py`).

    engine = VLMEngine.from_pretrained("tiny-vlm")
    req = GenerationRequest(
        messages=[{"role": "user", "content": [{"type": "image", "image": pil_image},
                                               {"type": "text", "text": "Describe the image."}]}],
        params=SamplingParams(max_tokens=32, temperature=0.0),
    )
    engine.check(req)                              # optional, ahead of batching: its 400 (ValueError) now
    [result] = engine.generate([req])              # result.text, .finish_reason, .prompt_tokens, ...
    for step in engine.generate_stream([req]):     # one list per decode step, one slot per request
        ...

How a batch runs: every row is prepared alone (chat template, tokens, and every tensor its processor
returns), then the rows are left-padded to one length, their processor outputs batched by their family's
rules, and prefilled in one forward pass that fills the KV cache; each decode step feeds one new token per
row and extends the cache. Left padding keeps every row's last prompt token in the same column, so one
step serves all rows; the attention mask hides the pads and position ids count only real tokens, so a
padded row computes what it would compute alone. Qwen-VL's 3-D M-RoPE positions come from the model's
own `get_rope_index` on the padded batch, and each row's offset (`rope_deltas`) carries them through the
decode steps. Mllama's cross-attention masks are built per row (`vlm_cross_attention.py`); an
encoder-decoder (Florence-2) encodes its prompts once and steps its decoder (`vlm_seq2seq.py`). Sampling,
stop strings and JSON grammars are per row (`vlm_rows.py`, `decoding.py`, `constrained.py`), each row
with its own seeded generator, so a row's output never depends on its batch. Finished rows are dropped
from the batch (and the KV cache), so one long answer does not make the others pay for its steps.

The modules: `vlm_requests.py` (requests, results, errors, preparing one row: no model needed),
`vlm_family.py` (families and their batching rules), `vlm_rows.py` (one row's decode state), and this
one: the loop, with the batch's model-side state in `BatchState`. Its pieces (`start_row`, `prefill`,
`decode_step`, `sample_rows`) also serve `vlm_scheduler.py`, where rows join a running batch mid-flight.
With `speculative=` a draft model proposes tokens that one pass checks (`speculative.py`, `vlm_steps.py`).

Errors that belong to one row come back as that row's `error` and the other rows run on, token for token
as they would without it: before decoding (bad params, a prompt over the context window, a schema refused
or that cannot compile) and during it (anything raised while that row's grammar is advanced or its token
sampled). Such a row ends with `finish_reason="error"`, `error` (a message for the user) and `error_type`:

- `"invalid_request_error"` (INVALID_REQUEST): the request is bad; an HTTP caller answers 400. These are
  the ValueErrors: RequestError, GrammarError, decoding.NoTokenError, SamplingParams' checks.
- `"server_error"` (SERVER_ERROR): anything else (a bug, NaN logits); 500. The message is generic and the
  traceback is logged here.

Only a failure of the shared model call itself (prefill, a decode step's forward pass) raises out of
`generate_stream`: it is the server's fault and no row has an answer. Plain PyTorch + transformers: no Ray.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raybooth.models.constrained import JSONGrammars
from raybooth.models.decoding import (
    SamplingParams,
    TextTracker,
    adjust_logits_batch,
    pick_tokens,
    row_generator,
)
from raybooth.models.speculative import SpeculativeDecoder, SpeculativeOptions, SpeculativeSteps
from raybooth.models.vlm_family import (
    Family,
    collate_inputs,
    detect_family,
    mrope_positions,
    mrope_step_positions,
)

# Requests, results and preparing one row live in vlm_requests; re-exported here for callers.
from raybooth.models.vlm_requests import (
    INVALID_REQUEST,
    SERVER_ERROR,
    GenerationRequest,
    GenerationResult,
    PreparedRequest,
    RequestError,
    StreamDelta,
    TokenLogprob,
    check_context,
    error_delta,
    prepare_request,
    split_images,
    takes_images,
)
from raybooth.models.vlm_rows import DecodeRow
from raybooth.models.vlm_seq2seq import new_seq2seq_cache, seq2seq_prefill, seq2seq_step
from raybooth.models.vlm_steps import PlainSteps

__all__ = [
    "INVALID_REQUEST",
    "SERVER_ERROR",
    "GenerationRequest",
    "GenerationResult",
    "PreparedRequest",
    "RequestError",
    "StreamDelta",
    "TokenLogprob",
    "VLMEngine",
    "check_context",
    "error_delta",
    "prepare_request",
    "split_images",
    "takes_images",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


@dataclass
class BatchState:
    """What the decode steps carry from one forward pass to the next, one entry per running row."""

    cache: Any  # transformers DynamicCache
    mask: torch.Tensor  # (B, T) attention mask, 1 = real token
    positions: torch.Tensor  # (B, 1) each row's last 1-D position (real tokens before it)
    rope_deltas: torch.Tensor | None  # (B, 1) M-RoPE offset per row (Qwen-VL), else None
    decode_inputs: dict[str, Any]  # processor outputs the model needs at every step (batch-first)

    def select(self, index: torch.Tensor) -> None:
        """Keep only the rows at `index` (finished rows leave the batch and the KV cache)."""
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        if self.rope_deltas is not None:
            self.rope_deltas = self.rope_deltas[index]
        self.decode_inputs = {k: v[index] for k, v in self.decode_inputs.items()}


class VLMEngine:
    """Batched generation for a model of one of `vlm_family.FAMILIES` (a vision-language model with its
    processor, or a text-only LLM with its tokenizer); see the module docstring."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        device: str | torch.device | None = None,
        family: Family | None = None,
        speculative: tuple[VLMEngine, int] | None = None,
    ):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)  # a text-only LLM's processor is one
        self.family = family or detect_family(model.config)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        text_config = model.config.get_text_config()
        self.vocab_size = int(text_config.vocab_size)
        self.max_context = int(getattr(text_config, "max_position_embeddings", 0)) or None
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id or 0
        self.eos_token_ids = self._eos_ids()
        self._grammars: JSONGrammars | None = None  # built on the first constrained request
        self._grammars_lock = threading.Lock()
        # False: every row samples alone (`DecodeRow.step`), the reference the batched path must equal.
        self.batched_sampling = True
        # `speculative`: (a draft engine, k), checked against this model (speculative.py); None: one token
        # per forward pass. from_pretrained loads the draft by name.
        self.speculative: SpeculativeDecoder | None = None
        if speculative is not None:
            self.speculative = SpeculativeDecoder(self, *speculative)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        device: str | None = None,
        dtype: torch.dtype | str | None = None,
        *,
        models_dir: Path | None = None,
        quantization: str | None = None,
        speculative: SpeculativeOptions | None = None,
    ) -> VLMEngine:
        """A preset name (`tiny-vlm`, built under `models_dir`), a local path or a hub id; device "auto"
        picks CUDA when present; `quantization="int8"` stores the linear weights in int8 (quantization.py).
        `speculative`: a draft model (loaded the same way, on the same device and dtype, not quantised) and
        k, checked against this model (speculative.py)."""
        from raybooth.models.loaders import load_vlm

        model, processor = load_vlm(
            name_or_path, device=device, dtype=dtype, models_dir=models_dir, quantization=quantization
        )
        engine = cls(model, processor)
        if speculative is not None:
            engine.speculative = SpeculativeDecoder.load(engine, speculative, dtype, models_dir)
        return engine

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return ids

    def _vocab_bytes(self) -> Sequence[bytes]:
        return self.grammars.info.decoded_vocab  # each token id's exact bytes (built on first use)

    @property
    def grammars(self) -> JSONGrammars:
        with self._grammars_lock:  # check() may build it from a caller's thread
            if self._grammars is None:
                self._grammars = JSONGrammars(self.tokenizer, self.vocab_size)
        return self._grammars

    # -- public API ---------------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        return prepare_request(self.processor, request)

    def check(self, request: GenerationRequest | PreparedRequest) -> None:
        """Run every check a row meets before it joins a batch, and compile (and cache) its grammar.

        Raises the row's ValueError (its 400). Thread-safe, and meant to be called before a request is
        queued for a batch (e.g. in a worker thread), so a slow schema compile or a refusal happens off the
        shared decode loop; the batch then finds the grammar compiled."""
        params = request.params
        params.validate()
        if isinstance(request, PreparedRequest):
            check_context(request, self.max_context)
        self._check_token_ids(params)
        if params.constrained:
            self.grammars.matcher(params)

    def generate(self, requests: Sequence[GenerationRequest | PreparedRequest]) -> list[GenerationResult]:
        """Run the requests as one batch; one result per request, in order."""
        texts = [""] * len(requests)
        tokens: list[list[int]] = [[] for _ in requests]
        logprobs: list[list[TokenLogprob]] = [[] for _ in requests]
        results: list[GenerationResult | None] = [None] * len(requests)
        for step in self.generate_stream(requests):
            for i, delta in enumerate(step):
                if delta is None:
                    continue
                texts[i] += delta.text
                tokens[i] += delta.token_ids
                logprobs[i] += delta.logprobs
                if delta.done:
                    request = requests[i]
                    results[i] = GenerationResult(
                        text=texts[i],
                        finish_reason=delta.finish_reason,
                        prompt_tokens=delta.prompt_tokens,
                        completion_tokens=delta.completion_tokens,
                        token_ids=tokens[i],
                        error=delta.error,
                        logprobs=logprobs[i] if request.params.logprobs is not None else None,
                        error_type=delta.error_type,
                    )
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:  # generate_stream promises a last delta per row; anything else is a bug
            raise RuntimeError(f"rows {missing} never finished")
        return [r for r in results if r is not None]

    def generate_stream(
        self,
        requests: Sequence[GenerationRequest | PreparedRequest],
        cancelled: Container[int] = frozenset(),
    ) -> Iterator[list[StreamDelta | None]]:
        """Yield one list per step, `len(requests)` slots: a `StreamDelta` for each row still running this
        step (its `text` may be "" while a stop string or a UTF-8 character is pending), None for rows
        already done. A row's last delta has `done` set. Rows that fail before decoding report their
        `error` in the first list; a row that fails while decoding reports it in that step and leaves the
        batch, the others go on unchanged.

        `cancelled` holds indices (into `requests`) of rows nobody wants any more (the client left, the
        safety policy ended the stream); the caller may add to it between steps. At the next step each
        such row ends with `finish_reason="cancelled"`, samples nothing and leaves the batch and the KV
        cache, so the rest of the batch stops paying for it."""
        rows, first = self._start_rows(requests)
        if rows:
            steps = self.start_steps([row.prepared for row in rows])
        while rows:
            step: list[StreamDelta | None] = first or [None] * len(requests)
            first = None
            live = [b for b, row in enumerate(rows) if row.index not in cancelled]
            for row in rows:
                if row.index in cancelled:
                    step[row.index] = row.finish("cancelled")
            deltas = steps.sample(live, [rows[b] for b in live])
            keep: list[int] = []
            next_tokens: list[int] = []
            for b, delta in zip(live, deltas, strict=True):
                step[rows[b].index] = delta
                if not delta.done:
                    keep.append(b)
                    next_tokens.append(delta.token_ids[-1])
            yield step
            # Rows cancelled while the caller held this step leave before the next forward pass.
            gone = [b for b in keep if rows[b].index in cancelled]
            if gone:
                first = [None] * len(requests)  # reported with the next step
                for b in gone:
                    first[rows[b].index] = rows[b].finish("cancelled")
                next_tokens = [t for b, t in zip(keep, next_tokens, strict=True) if b not in gone]
                keep = [b for b in keep if b not in gone]
            if not keep:
                if first is not None:
                    yield first
                return
            if len(keep) < len(rows):
                steps.select(keep)  # finished rows leave every per-row tensor and the KV cache
                rows = [rows[b] for b in keep]
            steps.advance(rows, next_tokens)
        if first is not None:
            yield first  # every row failed before decoding

    # -- decode loop pieces -------------------------------------------------------------------------

    def start_steps(self, prepared: Sequence[PreparedRequest]) -> PlainSteps | SpeculativeSteps:
        """Prefill the batch: the step state plain or speculative decoding continues from (`vlm_steps.py`)."""
        if self.speculative is not None:
            return SpeculativeSteps.start(self.speculative, prepared)
        return PlainSteps.start(self, prepared)

    def _start_rows(
        self, requests: Sequence[GenerationRequest | PreparedRequest]
    ) -> tuple[list[DecodeRow], list[StreamDelta | None] | None]:
        """Prepare every request and build its row state; failures become error deltas."""
        rows: list[DecodeRow] = []
        errors: list[StreamDelta | None] = [None] * len(requests)
        failed = False
        for i, request in enumerate(requests):
            try:
                rows.append(self.start_row(i, request))
            except Exception as e:  # this row's failure only (GrammarError, RequestError: its 400)
                errors[i] = error_delta(e)
                failed = True
        return rows, errors if failed else None

    def start_row(self, index: int, request: GenerationRequest | PreparedRequest) -> DecodeRow:
        """One request's decode state (`index`: its slot in the caller's list); raises the row's error."""
        prepared = request if isinstance(request, PreparedRequest) else self.prepare(request)
        # Again here: params may have been changed or rebuilt since they were constructed.
        prepared.params.validate()
        check_context(prepared, self.max_context)
        self._check_token_ids(prepared.params)
        matcher = self.grammars.matcher(prepared.params) if prepared.params.constrained else None
        text = TextTracker(self.tokenizer, prepared.params.stop)
        return DecodeRow(index, prepared, row_generator(prepared.params), text, matcher)

    def sample_rows(self, logits: torch.Tensor, rows: Sequence[DecodeRow]) -> list[StreamDelta]:
        """Each row's next token from its logits `(B, V)` (masked by its grammar): one delta per row. A row
        that raises gets its error delta (it must leave the batch); the others are untouched by it.

        Batched (`batched_sampling`, the default): logit_bias, the argmax of greedy rows and the
        finiteness checks run once on the batch (`decoding.adjust_logits_batch`, `pick_tokens`) instead
        of a clone, a dozen small tensor ops and a sync per row and step, the overhead that dominated a
        small model's decode step. Each row's tokens are the ones the per-row path picks (same float32
        ops per element, the same first-maximum argmax, each sampling row its own generator):
        `tests/models/test_vlm_scheduler.py` checks the two paths against each other on a mixed batch."""
        grammar_failed = self._mask_with_grammars(logits, rows)
        if self.batched_sampling:
            try:
                params = [row.params for row in rows]
                adjusted = adjust_logits_batch(logits, params, [row.counts for row in rows])
                picks = pick_tokens(adjusted, params, [row.generator for row in rows])
            except Exception:  # not a row's error (those are in `picks`): the per-row path contains it
                log.warning("batched sampling failed; sampling row by row", exc_info=True)
            else:
                return self._emit_rows(adjusted, rows, picks, grammar_failed)
        return self._sample_rows_one_by_one(logits, rows, grammar_failed)

    def _emit_rows(
        self,
        adjusted: torch.Tensor,
        rows: Sequence[DecodeRow],
        picks: list[int | Exception],
        grammar_failed: dict[int, Exception],
    ) -> list[StreamDelta]:
        """Feed each row its picked token (its logprobs from its adjusted logits `(V,)`); errors stay per row."""
        deltas: list[StreamDelta] = []
        for b, row in enumerate(rows):
            try:
                pick = grammar_failed.get(b, picks[b])
                if isinstance(pick, Exception):
                    raise pick
                deltas.append(row.emit(pick, adjusted[b], self.eos_token_ids, self._vocab_bytes))
            except Exception as e:  # this row's failure only: it leaves, the batch goes on
                deltas.append(row.fail(e))
        return deltas

    def _sample_rows_one_by_one(
        self, logits: torch.Tensor, rows: Sequence[DecodeRow], grammar_failed: dict[int, Exception]
    ) -> list[StreamDelta]:
        """The reference path: each row adjusts, checks and samples its own `(V,)` logits (`DecodeRow.step`)."""
        deltas: list[StreamDelta] = []
        for b, row in enumerate(rows):
            try:
                if b in grammar_failed:
                    raise grammar_failed[b]
                deltas.append(row.step(logits[b], self.eos_token_ids, self._vocab_bytes))
            except Exception as e:  # this row's failure only: it leaves, the batch goes on
                deltas.append(row.fail(e))
        return deltas

    def _check_token_ids(self, params: SamplingParams) -> None:
        outside = sorted(t for t in params.logit_bias if not 0 <= t < self.vocab_size)
        if outside:
            raise RequestError(
                f"logit_bias names token ids {outside[:5]} outside this model's vocabulary "
                f"(0..{self.vocab_size - 1}); use ids of its tokenizer"
            )

    def forward(self, **inputs: Any) -> torch.Tensor:
        """One model call; the last position's logits as float32 on the CPU, `(B, V)`."""
        with torch.inference_mode():
            if self.family.forward is not None:  # a family that calls its model its own way (Mllama)
                return self.family.forward(self.model, {**inputs, "use_cache": True}).float().cpu()
            out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float().cpu()

    def prefill(self, prepared: Sequence[PreparedRequest]) -> tuple[torch.Tensor, BatchState]:
        """Left-pad the prompts into one batch, batch their processor outputs and run it: `(B, V)` logits
        and the state the decode steps continue from."""
        from transformers import DynamicCache

        lengths = [p.prompt_tokens for p in prepared]
        longest = max(lengths)
        ids = torch.full((len(prepared), longest), self.pad_token_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(prepared), longest), dtype=torch.long)  # (B, T): 1 = real token
        for b, p in enumerate(prepared):
            ids[b, longest - p.prompt_tokens :] = torch.tensor(p.input_ids, dtype=torch.long)
            mask[b, longest - p.prompt_tokens :] = 1
        extra, decode_inputs = collate_inputs(self.family, [p.inputs for p in prepared], lengths, longest)
        # Position of a token = number of real tokens before it; pads get 0 (masked out anyway).
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
        rope_deltas = None
        position_ids = positions
        if self.family.positions == "mrope":
            position_ids, rope_deltas = mrope_positions(self.model, ids, mask, extra)  # (4, B, T), (B, 1)
            rope_deltas = rope_deltas.to(self.device)
        extra, decode_inputs = self._to_device(extra), self._to_device(decode_inputs)
        if self.family.encoder_decoder:  # the encoder once, then the decoder's first step (vlm_seq2seq)
            cache = new_seq2seq_cache(self.model)
            with torch.inference_mode():
                logits, decode_inputs = seq2seq_prefill(
                    self.model, ids.to(self.device), mask.to(self.device), extra, cache
                )
            state = BatchState(
                cache, mask.to(self.device), positions[:, -1:].to(self.device), None, decode_inputs
            )
            return logits.float().cpu(), state
        if self.family.prepare is not None:  # what batching alone cannot express (Mllama's masks)
            extra, decode_inputs = self.family.prepare(self.model, extra, mask.to(self.device))
        state = BatchState(
            cache=DynamicCache(config=self.model.config.get_text_config()),
            mask=mask.to(self.device),
            positions=positions[:, -1:].to(self.device),
            rope_deltas=rope_deltas,
            decode_inputs=decode_inputs,
        )
        logits = self.forward(
            input_ids=ids.to(self.device),
            attention_mask=state.mask,
            position_ids=position_ids.to(self.device),
            past_key_values=state.cache,
            **extra,
        )
        return logits, state

    _prefill = prefill  # the name the family oracle tests call

    def decode_step(self, tokens: torch.Tensor, state: BatchState) -> torch.Tensor:
        """Feed each running row its next token `(B, 1)`; the `(B, V)` logits after it."""
        state.mask = torch.cat([state.mask, state.mask.new_ones(len(tokens), 1)], dim=1)  # (B, T + 1)
        state.positions = state.positions + 1  # (B, 1): each row's next position counts only real tokens
        position_ids = state.positions
        if state.rope_deltas is not None:
            position_ids = mrope_step_positions(state.positions, state.rope_deltas)  # (4, B, 1)
        if self.family.encoder_decoder:
            with torch.inference_mode():
                return seq2seq_step(self.model, tokens, state.cache, state.decode_inputs).float().cpu()
        return self.forward(
            input_ids=tokens,
            attention_mask=state.mask,
            position_ids=position_ids,
            past_key_values=state.cache,
            **state.decode_inputs,
        )

    def _to_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Tensors onto the model's device; floating ones (pixel values) in the model's dtype."""

        def move(value: Any) -> Any:
            if isinstance(value, list):
                return [move(v) for v in value]
            if not isinstance(value, torch.Tensor):
                return value
            if value.is_floating_point():
                return value.to(self.device, dtype=self.model.dtype)
            return value.to(self.device)

        return {k: move(v) for k, v in inputs.items()}

    def _mask_with_grammars(self, logits: torch.Tensor, rows: Sequence[DecodeRow]) -> dict[int, Exception]:
        """Mask every constrained row's logits in place; the rows whose matcher raised, with the error."""
        matchers = [row.matcher for row in rows]
        if any(m is not None for m in matchers):
            return self.grammars.mask_logits(logits, matchers)
        return {}
