"""Request packing: group rows of different prompt lengths and image counts into low-padding batches.

    items = [PackItem(index=i, prompt_tokens=n, num_images=k) for i, (n, k) in enumerate(rows)]
    batches = pack_by_token_budget(items, max_rows=8, max_batch_tokens=8192)
    padding_fraction(batches)   # vs padding_fraction(pack_fifo(items, max_rows=8))

A left-padded batch costs `rows x longest prompt` tokens of prefill and KV cache, whatever its rows'
own lengths; the difference is padding, pure waste. Packing sorts rows by (image count, prompt length)
so neighbours have similar shapes, then cuts a batch when one more row would push the padded size
over the token budget or the row cap. Sorting by image count first keeps the vision tower's work per
batch even too. A row longer than the budget on its own still runs, alone. FIFO (arrival order, fixed
row count) is the baseline the tests and the benchmark compare against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PackItem:
    index: int  # the row's position in the caller's list
    prompt_tokens: int  # prompt length including expanded image tokens
    num_images: int = 0


@dataclass(frozen=True)
class PackedBatch:
    indices: tuple[int, ...]
    real_tokens: int  # sum of the rows' prompt lengths
    padded_tokens: int  # rows x longest prompt: what the model actually processes

    @property
    def rows(self) -> int:
        return len(self.indices)

    @property
    def padding_tokens(self) -> int:
        return self.padded_tokens - self.real_tokens

    @property
    def padding_fraction(self) -> float:
        return self.padding_tokens / self.padded_tokens if self.padded_tokens else 0.0


def make_batch(items: Sequence[PackItem]) -> PackedBatch:
    longest = max(item.prompt_tokens for item in items)
    return PackedBatch(
        indices=tuple(item.index for item in items),
        real_tokens=sum(item.prompt_tokens for item in items),
        padded_tokens=longest * len(items),
    )


def pack_fifo(items: Sequence[PackItem], max_rows: int) -> list[PackedBatch]:
    """Baseline: consecutive rows in arrival order, `max_rows` per batch."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    return [make_batch(items[i : i + max_rows]) for i in range(0, len(items), max_rows)]


def pack_by_token_budget(
    items: Sequence[PackItem], max_rows: int, max_batch_tokens: int
) -> list[PackedBatch]:
    """Sort by (image count, length), then fill each batch up to the row cap and the padded-token budget."""
    if max_rows < 1 or max_batch_tokens < 1:
        raise ValueError(f"max_rows and max_batch_tokens must be >= 1, got {max_rows}, {max_batch_tokens}")
    ordered = sorted(items, key=lambda item: (item.num_images, item.prompt_tokens, item.index))
    batches: list[PackedBatch] = []
    current: list[PackItem] = []
    for item in ordered:
        # Rows arrive in ascending length within an image count, so this row would be the batch's longest.
        longest = max([item.prompt_tokens] + [c.prompt_tokens for c in current])
        fits = len(current) < max_rows and longest * (len(current) + 1) <= max_batch_tokens
        same_shape = not current or current[-1].num_images == item.num_images
        if current and not (fits and same_shape):
            batches.append(make_batch(current))
            current = []
        current.append(item)
    if current:
        batches.append(make_batch(current))
    return batches


def padding_fraction(batches: Sequence[PackedBatch]) -> float:
    """Share of processed prompt tokens that are padding, over all batches (token-weighted)."""
    padded = sum(b.padded_tokens for b in batches)
    return sum(b.padding_tokens for b in batches) / padded if padded else 0.0
