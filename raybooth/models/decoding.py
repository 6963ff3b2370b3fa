"""Per-row decoding pieces of the VLM engine: sampling params, token sampling, text deltas with stop strings.

    params = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, seed=1, stop=["\\n\\n"])
    gen = row_generator(params)                          # this row's own torch.Generator
    token = sample_token(logits_row, params, gen)        # logits_row: (V,) float32 on the CPU
    text = TextTracker(tokenizer, params.stop); delta, stopped = text.push(token)

Everything here works on one row, on the CPU, from that row's own state only. That is what makes a row's
output independent of the batch it was packed into: no batch-wide softmax, no shared random stream.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import torch

FinishReason = str  # "stop" | "length"


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

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def constrained(self) -> bool:
        return self.json_schema is not None or self.json_object


def row_generator(params: SamplingParams) -> torch.Generator:
    """A CPU generator for one row: seeded from the request, so the row samples the same in any batch."""
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device="cpu").manual_seed(seed % (2**63))


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token of one row from its logits `(V,)` (already masked by any grammar)."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # (V,)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def _held_back_length(text: str, stops: list[str]) -> int:
    """How many trailing characters could still become a stop string, so must not be sent yet."""
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                held = max(held, n)
                break
    return held


class TextTracker:
    """Detokenizes one row incrementally and applies its stop strings.

    Each `push(token)` returns the new text that is safe to show (`delta`) and whether a stop string ended
    the row. Text that might be the start of a stop string, or half of a multi-byte UTF-8 character
    (decoded as U+FFFD), is held back until the next token settles it, so a streamed row never shows
    text the final answer does not contain.
    """

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        self.text = ""  # the full text so far (cut at a stop string once one is found)
        self.sent = 0  # characters of `text` already returned as deltas

    def push(self, token_id: int) -> tuple[str, bool]:
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        # A stop string may straddle the previous delta boundary: search from before it.
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.sent - longest)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return self.flush(), True
        self.text = text
        safe = len(text) - _held_back_length(text, self.stop)
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
