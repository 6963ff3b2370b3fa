"""The acceptance rule of speculative decoding, per row: which drafted tokens a row keeps, and its next token.

    probs = sampling_probs(adjust_logits(logits_row, params, counts), params)   # (V,): what plain sampling draws from
    token, accepted = accept_or_resample(p, q, draft_token, params, generator)
    delta, accepted = verify_row(row, target_logits, drafts, draft_probs, grammars, eos_ids, vocab, counters)

The rule (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et al.
2023, "Accelerating LLM Decoding with Speculative Sampling"): a token `d` drawn from the draft's
distribution `q` is kept with probability `min(1, p[d] / q[d])`, where `p` is the served model's; when it
is not, the row's token is drawn from `norm(max(0, p - q))` instead and the rest of the draft is dropped;
when every drafted token is kept, one more (the bonus) is drawn from `p` at the position after them. For
any `q` this draws each token exactly from `p`, so sampled output keeps the served model's distribution.
A greedy row (temperature ~0) keeps a drafted token while it equals the served model's argmax, so its
output is token for token the output of plain greedy decoding.

`p` and `q` are the distributions plain sampling draws from (`decoding.sample_token`): the logits after
the row's JSON grammar, logit_bias and presence/frequency penalties (counted over the tokens the row has
at that position, drafted ones included), then temperature and top_p. Every draw (the acceptance test,
the resample, the bonus) comes from the row's own seeded generator. Plain PyTorch: no Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from raybooth.models.decoding import SamplingParams, adjust_logits, sample_token, sampling_distributions
from raybooth.models.vlm_requests import StreamDelta
from raybooth.models.vlm_rows import DecodeRow


@dataclass
class AcceptanceCounters:
    """What the verifications decided: `accepted / proposed` is the acceptance rate. Only drafted tokens
    that were judged count (a row that ends mid-draft, at EOS or its budget, leaves the rest unjudged)."""

    proposed: int = 0
    accepted: int = 0
    verify_passes: int = 0  # forward passes of the served model over k + 1 positions
    draft_passes: int = 0  # forward passes of the draft

    @property
    def rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `(V,)` that `decoding.sample_token` draws one row's token from, for logits `(V,)`
    already masked and adjusted (`decoding.sampling_distributions` for one row). Raises as sample_token does."""
    probs, problem = sampling_distributions(logits.unsqueeze(0), [params])
    if problem[0] is not None:
        raise problem[0]
    return probs[0]


def accept_or_resample(
    p: torch.Tensor, q: torch.Tensor, draft_token: int, params: SamplingParams, generator: torch.Generator
) -> tuple[int, bool]:
    """`(draft_token, True)` when the rule keeps it, else `(the replacement drawn from the residual, False)`.
    `p`, `q`: the served model's and the draft's distributions `(V,)` at this position."""
    if params.greedy:  # p is one-hot: keep the draft token only where it is the argmax
        best = int(torch.argmax(p))
        return (draft_token, True) if draft_token == best else (best, False)
    u = float(torch.rand((), generator=generator))
    # u < p/q, without dividing (q[d] > 0: d was drawn from q, or q is one-hot at d).
    if u * float(q[draft_token]) < float(p[draft_token]):
        return draft_token, True
    residual = (p - q).clamp(min=0.0)
    if float(residual.sum()) <= 0.0:  # p == q up to rounding: rejection had probability ~0; draw from p
        residual = p
    return int(torch.multinomial(residual, 1, generator=generator)), False


def verify_row(
    row: DecodeRow,
    target_logits: torch.Tensor,
    drafts: Sequence[int],
    draft_probs: Sequence[torch.Tensor],
    mask_with_grammar: Callable[[torch.Tensor, Any], None],
    eos_token_ids: set[int],
    vocab: Callable[[], Sequence[bytes]],
    counters: AcceptanceCounters,
) -> tuple[StreamDelta, int]:
    """Walk one row through its k drafted tokens: the delta of every token it takes this step (kept drafts
    plus the replacement or bonus) and how many drafts it kept. `target_logits` `(k + 1, V)`: the served
    model's logits after the row's pending token and after each draft token. The row's grammar, counts,
    text and generator advance token by token, so position j is judged in the state the row has there."""
    k = len(drafts)
    out = StreamDelta()
    kept = 0
    for j in range(k + 1):
        logits = target_logits[j].clone()  # (V,) masked in place below
        if row.matcher is not None:
            mask_with_grammar(logits, row.matcher)
        row_logits = adjust_logits(logits, row.params, row.counts)
        if j < k:
            token, accepted = accept_or_resample(
                sampling_probs(row_logits, row.params), draft_probs[j], drafts[j], row.params, row.generator
            )
            counters.proposed += 1
            counters.accepted += accepted
            kept += accepted
        else:  # every draft kept: the bonus token, drawn from p exactly as plain decoding draws
            token, accepted = sample_token(row_logits, row.params, row.generator), False
        delta = row.emit(token, row_logits, eos_token_ids, vocab)
        out.text += delta.text
        out.token_ids += delta.token_ids
        out.logprobs += delta.logprobs
        if delta.done:
            out.finish_reason, out.prompt_tokens = delta.finish_reason, delta.prompt_tokens
            out.completion_tokens = delta.completion_tokens
            break
        if not accepted:
            break
    return out, kept
