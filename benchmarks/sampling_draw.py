"""Sampling one decode step's tokens: the engine's batched draw vs a per-row torch.multinomial loop.

    .venv/bin/python benchmarks/sampling_draw.py                      # 32 rows, vocabularies 465 to 152k
    .venv/bin/python benchmarks/sampling_draw.py --rows 64 --vocab 32000 --top-p 0.95

`decoding.pick_tokens` (what the engine calls every step) against the textbook per-row loop the engine
ran before: each row's softmax with its temperature, its top_p cut over a full sort, and
`torch.multinomial` with its own generator. The logits are peaked like a language model's
(`--peak` x standard normal), each row seeded. Prints ms per step for both and the ratio, one thread.
"""

from __future__ import annotations

import argparse
import time

import torch

from raybooth.models.decoding import SamplingParams, pick_tokens, row_generator


def per_row(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int]:
    tokens = []
    for b, p in enumerate(params):
        row = logits[b]
        probs = torch.softmax((row - row.max()) / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < p.top_p
            keep[0] = True
            kept = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
            tokens.append(int(order[torch.multinomial(kept, 1, generator=generators[b])]))
        else:
            tokens.append(int(torch.multinomial(probs, 1, generator=generators[b])))
    return tokens


def ms_per_step(fn, logits, params, repeats: int) -> float:
    generators = [row_generator(p) for p in params]
    fn(logits, params, generators)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        fn(logits, params, generators)
    return (time.perf_counter() - started) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--vocab", default="465,32000,152064", help="comma-separated vocabulary sizes")
    p.add_argument("--top-p", type=float, nargs="+", default=[1.0, 0.9])
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--peak", type=float, default=6.0, help="logits = peak x N(0, 1)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(
        f"{'vocab':>7} {'top_p':>5} {'per-row ms':>10} {'batched ms':>10} {'ratio':>6}   ({args.rows} rows)"
    )
    for vocab in (int(v) for v in args.vocab.split(",")):
        logits = torch.randn(args.rows, vocab) * args.peak
        for top_p in args.top_p:
            params = [
                SamplingParams(temperature=args.temperature, top_p=top_p, seed=i) for i in range(args.rows)
            ]
            slow = ms_per_step(per_row, logits, params, args.repeats)
            fast = ms_per_step(pick_tokens, logits, params, args.repeats)
            print(f"{vocab:>7} {top_p:>5} {slow:>10.2f} {fast:>10.2f} {slow / fast:>5.1f}x")


if __name__ == "__main__":
    main()
