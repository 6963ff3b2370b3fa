"""Speculative decoding for the generation engine: a small draft model proposes, the served model checks.

    engine = VLMEngine.from_pretrained("tiny-llm", models_dir=default_models_dir(),
                                       speculative=SpeculativeOptions("tiny-llm", num_tokens=4))
    [result] = engine.generate([request])          # same API, same outputs' distribution, fewer served passes
    engine.speculative.counters.rate               # accepted / proposed drafted tokens

Each step, for every running row: the draft (any engine-loadable causal LM sharing the served model's
tokenizer: a preset, a folder or a hub id) proposes `num_tokens` = k tokens, one draft forward pass per
token for the whole batch; the served model scores the row's pending token and the k proposals in ONE
forward pass over k + 1 positions; the rejection rule (`speculative_sampling.py`) keeps each row's own
number of proposals n (0..k) and draws one more token, so a row advances n + 1 tokens for one pass of
the served model. Both models' logits are masked by the row's JSON grammar in the same state (the
draft's proposals are fed to the row's xgrammar matcher and rolled back before the check), and go
through the same logit_bias, penalties, temperature and top_p as plain sampling, each row with its own
seeded generator; stop strings, max_tokens and logprobs apply token by token, so a row may end in the
middle of its proposals. A step's delta may carry several tokens (`StreamDelta.token_ids`).

The KV caches stay one aligned batch: every row feeds k + 1 tokens to the served model in the same
columns. Afterwards a row's rejected slots are hidden by setting their columns to 0 in its attention
mask, and its explicit 1-D position only counts the tokens it kept, so the next tokens get the positions
they would get in plain decoding and never attend to a rejected token; columns that no row kept are cut
off the end of the cache at once. The draft's cache works the same way with one twist: its last
proposal is not in its cache (it was never fed), so a row that kept all k feeds it in front of its
pending token next step (a 2-token first draft pass; the other rows put a masked hole there). The cost:
the holes of rows that kept fewer tokens than the batch's best stay in the cache, so the cache (memory
and attention reads) grows by max-kept + 1 columns per step for every row instead of each row's own
count: at most k wasted columns per row per step. This keeps every family's own attention through a
plain `DynamicCache` (no per-row cropping, which a rectangular cache cannot do without a copy); a paged
cache would reclaim the holes. What a step costs (`benchmarks/speculative.py`, CPU, one thread, a 23M
served Llama, a 2.35M draft, 8 rows): a draft pass 0.16 served passes, the (k + 1) = 5-token verify pass
1.9 one-token passes (a CPU is compute-bound; a GPU at small batch is memory-bound and takes it for ~1),
so on this CPU the break-even acceptance rate is ~0.65; with random weights the draft agrees with
nothing (0.42x plain), with draft == served every proposal is kept. Greedy rows give exactly plain decoding's tokens up to float rounding
of the (k + 1)-token forward pass against the 1-token one (a tie between two logits within ~1e-6).

Refused at load, with one line: families whose positions are not plain 1-D or whose decode state is not
just a KV cache (Qwen-VL's M-RoPE, the encoder-decoder Florence-2, Mllama's cross-attention, families
with per-step inputs, caches with sliding-window layers such as Gemma 2/3 and Mistral's), and a draft
whose tokenizer (vocabulary and ids) differs from the served model's. A text-only draft of a
vision-language model reads the prompt's image placeholder tokens as text; only the served model sees
the pixels, which the rule makes safe (a worse draft only lowers the acceptance rate). A row that fails
while it is judged (its 400 or 500) ends with its error; tokens it took earlier in that step are not sent.

Both decode loops run it through `SpeculativeSteps`: `VLMEngine.generate_stream` (the batch jobs, the
chat route's static batching) and the continuous-batching scheduler (the chat route's default), where a
newcomer's draft cache is merged like its served cache. Plain PyTorch + transformers: no Ray.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from raybooth.errors import ModelError
from raybooth.models.decoding import adjust_logits, sampling_distributions
from raybooth.models.speculative_sampling import AcceptanceCounters, verify_row
from raybooth.models.vlm_requests import PreparedRequest, StreamDelta
from raybooth.models.vlm_rows import DecodeRow

if TYPE_CHECKING:
    from raybooth.models.vlm_engine import BatchState, VLMEngine

MAX_DRAFT_TOKENS = 16  # beyond this the chance that all k survive is ~0 for any real draft: pure waste


@dataclass(frozen=True)
class SpeculativeOptions:
    """What `speculative: {draft_model, num_tokens}` in a job or serve YAML says."""

    draft_model: str  # a preset name, a local folder or a hub id, loaded like the served model
    num_tokens: int = 4  # k: tokens the draft proposes per row per step

    def __post_init__(self) -> None:
        if not isinstance(self.draft_model, str) or not self.draft_model:
            raise ValueError("speculative.draft_model must name a model (a preset, a folder or a hub id)")
        k = self.num_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFT_TOKENS:
            raise ValueError(
                f"speculative.num_tokens must be an integer in [1, {MAX_DRAFT_TOKENS}], got {k!r}"
            )


def model_name(engine: VLMEngine) -> str:
    return str(getattr(engine.model, "name_or_path", "") or type(engine.model).__name__)


def check_speculative_model(engine: VLMEngine, role: str) -> None:
    """ModelError (one line) when `engine`'s family cannot take part in speculative decoding."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    family = engine.family
    why = None
    if family.positions != "1d":
        why = "its positions are 3-D (M-RoPE)"
    elif family.encoder_decoder:
        why = "it is an encoder-decoder"
    elif family.prepare is not None or family.forward is not None:
        why = "its cross-attention inputs are built per batch"
    elif any(rule.decode for rule in family.rules.values()):
        why = "it needs inputs at every decode step"
    else:
        layers = DynamicCache(config=engine.model.config.get_text_config()).layers
        if not all(type(layer) is DynamicLayer for layer in layers):
            why = "its cache has sliding-window layers"
    if why is not None:
        raise ModelError(
            f"speculative decoding cannot use {role} {model_name(engine)} ({family.name}): {why}; use a model "
            "with plain 1-D positions (LLaVA-style or a text-only LLM) or remove `speculative`"
        )


def check_same_tokenizer(target: VLMEngine, draft: VLMEngine) -> None:
    """ModelError (one line) unless both tokenizers map the same strings to the same ids."""
    mine, theirs = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if mine != theirs:
        differ = sorted(set(mine.items()) ^ set(theirs.items()))[:1]
        raise ModelError(
            f"draft model {model_name(draft)} ({len(theirs)} tokens) does not share the tokenizer of the "
            f"served model {model_name(target)} ({len(mine)} tokens; e.g. {differ[0][0]!r} differs); "
            "use a draft with the same tokenizer (vocabulary and ids), usually a smaller model of its family"
        )


def forward_positions(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any, keep: int
) -> torch.Tensor:
    """Feed `ids` `(B, n)` at explicit `positions` `(B, n)`; the last `keep` positions' logits `(B, keep, V)`
    as float32 on the CPU. `mask` `(B, T + n)` covers the cache and the new tokens."""
    with torch.inference_mode():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
        )
    return out.logits[:, -keep:].float().cpu()


def trim_trailing(state: BatchState) -> None:
    """Cut the cache's last columns that no row attends to (slots every row rejected)."""
    attended = state.mask.any(dim=0).nonzero()
    end = int(attended[-1]) + 1 if len(attended) else 0
    if end < state.mask.shape[1]:
        for layer in state.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, :end], layer.values[:, :, :end]
        state.mask = state.mask[:, :end]


class SpeculativeDecoder:
    """A draft engine and k, checked against the served engine; `counters` add up over its life."""

    def __init__(self, target: VLMEngine, draft: VLMEngine, num_tokens: int):
        SpeculativeOptions("draft", num_tokens)  # the same bound as the YAML's
        check_speculative_model(target, "the served model")
        check_speculative_model(draft, "the draft model")
        check_same_tokenizer(target, draft)
        self.target, self.draft, self.num_tokens = target, draft, num_tokens
        self.counters = AcceptanceCounters()

    @classmethod
    def load(
        cls, target: VLMEngine, options: SpeculativeOptions, dtype: Any = None, models_dir: Any = None
    ) -> SpeculativeDecoder:
        """Load `options.draft_model` through the engine's own loader, on the served model's device."""
        from raybooth.models.loaders import load_vlm
        from raybooth.models.vlm_engine import VLMEngine

        model, processor = load_vlm(
            options.draft_model, device=target.device, dtype=dtype, models_dir=models_dir
        )
        return cls(target, VLMEngine(model, processor), options.num_tokens)

    def prefill(self, prepared: Sequence[PreparedRequest]) -> BatchState:
        """The draft's cache of the prompts (left-padded exactly as the served model's batch)."""
        if not self.draft.family.takes_images:  # a text-only draft reads image placeholders as text
            prepared = [PreparedRequest(p.input_ids, p.params) for p in prepared]
        return self.draft.prefill(prepared)[1]

    def _draft_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits `(B, V_draft)` at the served model's width (padded embedding tables differ)."""
        width = self.target.vocab_size
        if logits.shape[-1] >= width:
            return logits[:, :width]
        return torch.nn.functional.pad(logits, (0, width - logits.shape[-1]), value=float("-inf"))

    def propose(
        self, rows: Sequence[DecodeRow], pending: Sequence[int], state: BatchState, lag: Sequence[int | None]
    ) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
        """k draft tokens per row and the distribution `q` `(V,)` each was drawn from. `lag[b]`: the
        row's last proposal of the previous step when it kept them all (not yet in the draft's cache)."""
        k, device, pad = self.num_tokens, self.target.device, self.target.pad_token_id
        has_lag = torch.tensor([[int(t is not None)] for t in lag], device=device)  # (B, 1)
        ids = torch.tensor([[pad if t is None else t, c] for t, c in zip(lag, pending, strict=True)])
        positions = torch.cat([state.positions + 1, state.positions + 1 + has_lag], dim=1)  # (B, 2)
        state.mask = torch.cat([state.mask, has_lag, torch.ones_like(has_lag)], dim=1)  # hole: 0
        state.positions = state.positions + 1 + has_lag
        logits = forward_positions(
            self.draft.model, ids.to(device), state.mask, positions, state.cache, keep=1
        )[:, -1]
        counts = [Counter(row.counts) for row in rows]
        stopped = [False] * len(rows)  # nothing the row could keep follows (EOS, grammar done, no token)
        fed = [0] * len(rows)  # tokens pushed into the row's matcher, rolled back below
        drafts: list[list[int]] = [[] for _ in rows]
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        one_hot_pad = torch.nn.functional.one_hot(torch.tensor(pad), self.target.vocab_size).float()
        for j in range(k):
            logits = self._draft_logits(logits)
            failed = self.target.grammars.mask_logits(
                logits, [None if stopped[b] else row.matcher for b, row in enumerate(rows)]
            ) if any(row.matcher is not None for row in rows) else {}  # fmt: skip
            adjusted = torch.stack(
                [adjust_logits(logits[b], row.params, counts[b]) for b, row in enumerate(rows)]
            )
            q_all, problems = sampling_distributions(adjusted, [row.params for row in rows])  # (B, V)
            for b, row in enumerate(rows):
                token, q = pad, one_hot_pad  # a placeholder the served model judges like any proposal
                # The draft's own trouble (no token, NaN) leaves the placeholder: the row is judged anyway.
                if not stopped[b] and b not in failed and problems[b] is None:
                    q = q_all[b]
                    greedy = row.params.greedy
                    token = (
                        int(q.argmax()) if greedy else int(torch.multinomial(q, 1, generator=row.generator))
                    )
                stopped[b] = stopped[b] or b in failed or token in self.target.eos_token_ids
                if row.matcher is not None and not stopped[b]:
                    if row.matcher.accept_token(token):
                        fed[b] += 1
                    stopped[b] = stopped[b] or row.matcher.is_terminated()
                counts[b][token] += 1
                drafts[b].append(token)
                probs[b].append(q)
            if j < k - 1:
                state.mask = torch.cat([state.mask, state.mask.new_ones(len(rows), 1)], dim=1)
                state.positions = state.positions + 1
                step_ids = torch.tensor([[d[-1]] for d in drafts], device=device)  # (B, 1)
                logits = forward_positions(
                    self.draft.model, step_ids, state.mask, state.positions, state.cache, keep=1
                )[:, -1]
        self.counters.draft_passes += k
        for row, n in zip(rows, fed, strict=True):
            if n:
                row.matcher.rollback(n)
        return drafts, probs

    def step(
        self,
        rows: Sequence[DecodeRow],
        pending: Sequence[int],
        target: BatchState,
        draft: BatchState,
        lag: Sequence[int | None],
    ) -> tuple[list[StreamDelta], list[int | None]]:
        """One speculative step for every row: its delta (the tokens it took) and the next step's `lag`.
        `pending[b]`: the row's last token, in neither cache yet."""
        k, device = self.num_tokens, self.target.device
        trim_trailing(target)  # rows that left may have held the only kept columns at the end
        trim_trailing(draft)
        drafts, probs = self.propose(rows, pending, draft, lag)
        fed = torch.tensor([[c, *d] for c, d in zip(pending, drafts, strict=True)], device=device)  # (B, k+1)
        start = target.positions  # (B, 1): the last cached position of each row
        positions = start + 1 + torch.arange(k + 1, device=device)  # (B, k + 1)
        if self.target.max_context:  # slots past a row's budget are never kept; keep RoPE tables in range
            positions = positions.clamp(max=self.target.max_context - 1)
        target.mask = torch.cat([target.mask, target.mask.new_ones(len(rows), k + 1)], dim=1)
        logits = forward_positions(self.target.model, fed, target.mask, positions, target.cache, keep=k + 1)
        self.counters.verify_passes += 1
        deltas: list[StreamDelta] = []
        kept: list[int] = []
        grammars = self.target.grammars if any(row.matcher is not None for row in rows) else None
        for b, row in enumerate(rows):
            try:
                delta, n = verify_row(
                    row,
                    logits[b],
                    drafts[b],
                    probs[b],
                    lambda lg, m: _mask_one(grammars, lg, m),
                    self.target.eos_token_ids,
                    self.target._vocab_bytes,
                    self.counters,
                )
            except Exception as e:  # this row's failure only: it leaves, the batch goes on
                delta, n = row.fail(e), 0
            deltas.append(delta)
            kept.append(n)
        # Hide what each row rejected: served model, k + 1 new columns of which it keeps 1 + n; draft,
        # k - 1 proposal columns (after the hole/lag and the pending token) of which it keeps min(n, k - 1).
        total, draft_total = target.mask.shape[1], draft.mask.shape[1]
        for b, n in enumerate(kept):
            target.mask[b, total - k + n :] = 0
            draft.mask[b, draft_total - (k - 1) + min(n, k - 1) :] = 0
        n_kept = torch.tensor(kept, device=device).unsqueeze(1)  # (B, 1)
        target.positions = start + 1 + n_kept
        draft.positions = draft.positions - (k - 1) + n_kept.clamp(max=k - 1)
        next_lag = [d[-1] if n == k else None for d, n in zip(drafts, kept, strict=True)]
        return deltas, next_lag


def _mask_one(grammars: Any, logits: torch.Tensor, matcher: Any) -> None:
    failed = grammars.mask_logits(logits.unsqueeze(0), [matcher])
    if failed:
        raise failed[0]


@dataclass
class SpeculativeSteps:
    """The decode-step state `VLMEngine.generate_stream` and the scheduler drive when the engine is
    speculative (the plain counterpart: `vlm_steps.PlainSteps`). A row's first token comes from the
    prefill's logits, as in plain decoding; every later one from a `SpeculativeDecoder.step`."""

    decoder: SpeculativeDecoder
    logits: torch.Tensor  # (B, V): the rows whose `deltas` entry is None sample from these (prefill)
    state: BatchState
    draft_state: BatchState
    lag: list[int | None]
    deltas: list[StreamDelta | None]  # each row's next delta, computed by the last step

    @classmethod
    def start(cls, decoder: SpeculativeDecoder, prepared: Sequence[PreparedRequest]) -> SpeculativeSteps:
        logits, state = decoder.target.prefill(prepared)
        draft_state = decoder.prefill(prepared)
        return cls(decoder, logits, state, draft_state, [None] * len(prepared), [None] * len(prepared))

    @property
    def states(self) -> list[BatchState]:
        return [self.state, self.draft_state]

    def sample(self, live: list[int], rows: Sequence[DecodeRow]) -> list[StreamDelta]:
        fresh = [i for i, b in enumerate(live) if self.deltas[b] is None]
        sampled = iter(
            self.decoder.target.sample_rows(self.logits[[live[i] for i in fresh]], [rows[i] for i in fresh])
            if fresh
            else []
        )
        return [self.deltas[b] or next(sampled) for b in live]

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.decoder.target.device)
        self.state.select(index)
        self.draft_state.select(index)
        self.lag = [self.lag[b] for b in keep]
        self.deltas = [self.deltas[b] for b in keep]
        self.logits = self.logits[keep]

    def advance(self, rows: Sequence[DecodeRow], next_tokens: list[int]) -> None:
        deltas, self.lag = self.decoder.step(rows, next_tokens, self.state, self.draft_state, self.lag)
        self.deltas = list(deltas)

    def absorb(self, newcomers: SpeculativeSteps) -> None:
        """Take `newcomers`' per-row state (their caches were merged into `states` already)."""
        self.lag += newcomers.lag
        self.deltas += newcomers.deltas
        self.logits = torch.cat([self.logits, newcomers.logits])
