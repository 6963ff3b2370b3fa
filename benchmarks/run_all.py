"""Run every benchmark in this folder once, one after another (`make bench`).

    .venv/bin/python benchmarks/run_all.py [name ...]

Each benchmark is a script that measures its claim side by side in one run and prints a ratio; this
runner only sequences them (never in parallel: they would steal each other's cores) and reports which failed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Benchmarks that make more than one claim run once per claim (default: one run without arguments).
RUNS: dict[str, list[list[str]]] = {
    # The LoRA table of each tiny family, then Ray Train vs the plain loop.
    "train_step": [
        *(["--preset", p] for p in ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux")),
        ["--mode", "overhead"],
    ],
    "speculative": [],  # generation.py runs it next to int8 (`--compare speculative`)
    # Both routes at concurrency 8, then issue 15's chat comparison on a text-only model and a VLM.
    "serve_load": [
        [],
        *(
            f"--route chat --chat-model {m} --concurrency 1,8,32 --min-tokens 8 --max-tokens 256 "
            "--requests 32 --peer transformers".split()
            for m in ("tiny-llm", "tiny-vlm")
        ),
    ],
}


def main(names: list[str]) -> int:
    scripts = sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name)
    # A benchmark's helper modules (serve_load_peer.py beside serve_load.py) are not benchmarks themselves.
    scripts = [p for p in scripts if not any(p.stem.startswith(f"{q.stem}_") for q in scripts)]
    if names:
        scripts = [p for p in scripts if p.stem in names]
    failed = []
    for script in scripts:
        for args in RUNS.get(script.stem, [[]]):
            name = " ".join([script.stem, *args])
            print(f"\n===== {name}", flush=True)
            started = time.time()
            code = subprocess.call([sys.executable, str(script), *args])
            print(f"===== {name}: exit {code} in {time.time() - started:.0f}s", flush=True)
            if code != 0:
                failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
