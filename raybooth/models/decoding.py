"""Per-row decoding pieces of the VLM engine: sampling params, token sampling, text deltas with stop strings.

    params = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, seed=1, stop=["\\n\\n"])
    gen = row_generator(params)                          # this row's own torch.Generator
    logits_row = adjust_logits(logits_row, params, counts)  # logit_bias, presence/frequency penalties
    token = sample_token(logits_row, params, gen)        # logits_row: (V,) float32 on the CPU
    chosen, top = token_logprobs(logits_row, token, params.logprobs)   # when the request asked for them
    text = TextTracker(tokenizer, params.stop); delta, stopped = text.push(token)

Everything here computes a row from that row's own state only, on the CPU. That is what makes a row's
output independent of the batch it was packed into: batched ops (`pick_tokens`) work along each row,
and every row draws from its own random stream.

Sampling never draws from a distribution without mass: a temperature below
`GREEDY_BELOW_TEMPERATURE` (1e-300 included) is greedy, a top_p that rounds to 0 keeps the likeliest
token, and a row with no token left to sample (every logit -inf) or a non-finite logit raises
`NoTokenError` / `SamplingError` for that row alone.
"""

from __future__ import annotations

import json
import math
import secrets
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

FinishReason = str  # "stop" | "length" | "cancelled" | "error" (see vlm_engine.StreamDelta)

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs
# Below this, logits / temperature overflows float32 for ordinary logits and the softmax is a one-hot
# anyway: such rows are greedy (vLLM uses the same cut-off).
GREEDY_BELOW_TEMPERATURE = 1e-5


class NoTokenError(ValueError):
    """Every token of a row is forbidden (its grammar admits nothing more): the request's fault."""


class SamplingError(RuntimeError):
    """A row's logits hold NaN or +inf: the model's fault, not the request's."""


def _real(name: str, value: Any) -> float:
    """`value` as a finite float, or a one-line error naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass
class SamplingParams:
    max_tokens: int = 64
    # 1.0 is OpenAI's default; 0 means greedy (argmax), the deterministic choice for tests and evals.
    temperature: float = 1.0
    top_p: float = 1.0
    # None: a fresh random seed per call (OpenAI's behaviour); an int makes the row reproducible.
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # A JSON schema the output must validate against (xgrammar-constrained decoding).
    json_schema: dict[str, Any] | None = None
    # Any JSON object (OpenAI's response_format json_object); ignored when json_schema is set.
    json_object: bool = False
    # OpenAI's penalties on tokens already generated (not the prompt): each logit loses
    # count * frequency_penalty + (count > 0) * presence_penalty. Both in [-2, 2].
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # token id -> bias added to its logit, in [-100, 100] (-100 bans the token, 100 all but forces it).
    logit_bias: dict[int, float] = field(default_factory=dict)
    # None: no logprobs. k >= 0: each sampled token's logprob and the k likeliest alternatives.
    logprobs: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field. The engine calls it again before a row joins a
        batch: params may have been changed after construction or rebuilt from JSON (a pipeline row)."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= _real("temperature", self.temperature) <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < _real("top_p", self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a list of strings, got {self.stop!r}")
        if self.json_schema is not None and not isinstance(self.json_schema, dict | bool):
            raise ValueError(f"json_schema must be a JSON object, got {type(self.json_schema).__name__}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= _real(name, getattr(self, name)) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must map token ids to biases, got {type(self.logit_bias).__name__}")
        try:  # ids may arrive as strings: OpenAI's wire format, and JSON round trips (a pipeline's rows)
            self.logit_bias = {int(token): float(bias) for token, bias in self.logit_bias.items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"logit_bias keys must be token ids, got {list(self.logit_bias)[:5]}") from e
        for token, bias in self.logit_bias.items():
            if not -100.0 <= bias <= 100.0:  # NaN fails this too
                raise ValueError(f"logit_bias for token {token} must be in [-100, 100], got {bias}")
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool)
            or not isinstance(self.logprobs, int)
            or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS
        ):
            raise ValueError(
                f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def constrained(self) -> bool:
        return self.json_schema is not None or self.json_object


def row_generator(params: SamplingParams) -> torch.Generator:
    """A CPU generator for one row: seeded from the request, so the row samples the same in any batch."""
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device="cpu").manual_seed(seed % (2**63))


def adjust_logits(logits: torch.Tensor, params: SamplingParams, counts: Counter[int]) -> torch.Tensor:
    """One row's logits `(V,)` after its `logit_bias` and its presence/frequency penalties over `counts`
    (how often each token was generated so far). The input is returned untouched when nothing applies;
    otherwise a new tensor. Tokens a grammar masked to -inf stay -inf."""
    penalize = bool(counts) and (params.presence_penalty != 0.0 or params.frequency_penalty != 0.0)
    if not params.logit_bias and not penalize:
        return logits
    out = logits.clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        out[ids] += torch.tensor(list(params.logit_bias.values()), dtype=out.dtype)
    if penalize:
        ids = torch.tensor(list(counts), dtype=torch.long)
        seen = torch.tensor(list(counts.values()), dtype=out.dtype)
        out[ids] -= seen * params.frequency_penalty + params.presence_penalty
    return out


def adjust_logits_batch(
    logits: torch.Tensor, params: Sequence[SamplingParams], counts: Sequence[Counter[int]]
) -> torch.Tensor:
    """`adjust_logits` for every row of `logits` `(B, V)` at once: the same float32 additions per element,
    so each row equals `adjust_logits(logits[b], params[b], counts[b])`, but one clone for the batch and
    one indexed add for every row's `logit_bias` rather than a clone and two small tensors per row and
    step. Penalties (counts change every step) stay per row. The input is returned untouched when no row
    is adjusted."""
    penalized = [
        b
        for b, p in enumerate(params)
        if counts[b] and (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0)
    ]
    biased = [b for b, p in enumerate(params) if p.logit_bias]
    if not biased and not penalized:
        return logits
    out = logits.clone()
    if biased:
        rows: list[int] = []
        ids: list[int] = []
        biases: list[float] = []
        for b in biased:
            bias = params[b].logit_bias  # a dict: no (row, id) pair twice, so the add is a plain gather-add
            rows += [b] * len(bias)
            ids += bias
            biases += bias.values()
        out[torch.tensor(rows), torch.tensor(ids)] += torch.tensor(biases, dtype=out.dtype)
    for b in penalized:
        row, p = out[b], params[b]  # a view: the penalty lands in `out`, after the bias as in adjust_logits
        ids_t = torch.tensor(list(counts[b]), dtype=torch.long)
        seen = torch.tensor(list(counts[b].values()), dtype=out.dtype)
        row[ids_t] -= seen * p.frequency_penalty + p.presence_penalty
    return out


def pick_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> list[int | Exception]:
    """`sample_token` for every row of `logits` `(B, V)` (float32, adjusted and masked): each row's token,
    or the error `sample_token` would raise for it. One batched argmax and one sync serve every greedy
    row and every row's NaN/+inf/all-masked check (argmax lands on a NaN or +inf when there is one);
    the rows that sample share one batched softmax and draw (`_draw`), each from its own generator."""
    logits = logits.float()
    best = torch.argmax(logits, dim=1)  # (B,) first maximum of each row, as the 1-D argmax picks it
    top = logits.gather(1, best.unsqueeze(1)).squeeze(1)  # (B,) the max, NaN/+inf if any
    top_values = top.tolist()
    picks: list[int | Exception] = []
    sampled: list[int] = []  # rows that sample (not greedy, nothing wrong with their logits)
    for b, token in enumerate(best.tolist()):
        if (problem := _row_problem(top_values[b])) is not None:
            picks.append(problem)
        elif params[b].greedy:
            picks.append(token)
        else:
            picks.append(-1)  # drawn below
            sampled.append(b)
    if sampled:
        rows = torch.tensor(sampled, dtype=torch.long, device=logits.device)
        drawn = _draw(
            logits.index_select(0, rows),
            top.index_select(0, rows),
            [params[b] for b in sampled],
            [generators[b] for b in sampled],
        )
        for b, token in zip(sampled, drawn, strict=True):
            picks[b] = token
    return picks


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under one row's logits `(V,)` and the `top` likeliest tokens with
    theirs, best first. Tokens with probability 0 (masked by a grammar or a -100 bias) are never listed
    as alternatives, so there may be fewer than `top`.

    The distribution is the one sampling starts from: the model's logits after logit_bias, penalties and
    any JSON grammar, before temperature and top_p (which only change how it is sampled)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.numel()))
        alternatives = [(int(i), float(v)) for i, v in zip(ids, values, strict=True) if v > float("-inf")]
    return float(logprobs[token]), alternatives


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token of one row from its logits `(V,)` (already masked by any grammar).

    Raises NoTokenError when every token is masked and SamplingError on NaN/+inf logits, so the engine
    can end this row alone; the draw only ever sees a finite distribution with mass. It is `pick_tokens`
    for one row, so a row draws the same token alone as in any batch."""
    token = pick_tokens(logits.unsqueeze(0), [params], [generator])[0]
    if isinstance(token, Exception):
        raise token
    return token


def _row_problem(top: float) -> Exception | None:
    """What is wrong with a row whose largest logit is `top` (its argmax's value, which is NaN or +inf
    when the row has one): SamplingError for the model's NaN/+inf, NoTokenError when every token is
    masked (-inf), None for a row to sample from."""
    if math.isnan(top) or top == math.inf:
        return SamplingError("the model produced non-finite logits for this row")
    if top == -math.inf:
        return NoTokenError("no token may follow: the response_format schema admits no further output")
    return None


def _tempered(logits: torch.Tensor, best: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Each row's softmax at its temperature `(N, V)`, for rows with finite maxima `best` `(N,)`.
    Subtracting the max first keeps each row's best logit at 0, so a small temperature sends the others
    towards -inf (probability 0) instead of overflowing to inf - inf = NaN."""
    return torch.softmax((logits - best.unsqueeze(1)) / temperature.unsqueeze(1), dim=-1)


def _nucleus_mask(values: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Which of each row's probabilities `values` `(N, K)`, sorted likeliest first, its top_p nucleus keeps:
    the smallest prefix whose mass reaches top_p (a token stays if the mass before it is < top_p), the
    likeliest always (a top_p that rounds to 0 in float32, 1e-300, means top-1)."""
    keep = torch.cumsum(values, dim=-1) - values < top_p.unsqueeze(1)
    keep[:, 0] = True
    return keep


def sampling_distributions(
    logits: torch.Tensor, params: Sequence[SamplingParams]
) -> tuple[torch.Tensor, list[Exception | None]]:
    """The distributions `(N, V)` that `pick_tokens` draws each row of `logits` `(N, V)` from (adjusted
    and masked), and per row the error it would give instead (that row's distribution is then garbage):
    one-hot at the argmax for a greedy row, else the temperature softmax cut to its top_p nucleus and
    renormalised. Speculative decoding's acceptance rule compares these for the draft and the model."""
    logits = logits.float()
    best = torch.argmax(logits, dim=1)
    top = logits.gather(1, best.unsqueeze(1)).squeeze(1)
    problems = [_row_problem(value) for value in top.tolist()]
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    temperature = torch.tensor(
        [1.0 if p.greedy else p.temperature for p in params], dtype=logits.dtype, device=logits.device
    )
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=logits.device)
    probs = _tempered(logits, torch.where(top.isfinite(), top, torch.zeros_like(top)), temperature)
    if bool((top_p < 1.0).any()):
        values, order = torch.sort(probs, dim=-1, descending=True)
        keep = _nucleus_mask(values, top_p) | (top_p >= 1.0).unsqueeze(1)
        probs = torch.zeros_like(probs).scatter(1, order, values * keep)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if bool(greedy.any()):
        probs[greedy] = torch.nn.functional.one_hot(best[greedy], logits.shape[-1]).to(probs.dtype)
    return probs, problems


def _draw(
    logits: torch.Tensor,
    best: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> list[int]:
    """One token per row of `logits` `(N, V)` (finite maxima `best` `(N,)`), each with its temperature and
    top_p, by inverse-CDF sampling with one uniform from the row's own generator.

    The softmax, sort and cumulative sums run on the whole `(N, V)` block, but each is computed along a
    row from that row alone, so a row draws the same token in any batch (and alone, N = 1). Before, each
    row ran a dozen small ops and torch.multinomial on its own: 0.9 ms per row and step at V = 32k."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
    probs = _tempered(logits, best, temperature)  # (N, V)
    uniforms = torch.cat([torch.rand(1, generator=g) for g in generators]).to(device, logits.dtype)
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=device)
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    plain = [i for i, p in enumerate(params) if p.top_p >= 1.0]
    return _in_groups(
        len(params),
        (plain, lambda index: _inverse_cdf(probs[index], uniforms[index])),
        (nucleus, lambda index: _nucleus_draw(probs[index], top_p[index], uniforms[index])),
    )


def _in_groups(count: int, *groups: tuple[list[int], Callable[[torch.Tensor], list[int]]]) -> list[int]:
    """One token per row of `count`: each group's rows (indices) drawn by its function, which gets them as
    an index tensor and returns their tokens in that order. Groups without rows are not called."""
    tokens = [0] * count
    for rows, draw in groups:
        if rows:
            for r, token in zip(rows, draw(torch.tensor(rows, dtype=torch.long)), strict=True):
                tokens[r] = token
    return tokens


# top_p rows look for their nucleus among their likeliest NUCLEUS_CANDIDATES tokens first (a top-k, far
# cheaper than sorting a 32k-150k vocabulary); a row whose nucleus is larger is sorted whole.
NUCLEUS_CANDIDATES = 256


def _nucleus_draw(probs: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor) -> list[int]:
    """Per row of `probs` `(N, V)`, a token from its top_p nucleus: the smallest prefix of its tokens,
    likeliest first, whose mass reaches top_p (the likeliest always kept), drawn by inverse CDF."""
    values, ids = torch.topk(probs, min(NUCLEUS_CANDIDATES, probs.shape[1]), dim=-1)  # likeliest first
    # The top-k is the start of the sorted row, so the nucleus stays inside it when the mass of the whole
    # top-k (summed in the order the cut sums it) already reaches top_p.
    wide = (torch.cumsum(values, dim=-1)[:, -1] < top_p).tolist()
    if not any(wide):
        return _prefix_draw(values, ids, top_p, uniforms)

    def whole(index: torch.Tensor) -> list[int]:  # these rows' nucleus reaches past the top-k: sort them
        row_values, row_ids = torch.sort(probs[index], dim=-1, descending=True)
        return _prefix_draw(row_values, row_ids, top_p[index], uniforms[index])

    return _in_groups(
        len(wide),
        (
            [i for i, w in enumerate(wide) if not w],
            lambda i: _prefix_draw(values[i], ids[i], top_p[i], uniforms[i]),
        ),
        ([i for i, w in enumerate(wide) if w], whole),
    )


def _prefix_draw(
    values: torch.Tensor, ids: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor
) -> list[int]:
    """Inverse-CDF draw over each row's sorted `values` `(N, K)` cut to its top_p prefix; the token `ids`."""
    kept = torch.where(_nucleus_mask(values, top_p), values, torch.zeros_like(values))
    positions = torch.tensor(_inverse_cdf(kept, uniforms), dtype=torch.long, device=values.device)
    return ids.gather(1, positions.unsqueeze(1)).squeeze(1).tolist()


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> list[int]:
    """Per row of `weights` `(N, V)` (non-negative, some mass), the index whose cumulative mass first
    exceeds `uniform * total`: index i with probability weight_i / total; a zero weight is never picked."""
    cdf = torch.cumsum(weights, dim=-1)
    targets = (uniforms * cdf[:, -1]).unsqueeze(1)
    picked = torch.searchsorted(cdf, targets, right=True).squeeze(1).tolist()
    last = weights.shape[1] - 1
    for i, index in enumerate(picked):
        if index > last:  # uniform * total rounded up to the total: the last token with mass
            picked[i] = int(torch.nonzero(weights[i]).max())
    return picked


def _held_back_length(text: str, stops: list[str]) -> int:
    """How many trailing characters could still become a stop string, so must not be sent yet."""
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                held = max(held, n)
                break
    return held


def _list_decoder(tokenizer: Any) -> Callable[..., str]:
    """`tokenizer.decode` for a non-empty list of ints, without its per-call conversion of the list.

    transformers' `decode` first runs `to_py_obj` over the ids (a Python `isinstance` per id), which for a
    row that re-decodes its whole answer every step cost more than the decode itself. For a list of ints
    that conversion returns the same list and `decode` calls `_decode` with it, so calling `_decode`
    directly is the same call; a tokenizer class that overrides `decode` keeps its own."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    if getattr(type(tokenizer), "decode", None) is PreTrainedTokenizerBase.decode and hasattr(
        tokenizer, "_decode"
    ):
        return tokenizer._decode
    return tokenizer.decode


# Decoders whose text for tokens a + b is their text for a followed by what b adds, when a ends at a
# character boundary and holds some text: they act on each token (Replace, ByteLevel, Metaspace) or join
# them (Fuse), and strip only at the start. ByteFallback joins a run of <0xNN> byte tokens into one string
# and spells the whole run as U+FFFDs when any byte of it is invalid, so a run is only settled once a
# token of text closes it. WordPiece's clean-up and BPE's end-of-word suffix rewrite across tokens or at
# the end: those tokenizers decode the whole answer.
_WINDOW_SAFE_DECODERS = {"ByteLevel", "Metaspace", "Replace", "ByteFallback", "Fuse", "Strip"}


def _decoder_types(decoder: dict[str, Any]) -> list[str]:
    if decoder.get("type") == "Sequence":
        return [t for d in decoder.get("decoders", []) for t in _decoder_types(d)]
    if decoder.get("type") == "Strip" and decoder.get("stop", 0):
        return ["Strip at the end"]
    return [str(decoder.get("type"))]


@dataclass(frozen=True)
class _Window:
    """What a fast tokenizer's window decode needs: its Rust tokenizer, and (for byte-fallback decoders)
    which ids are byte tokens and which are special tokens that decoding skips."""

    backend: Any
    byte_ids: frozenset[int]
    skipped_ids: frozenset[int]


_windows: weakref.WeakKeyDictionary[Any, _Window | None] = weakref.WeakKeyDictionary()


def _window_for(tokenizer: Any) -> _Window | None:
    """How `tokenizer` decodes a window at a time, or None where only a whole decode gives its text.

    A window needs a transformers fast tokenizer whose `decode` and `_decode` are the library's own, with no
    `clean_up_tokenization` afterwards (transformers skips it for BPE models) and a decoder made of
    `_WINDOW_SAFE_DECODERS`. Worked out once per tokenizer."""
    try:
        return _windows[tokenizer]
    except (KeyError, TypeError):
        pass
    window = _work_out_window(tokenizer)
    try:
        _windows[tokenizer] = window
    except TypeError:  # not weakly referenceable: worked out per row
        pass
    return window


def _work_out_window(tokenizer: Any) -> _Window | None:
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # an older transformers: decode the whole answer
        return None
    if (
        not isinstance(tokenizer, TokenizersBackend)
        or type(tokenizer)._decode is not TokenizersBackend._decode
        or _list_decoder(tokenizer) != tokenizer._decode  # a class that overrides `decode` keeps its own
    ):
        return None
    backend = tokenizer._tokenizer
    if backend.decoder is None:
        return None
    types = _decoder_types(json.loads(backend.decoder.__getstate__()))
    if not set(types) <= _WINDOW_SAFE_DECODERS:
        return None
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        forced = getattr(
            tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False
        )
        if type(backend.model).__name__ != "BPE" or forced:
            return None
    byte_ids: set[int] = set()
    if "ByteFallback" in types:
        byte_ids = {i for b in range(256) if (i := backend.token_to_id(f"<0x{b:02X}>")) is not None}
    skipped = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
    return _Window(backend, frozenset(byte_ids), frozenset(skipped))


class _WindowDecoder:
    """A row's text, decoding only a short window of its latest tokens at each step (O(1) per token, where
    re-decoding the whole answer is O(length) per token: 11% of a 32-row CPU decode step at 256 tokens).

    The text of tokens [0, read) is settled in `settled`. Each step decodes the window [prefix, end) and
    the window's head [prefix, read); what the window adds past its head is the new text. Decoding from
    `prefix` (a token or more before `read`) gives the decoder the context a whole decode has: the
    leading-space rule of SentencePiece-style decoders applies to the window's first token, whose text is
    in the head, not in what is added. The window moves on when its text does not end in U+FFFD (the
    start of a multi-byte character whose remaining bytes are still to come) and no byte-fallback run is
    open; a head whose text is empty (skipped special tokens, a lone space) is widened to the left.
    """

    def __init__(self, window: _Window):
        self._window = window
        self.token_ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._head = ""  # the text of tokens [prefix, read)
        self.byte_run = False  # the last token that decodes to anything is a byte token: a run is open
        self.settled = ""  # the text of tokens [0, read)

    def _text(self, start: int, end: int) -> str:
        return self._window.backend.decode(self.token_ids[start:end], skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """The row's whole text with `token_id` appended."""
        self.token_ids.append(token_id)
        if token_id not in self._window.skipped_ids:
            self.byte_run = token_id in self._window.byte_ids
        added = self._text(self._prefix, len(self.token_ids))[len(self._head) :]
        if self.byte_run or (added and added[-1] == "\ufffd"):
            return self.settled + added
        self.settled += added
        self._prefix, self._read = self._read, len(self.token_ids)
        self._head = self._text(self._prefix, self._read)
        while not self._head and self._prefix > 0:
            self._prefix -= 1
            self._head = self._text(self._prefix, self._read)
        return self.settled


class TextTracker:
    """Detokenizes one row incrementally and applies its stop strings.

    Each `push(token)` returns the new text that is safe to show (`delta`) and whether a stop string ended
    the row. Text that might be the start of a stop string, or half of a multi-byte UTF-8 character
    (decoded as U+FFFD), is held back until the next token settles it, so a streamed row never shows
    text the final answer does not contain. The text is always what `tokenizer.decode(token_ids,
    skip_special_tokens=True)` gives; a fast tokenizer gets it by decoding a window of the last tokens
    (`_WindowDecoder`), any other by decoding the whole answer again.
    """

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tokenizer = tokenizer
        window = _window_for(tokenizer)
        self._window = _WindowDecoder(window) if window is not None else None
        self._decode = _list_decoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.token_ids: list[int] = self._window.token_ids if self._window is not None else []
        self.text = ""  # the full text so far (cut at a stop string once one is found)
        self.sent = 0  # characters of `text` already returned as deltas

    def push(self, token_id: int) -> tuple[str, bool]:
        if self._window is not None:
            text = self._window.push(token_id)
        else:
            self.token_ids.append(token_id)
            text = self._decode(self.token_ids, skip_special_tokens=True)
        # A stop string may straddle the previous delta boundary: search from before it.
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.sent - longest)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return self.flush(), True
        self.text = text
        safe = len(text) - _held_back_length(text, self.stop)
        if self._window is not None and self._window.byte_run:
            safe = min(safe, len(self._window.settled))  # the open run may yet turn into U+FFFDs
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1  # an incomplete UTF-8 sequence: the next byte token completes it
        delta = text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta, False

    def flush(self) -> str:
        """Everything not yet sent (the row is finished)."""
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta
