"""One running row of the generation engine: its decode state, and how one sampled token advances it.

    row = DecodeRow(index=0, prepared=prepared, generator=row_generator(params),
                    text=TextTracker(tokenizer, params.stop), matcher=None)
    delta = row.step(logits_row, eos_token_ids, vocab_bytes)   # logits_row: (V,), masked by its grammar
    delta.token_ids, delta.text, delta.done

Everything here is per row and independent of the batch: the row's own seeded generator, penalties
counted over its own tokens, its stop strings and grammar. So a row samples the same tokens whatever it
is batched with, and the engine's loop (`vlm_engine.py`) only has to hand each row its logits.
Plain PyTorch: no Ray.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from raybooth.models.decoding import SamplingParams, TextTracker, adjust_logits, sample_token, token_logprobs
from raybooth.models.vlm_requests import PreparedRequest, StreamDelta, TokenLogprob, error_delta


@dataclass
class DecodeRow:
    """Decode state of one running row."""

    index: int  # position in the caller's request list
    prepared: PreparedRequest
    generator: torch.Generator
    text: TextTracker
    matcher: Any  # xgrammar GrammarMatcher or None
    generated: int = 0  # tokens sampled so far, EOS included (what usage.completion_tokens counts)
    counts: Counter[int] = field(default_factory=Counter)  # how often each token was sampled (penalties)

    @property
    def params(self) -> SamplingParams:
        return self.prepared.params

    def finish(self, reason: str, text: str = "") -> StreamDelta:
        return StreamDelta(
            text=text,
            finish_reason=reason,
            prompt_tokens=self.prepared.prompt_tokens,
            completion_tokens=self.generated,
        )

    def fail(self, error: BaseException) -> StreamDelta:
        return error_delta(error, self.prepared.prompt_tokens, self.generated)

    def step(
        self, logits: torch.Tensor, eos_token_ids: set[int], vocab: Callable[[], Sequence[bytes]]
    ) -> StreamDelta:
        """Sample the next token from the row's (masked) logits `(V,)` and feed it to the row. `vocab`
        gives each token id's exact bytes, asked for only when the row wants logprobs."""
        row_logits = adjust_logits(logits, self.params, self.counts)
        token = sample_token(row_logits, self.params, self.generator)
        return self.emit(token, row_logits, eos_token_ids, vocab)

    def emit(
        self,
        token: int,
        row_logits: torch.Tensor,
        eos_token_ids: set[int],
        vocab: Callable[[], Sequence[bytes]],
    ) -> StreamDelta:
        """Feed `token`, chosen from `row_logits` `(V,)` (masked and adjusted: what its logprobs come
        from), to the row: its delta. `step` samples then emits; speculative decoding emits the tokens its
        acceptance rule chose (`speculative_sampling.py`)."""
        delta = self._advance(token, eos_token_ids)
        delta.token_ids.append(token)
        self.counts[token] += 1
        if self.params.logprobs is not None and token not in eos_token_ids:
            chosen, alternatives = token_logprobs(row_logits, token, self.params.logprobs)
            table = vocab()
            entry = token_entry(table, token, chosen)
            entry.top = [token_entry(table, t, lp) for t, lp in alternatives]
            delta.logprobs.append(entry)
        return delta

    def _advance(self, token: int, eos_token_ids: set[int]) -> StreamDelta:
        """Feed one sampled token; the delta, finished when EOS, a stop, the grammar or the budget says so."""
        if self.matcher is not None and not self.matcher.accept_token(token):
            # The token was sampled from the grammar's own mask, so this is a bug, not bad input.
            raise RuntimeError(f"grammar rejected token {token} that its own bitmask allowed")
        self.generated += 1
        if token in eos_token_ids:
            return self.finish("stop", self.text.flush())
        delta, stopped = self.text.push(token)
        if stopped:
            return self.finish("stop", delta)
        if self.matcher is not None and self.matcher.is_terminated():
            return self.finish("stop", delta + self.text.flush())
        if self.generated >= self.params.max_tokens:
            return self.finish("length", delta + self.text.flush())
        return StreamDelta(text=delta)


def token_entry(vocab: Sequence[bytes], token_id: int, logprob: float) -> TokenLogprob:
    """A token's OpenAI logprob record: its text (U+FFFD for a partial character) and exact bytes."""
    raw = vocab[token_id] if token_id < len(vocab) else b""
    return TokenLogprob(raw.decode("utf-8", errors="replace"), list(raw), logprob)
