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


def main(names: list[str]) -> int:
    scripts = sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name)
    if names:
        scripts = [p for p in scripts if p.stem in names]
    failed = []
    for script in scripts:
        print(f"\n===== {script.stem}", flush=True)
        started = time.time()
        code = subprocess.call([sys.executable, str(script)])
        print(f"===== {script.stem}: exit {code} in {time.time() - started:.0f}s", flush=True)
        if code != 0:
            failed.append(script.stem)
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
