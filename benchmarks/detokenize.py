"""A row's streamed text: TextTracker's window decode vs decoding the whole answer after every token.

    .venv/bin/python benchmarks/detokenize.py                    # tiny-llm's tokenizer, 64 to 2048 tokens
    .venv/bin/python benchmarks/detokenize.py --model /path/to/llama --lengths 256 4096

Both sides push the same random token ids through `TextTracker` (which also searches the stop strings and
holds back text); the whole-answer side is the tracker with its window switched off, the way it decodes a
tokenizer it cannot window. Prints microseconds per token and the ratio: the whole decode grows with the
answer's length, the window does not.
"""

from __future__ import annotations

import argparse
import random
import time

from raybooth.cluster.workdir import default_models_dir
from raybooth.models.decoding import TextTracker
from raybooth.models.loaders import load_vlm_processor
from raybooth.models.presets import resolve_model


def us_per_token(tokenizer, rows: list[list[int]], window: bool) -> float:
    start = time.perf_counter()
    for ids in rows:
        tracker = TextTracker(tokenizer, stop=["\n\n"])
        if not window:
            tracker._window = None  # the tracker's own fallback: decode the whole answer each token
        for token in ids:
            tracker.push(token)
    return (time.perf_counter() - start) * 1e6 / sum(len(ids) for ids in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llm", help="a preset, folder or hub id with a tokenizer")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024, 2048])
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args()

    processor = load_vlm_processor(resolve_model(args.model, kind="vlm", models_dir=default_models_dir()))
    tokenizer = getattr(processor, "tokenizer", processor)
    rng = random.Random(0)
    print(f"{args.model}: {type(tokenizer).__name__}, {len(tokenizer)} tokens; us per pushed token")
    print(f"{'length':>7} {'whole':>9} {'window':>9} {'ratio':>7}")
    for length in args.lengths:
        rows = [[rng.randrange(len(tokenizer)) for _ in range(length)] for _ in range(args.rows)]
        whole = us_per_token(tokenizer, rows, window=False)
        window = us_per_token(tokenizer, rows, window=True)
        print(f"{length:>7} {whole:>9.1f} {window:>9.1f} {whole / window:>6.1f}x")


if __name__ == "__main__":
    main()
