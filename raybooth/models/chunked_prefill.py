"""Chunked prefill: a long prompt fills its KV cache `chunk` tokens per forward pass, so the scheduler
(`vlm_scheduler.py`) can put one chunk between two decode steps of the running rows instead of making
them wait for the whole prompt.

    prefill = ChunkedPrefill.begin(engine, prepared, chunk=256)   # None when this prompt cannot chunk
    while (steps := prefill.step()) is None:   # one chunk per call
        ...                                    # the running rows decode a token meanwhile
    # `steps` (vlm_steps.PlainSteps) holds the row's first-token logits and cache, ready to merge

Each chunk is fed with the cache of the chunks before it, the attention mask over everything so far and
the chunk's own 1-D positions, so attention sees exactly what one prefill of the whole prompt sees: the
row's greedy tokens equal the unchunked ones (`tests/models/test_vlm_scheduler.py`). A chunked row is
prefilled alone (no left padding), then merged into the running batch like any newcomer.

Which prompts chunk: text-only rows (no image or video inputs: a vision model replaces its image tokens
with image features in the one pass that holds them all) of families with plain 1-D positions and a
cache that merges mid-flight, decoded without a draft model. Anything else is prefilled whole, still
bounded by the scheduler's per-iteration token budget. Plain PyTorch: no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from raybooth.models.vlm_steps import PlainSteps

if TYPE_CHECKING:
    from raybooth.models.vlm_engine import BatchState, VLMEngine
    from raybooth.models.vlm_requests import PreparedRequest


def chunkable(engine: VLMEngine, prepared: PreparedRequest) -> bool:
    """Whether `prepared` may be prefilled in chunks on `engine` (see the module docstring)."""
    from raybooth.models.vlm_scheduler import family_merges

    one_d = engine.family.positions != "mrope"
    return family_merges(engine.family) and one_d and engine.speculative is None and not prepared.inputs


@dataclass
class ChunkedPrefill:
    """One prompt's prefill in progress: its tokens, and the cache of the chunks already run."""

    engine: VLMEngine
    ids: torch.Tensor  # (1, T) the whole prompt
    chunk: int
    state: BatchState
    done: int = 0  # prompt tokens already in the cache

    @classmethod
    def begin(cls, engine: VLMEngine, prepared: PreparedRequest, chunk: int) -> ChunkedPrefill | None:
        """A chunked prefill of `prepared`, or None when it is not `chunkable` or fits one chunk."""
        from transformers import DynamicCache

        from raybooth.models.vlm_engine import BatchState
        from raybooth.models.vlm_scheduler import mergeable

        if chunk < 1 or prepared.prompt_tokens <= chunk or not chunkable(engine, prepared):
            return None
        state = BatchState(
            cache=DynamicCache(config=engine.model.config.get_text_config()),
            mask=torch.zeros((1, 0), dtype=torch.long, device=engine.device),
            positions=torch.zeros((1, 1), dtype=torch.long, device=engine.device),
            rope_deltas=None,
            decode_inputs={},
        )
        if not mergeable(state):  # sliding-window layers: their cache is not the mask's length
            return None
        ids = torch.tensor([prepared.input_ids], dtype=torch.long, device=engine.device)
        return cls(engine, ids, chunk, state)

    @property
    def remaining(self) -> int:
        return self.ids.shape[1] - self.done

    def step(self) -> PlainSteps | None:
        """Run the next chunk; the row's decode state once the last one ran, else None."""
        end = min(self.done + self.chunk, self.ids.shape[1])
        ones = self.state.mask.new_ones(1, end - self.done)
        self.state.mask = torch.cat([self.state.mask, ones], dim=1)  # (1, end)
        positions = torch.arange(self.done, end, device=self.engine.device).unsqueeze(0)  # (1, chunk)
        logits = self.engine.forward(
            input_ids=self.ids[:, self.done : end],
            attention_mask=self.state.mask,
            position_ids=positions,
            past_key_values=self.state.cache,
        )
        self.done = end
        if self.remaining:
            return None
        self.state.positions = positions[:, -1:]  # (1, 1): the last prompt token's position
        return PlainSteps(self.engine, logits, self.state)
