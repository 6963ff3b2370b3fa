"""The decode-step state `VLMEngine.generate_stream` drives: plain decoding here, speculative in `speculative.py`.

    steps = PlainSteps.start(engine, [row.prepared for row in rows])   # the prefill
    deltas = steps.sample(live, [rows[b] for b in live])   # one delta per live row
    steps.select(keep); steps.advance(rows, next_tokens)   # finished rows leave; the rest take a step
    steps.states, steps.absorb(newcomers)                  # the scheduler merges caches, then the rest

The loop (rows, cancellation, what is yielded when) is one piece of code for both ways of decoding; a
`steps` object only says where a step's deltas come from. Plain: a row samples one token from the
logits the last forward pass left it. Plain PyTorch: no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from raybooth.models.vlm_requests import PreparedRequest, StreamDelta
from raybooth.models.vlm_rows import DecodeRow

if TYPE_CHECKING:
    from raybooth.models.vlm_engine import BatchState, VLMEngine


@dataclass
class PlainSteps:
    """One token per row per step: `logits` `(B, V)` are each running row's next-token logits."""

    engine: VLMEngine
    logits: torch.Tensor
    state: BatchState

    @classmethod
    def start(cls, engine: VLMEngine, prepared: Sequence[PreparedRequest]) -> PlainSteps:
        logits, state = engine.prefill(prepared)
        return cls(engine, logits, state)

    @property
    def states(self) -> list[BatchState]:
        """The KV-cache states, for the scheduler's merge and trim."""
        return [self.state]

    def sample(self, live: list[int], rows: Sequence[DecodeRow]) -> list[StreamDelta]:
        logits = self.logits if len(live) == len(self.logits) else self.logits[live]
        return self.engine.sample_rows(logits, rows)

    def select(self, keep: list[int]) -> None:
        """Drop finished rows from every per-row tensor and from the KV cache."""
        self.state.select(torch.tensor(keep, device=self.engine.device))
        self.logits = self.logits[keep]

    def absorb(self, newcomers: PlainSteps) -> None:
        """Take `newcomers`' per-row pending logits (their caches were merged into `states` already)."""
        self.logits = torch.cat([self.logits, newcomers.logits])

    def advance(self, rows: Sequence[DecodeRow], next_tokens: list[int]) -> None:
        tokens = torch.tensor(next_tokens, device=self.engine.device).unsqueeze(1)  # (B, 1)
        self.logits = self.engine.decode_step(tokens, self.state)
