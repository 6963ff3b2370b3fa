"""Benchmark: the continuous-batching scheduler's per-step overhead over the static engine, in-process.

    .venv/bin/python benchmarks/scheduler_step.py                            # tiny-llm and tiny-vlm, N = 1 8 32
    .venv/bin/python benchmarks/scheduler_step.py --models tiny-llm --rows 8 --max-tokens 64 --repeats 3
    .venv/bin/python benchmarks/scheduler_step.py --models tiny-llm --rows 32 --profile 25   # cProfile the loop

The same N greedy requests (prepared once; EOS banned with `logit_bias`, so every row decodes
`--max-tokens`) run (a) as one static batch through `VLMEngine.generate_stream` and (b) through a
`Scheduler` (`max_rows=N`: all submitted together with `submit_many`, then waited for). Both sides see
the same prefill (one batch of N) and the same decode steps, so the difference is the scheduler's own
work per step: its loop, locks, delivery callbacks, trimming and merging. Each side runs twice over:
with the engine's batched sampling (the default) and with `batched_sampling = False`, the per-row
reference path (`--sampling`), so the sampling fast path is measured in the same run too. The timed runs
alternate between the sides (one warm-up each first), so a neighbour's load falls on all alike.
Printed: tokens per CPU second of the process (median over `--repeats`; on a shared box the CPU time
moves far less than the wall time, which is in brackets) and the ratio scheduler / engine per N. No
Ray, no HTTP: the serving benchmark (`serve_load.py`) measures those.

`--profile K`: after the table, the scheduler loop thread of one more run of the first model and N is
profiled with cProfile and the top K functions printed by own time and by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import threading
import time

import torch
from generation import make_requests  # benchmarks/ is the script's folder, so on sys.path

from raybooth.cluster.workdir import default_models_dir
from raybooth.models.vlm_engine import PreparedRequest, VLMEngine
from raybooth.models.vlm_scheduler import Scheduler


def engine_run(engine: VLMEngine, prepared: list[PreparedRequest]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, tokens) of one static batch."""
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = 0
    for step in engine.generate_stream(prepared):
        tokens += sum(len(delta.token_ids) for delta in step if delta is not None)
    return time.perf_counter() - wall, time.process_time() - cpu, tokens


def scheduler_run(scheduler: Scheduler, prepared: list[PreparedRequest]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, tokens) of the same rows submitted together and waited for. The CPU
    time is the process's (every thread): the loop thread's work, the waiting caller costs none."""
    done = threading.Event()
    left = [len(prepared)]
    tokens = [0]

    def on_delta(_: int, delta) -> None:  # called on the loop thread only
        tokens[0] += len(delta.token_ids)
        if delta.done:
            left[0] -= 1
            if not left[0]:
                done.set()

    wall, cpu = time.perf_counter(), time.process_time()
    scheduler.submit_many(prepared, on_delta)
    if not done.wait(600):
        raise RuntimeError("the scheduler never finished the batch")
    return time.perf_counter() - wall, time.process_time() - cpu, tokens[0]


class ProfiledScheduler(Scheduler):
    """A scheduler whose loop thread runs under cProfile (a profiler sees only the thread it runs in)."""

    profile: cProfile.Profile

    def _run(self) -> None:
        self.profile = cProfile.Profile()
        self.profile.enable()
        try:
            super()._run()
        finally:
            self.profile.disable()


def compare(
    engine: VLMEngine, rows: int, max_tokens: int, repeats: int, samplings: list[str]
) -> dict[tuple[str, str], tuple[float, float]]:
    """Median (wall tokens/s, CPU tokens/s) of each (path, sampling) side on the same `rows` requests, the
    runs alternating between the sides. `samplings`: "batched" (the engine's default) and/or "per-row"
    (`VLMEngine.batched_sampling = False`, the reference path), so both are measured in one run."""
    prepared = [engine.prepare(r) for r in make_requests(engine, rows, max_tokens)]
    scheduler = Scheduler(engine, max_rows=rows, max_queue=rows)
    sides = [(path, sampling) for sampling in samplings for path in ("engine", "scheduler")]
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {side: [] for side in sides}
    try:
        for repeat in range(repeats + 1):
            for path, sampling in sides:
                engine.batched_sampling = sampling == "batched"
                run = engine_run if path == "engine" else scheduler_run
                wall, cpu, tokens = run(engine if path == "engine" else scheduler, prepared)
                assert tokens == rows * max_tokens, (path, tokens)
                if repeat:  # repeat 0 warms up
                    runs[(path, sampling)].append((tokens / wall, tokens / cpu))
    finally:
        engine.batched_sampling = True
        scheduler.close()
    return {
        side: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
        for side, rs in runs.items()
    }


def profile(engine: VLMEngine, rows: int, max_tokens: int, top: int) -> None:
    prepared = [engine.prepare(r) for r in make_requests(engine, rows, max_tokens)]
    scheduler = ProfiledScheduler(engine, max_rows=rows, max_queue=rows)
    scheduler_run(scheduler, prepared)  # warm-up, profiled too (a small share of the calls)
    seconds, _, tokens = scheduler_run(scheduler, prepared)
    scheduler.close()
    print(f"\nprofile: scheduler loop, {rows} rows x {max_tokens} tokens ({tokens / seconds:.1f} tok/s)")
    for key in ("tottime", "cumtime"):
        out = io.StringIO()
        pstats.Stats(scheduler.profile, stream=out).sort_stats(key).print_stats(top)
        print(f"-- by {key}\n" + out.getvalue().split("\n", 6)[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-llm", "tiny-vlm"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32], help="requests per batch")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (median printed)")
    # One thread: the serving benchmark's setting, and a measurement that does not fight its neighbours.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--sampling", nargs="+", choices=["batched", "per-row"], default=["batched", "per-row"],
        help="the engine's sampling path(s) measured side by side",
    )  # fmt: skip
    parser.add_argument("--profile", type=int, default=0, metavar="K", help="also cProfile: top K lines")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.max_tokens} tokens per row")
    print("tokens/s per CPU second of the process (wall tokens/s in brackets: load on a shared box moves it)")
    print(f"{'model':<10} {'rows':>4} {'sampling':<8} {'engine':>17} {'scheduler':>17} {'sched/engine':>13}")
    engines = {
        m: VLMEngine.from_pretrained(m, device="cpu", models_dir=default_models_dir()) for m in args.models
    }
    for model, engine in engines.items():
        for rows in args.rows:
            results = compare(engine, rows, args.max_tokens, args.repeats, args.sampling)
            for sampling in args.sampling:
                (e_wall, e_cpu), (s_wall, s_cpu) = (
                    results[("engine", sampling)],
                    results[("scheduler", sampling)],
                )
                print(
                    f"{model:<10} {rows:>4} {sampling:<8} {e_cpu:>8.1f} ({e_wall:>6.1f}) {s_cpu:>8.1f} "
                    f"({s_wall:>6.1f}) {s_cpu / e_cpu:>6.2f}x ({s_wall / e_wall:.2f}x)"
                )
            if len(args.sampling) == 2:
                ratio = results[("scheduler", "batched")][1] / results[("scheduler", "per-row")][1]
                print(f"{'':<10} {'':>4} scheduler batched / per-row sampling: {ratio:.2f}x (CPU)")
    if args.profile:
        profile(engines[args.models[0]], args.rows[0], args.max_tokens, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
