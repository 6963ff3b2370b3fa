"""Load generator for the OpenAI-compatible app: continuous vs static batching vs `max_batch_size=1`, one run.

    .venv/bin/python benchmarks/serve_load.py                       # embedded Ray, tiny models, CPU
    .venv/bin/python benchmarks/serve_load.py --image-model sd15-arch --size 512 --steps 20 --device cuda
    .venv/bin/python benchmarks/serve_load.py --route chat --chat-model tiny-llm --concurrency 1,8,32 \\
        --min-tokens 8 --max-tokens 256 --requests 32 --peer transformers        # issue 15's comparison
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key KEY   # a running server

Without `--url` it starts an embedded Ray and deploys `raybooth.serving.app` three times: chat with
continuous batching (`chat.scheduler: continuous`, rows join and leave at every decode step), then
static batching (`chat.scheduler: static`, `@serve.batch` batches; the image route's dynamic batching),
both with `max_batch_size` = the highest `--concurrency`, then `max_batch_size=1`; all three with Serve in
its high-throughput mode (`ingress.high_throughput`, the default: HAProxy in front of the ingress);
`--configs in-ingress` adds continuous batching with `chat.placement: ingress` (an engine in each of
`--ingress-replicas` ingress replicas, so no request or chunk crosses a deployment hop). Then a
second embedded Ray serves continuous batching through Serve's Python proxy (`python-proxy`, the mode
off), to show what the mode buys. Each deployment is
driven at every level of `--concurrency` (a list, e.g. `1,8,32`) by an asyncio client (the image route
has no scheduler, so it runs in the last two only). With `--min-tokens` each chat request's `max_tokens`
is drawn (seeded by the request's index) from `[--min-tokens, --max-tokens]`, the mixed answer lengths
under which static batches lose most; every configuration gets the same prompts and draws.

`--peer transformers` then starts `transformers serve --continuous-batching` on the same model folder on
a free loopback port (`serve_load_peer.py` says how, and what it does with a VLM), drives it with the same
chat load at every level, and stops it; `--peer-python` names the interpreter that has
`transformers[serving]` (default: this one). If the peer cannot run, the reason is printed and the rest
goes on. At the end: one table (configuration x concurrency: output tok/s, TTFT p50/p99, ITL p99), the
ratios per level, and issue 15's targets at the highest level, PASS/MISS (printed, not asserted).
Metrics are vLLM's (see `serve_load_report.py`). Requests are all issued at once and a semaphore keeps
the level's count in flight (vLLM's `--max-concurrency` with request rate inf).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from serve_load_peer import PeerError, start_peer, stop_peer
from serve_load_report import (
    CONTINUOUS,
    IN_INGRESS,
    PEER,
    PYTHON_PROXY,
    SINGLE,
    STATIC,
    RequestResult,
    RunResult,
    print_ratios,
    print_rows,
    print_table,
    print_targets,
    summarize,
)

from raybooth.cluster.workdir import default_models_dir

# --------------------------------------------------------------------------------------------------
# One request of each kind
# --------------------------------------------------------------------------------------------------


async def image_request(
    http: httpx.AsyncClient, model: str, prompt: str, seed: int, args: argparse.Namespace
) -> RequestResult:
    body = {"model": model, "prompt": prompt, "n": 1, "size": f"{args.size}x{args.size}", "response_format": "b64_json",
            "num_inference_steps": args.steps, "seed": seed}  # fmt: skip
    start = time.perf_counter()
    try:
        resp = await http.post("/v1/images/generations", json=body)
    except httpx.HTTPError as e:
        return RequestResult(False, time.perf_counter() - start, error=str(e))
    e2e = time.perf_counter() - start
    if resp.status_code != 200:
        return RequestResult(False, e2e, error=f"{resp.status_code} {resp.text[:200]}")
    return RequestResult(True, e2e, images=len(resp.json()["data"]))


async def chat_request(
    http: httpx.AsyncClient, model: str, prompt: str, seed: int, args: argparse.Namespace
) -> RequestResult:
    low = args.max_tokens if args.min_tokens is None else args.min_tokens
    max_tokens = random.Random(seed).randint(low, args.max_tokens)  # the same draw for every config
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.8, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    result = RequestResult(False, 0.0)
    last = start
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                result.error = f"{resp.status_code} {(await resp.aread())[:200]!r}"
                result.e2e_s = time.perf_counter() - start
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("error"):
                    result.error = chunk["error"]["message"]
                    break
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    now = time.perf_counter()
                    if result.ttft_s is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        result.error = str(e)
    result.e2e_s = time.perf_counter() - start
    result.ok = not result.error
    return result


async def drive(
    base_url: str,
    api_key: str | None,
    route: str,
    model: str,
    label: str,
    concurrency: int,
    args: argparse.Namespace,
    warm_up: bool = True,
    on_start: Callable[[], None] | None = None,
) -> RunResult:
    """`requests` calls at `concurrency`, after one unmeasured warm-up call; `on_start` runs just before
    the measured calls (after the warm-up)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=600, limits=limits) as http:
        call = image_request if route == "images" else chat_request
        if warm_up:
            await call(http, model, "warm up", 0, args)  # loads the model; not measured
        if on_start is not None:
            on_start()
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> RequestResult:
            async with gate:
                return await call(http, model, f"a photo of sks dog number {i}", 1000 + i, args)

        start, busy = time.perf_counter(), busy_cpu_s()
        results = await asyncio.gather(*(one(i) for i in range(args.requests)))
        duration_s, after = time.perf_counter() - start, busy_cpu_s()
        cpu_s = after - busy if after is not None and busy is not None else None
        return RunResult(route, label, concurrency, duration_s, list(results), cpu_s)


def busy_cpu_s() -> float | None:
    """Seconds all this machine's CPUs have been busy since boot (Linux /proc/stat: user, nice, system,
    irq, softirq; not idle, iowait or steal), or None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------------
# Embedded server, deployed once per configuration; the peer
# --------------------------------------------------------------------------------------------------


# --configs name, label, max_batch_size (None: the highest concurrency), chat scheduler, high-throughput Serve,
# chat.placement
CONFIGS = (
    ("continuous", CONTINUOUS, None, "continuous", True, "deployment"),
    ("in-ingress", IN_INGRESS, None, "continuous", True, "ingress"),
    ("python-proxy", PYTHON_PROXY, None, "continuous", False, "deployment"),
    ("static", STATIC, None, "static", True, "deployment"),
    ("single", SINGLE, 1, "static", True, "deployment"),
)
CONFIG_KEYS = tuple(c[0] for c in CONFIGS)


def parse_configs(text: str) -> list[str]:
    """`"continuous,single"` -> those CONFIGS, by `CONFIG_KEYS` name."""
    keys = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [k for k in keys if k not in CONFIG_KEYS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"--configs takes a list of {', '.join(CONFIG_KEYS)}, not {text!r}")
    return keys


def settings_for(
    args: argparse.Namespace, max_batch_size: int, scheduler: str, placement: str = "deployment"
) -> dict[str, Any]:
    batching = {
        "max_batch_size": max_batch_size,
        "max_ongoing_requests": max(16, 2 * max(args.concurrency)),
        "max_queued_requests": -1,  # measure throughput, not backpressure
    }
    device = {"device": args.device, "num_gpus": 1 if args.device == "cuda" else 0}
    dtype = "float16" if args.device == "cuda" else "auto"
    return {
        "chat_model": args.chat_model,
        "image_models": [args.image_model],
        "serve_registry": False,
        "ingress": {"num_cpus": 0},  # so the two model replicas' whole CPUs fit a 2-core machine
        "image": {
            **batching,
            **device,
            "num_cpus": 1,
            "batch_wait_timeout_s": 0.05,
            "dtype": dtype,
            "default_size": f"{args.size}x{args.size}",
            "batch_invariant": args.batch_invariant,
        },  # fmt: skip
        "chat": {
            **batching,
            **device,
            "num_cpus": 1,
            "max_concurrent_batches": 1,
            "batch_wait_timeout_s": 0.02,
            "dtype": dtype,
            "scheduler": scheduler,
            "stream_interval": args.stream_interval,
            "placement": placement,
        },
        "limits": {
            "max_n": 1,
            "max_image_side": max(1024, args.size),
            "max_tokens": max(1024, args.max_tokens),
        },
        "safety": {
            "enabled": False
        },  # the policy's stream holdback would shift TTFT; batching is measured here
    }


def decode_steps(url: str) -> int:
    """The chat replica's decode steps so far (`/v1/internal/stats`; one replica in these runs)."""
    response = httpx.get(f"{url}/v1/internal/stats", timeout=30)
    response.raise_for_status()
    return int(response.json()["chat"].get("decode_steps", 0))


def print_rows_per_step(run: RunResult, steps: int) -> None:
    """Output tokens per decode step of the run (`steps`: the steps of its measured requests, not of the
    warm-up, which decodes alone): how full the running batch was kept; at concurrency N it is at most N."""
    tokens = sum(r.output_tokens for r in run.ok)
    if steps > 0:
        print(f"  {steps} decode steps, {tokens / steps:.1f} output tokens per step", flush=True)


def run_embedded(args: argparse.Namespace) -> list[RunResult]:
    """The embedded configurations, each mode of Serve in its own embedded Ray (its processes read the mode
    when they start): high-throughput first (ingress.high_throughput, the default), then the Python proxy."""
    from raybooth.models.presets import resolve_model

    for name in (args.image_model, args.chat_model):
        resolve_model(name, models_dir=default_models_dir())  # build presets once, before replicas race to
    runs: list[RunResult] = []
    for high_throughput in (True, False):
        configs = [c for c in CONFIGS if c[0] in args.configs and c[4] == high_throughput]
        if configs:
            runs += _run_configs(args, configs, high_throughput)
    return runs


def _run_configs(args: argparse.Namespace, configs: list[tuple], high_throughput: bool) -> list[RunResult]:
    import ray
    from ray import serve

    from raybooth.cluster.config import ClusterSection
    from raybooth.cluster.runtime import init_ray
    from raybooth.serving.app import build_app
    from raybooth.serving.high_throughput import high_throughput_env

    # One whole CPU per model replica (its torch threads); the ingress takes none.
    init_ray(
        ClusterSection(num_cpus=args.num_cpus or max(2, os.cpu_count() or 2)),
        env=high_throughput_env(high_throughput),
    )
    port = args.port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs = []
    try:
        for _key, label, max_batch, scheduler, _, placement in configs:
            routes = [r for r in ("images", "chat") if args.route in (r, "both")]
            if scheduler == "continuous":
                routes = [r for r in routes if r == "chat"]  # the image route does not change
            if not routes:
                continue
            t = time.perf_counter()
            settings = settings_for(args, max_batch or max(args.concurrency), scheduler, placement)
            settings["ingress"]["high_throughput"] = high_throughput
            # An engine per ingress replica, sharing the CPUs the image replica leaves.
            if placement == "ingress":
                replicas = max(1, args.ingress_replicas)
                settings["ingress"]["autoscaling"] = {"min_replicas": replicas, "max_replicas": replicas}
                left = ray.cluster_resources().get("CPU", 2) - settings["image"]["num_cpus"]
                settings["chat"]["num_cpus"] = max(0.1, left / replicas)
            serve.run(build_app({"settings": settings}), name="raybooth-bench", route_prefix="/")
            print(f"deployed with {label} in {time.perf_counter() - t:.0f}s", flush=True)
            for i, level in enumerate(args.concurrency):
                for route, model in (("images", args.image_model), ("chat", args.chat_model)):
                    if route in routes:
                        url = f"http://127.0.0.1:{port}"
                        before: list[int] = []  # the engine's decode steps once the warm-up is done
                        # (one engine: with an engine per ingress replica, stats show one of them)
                        counted = route == "chat" and scheduler == "continuous" and placement == "deployment"
                        on_start = (lambda b=before, u=url: b.append(decode_steps(u))) if counted else None
                        run = asyncio.run(
                            drive(url, None, route, model, label, level, args, i == 0, on_start)
                        )
                        runs.append(run)
                        print_rows([summarize(run)])
                        if before:
                            print_rows_per_step(run, decode_steps(url) - before[0])
    finally:
        serve.shutdown()
        ray.shutdown()
    return runs


def run_peer(args: argparse.Namespace) -> tuple[list[RunResult], str]:
    """The same chat load against `transformers serve --continuous-batching`; ([], why) if it cannot run."""
    from raybooth.models.presets import resolve_model

    folder = str(Path(resolve_model(args.chat_model, models_dir=default_models_dir())).resolve())
    t = time.perf_counter()
    try:
        peer = start_peer(args.peer_python, folder, args.device, args.peer_threads)
    except PeerError as e:
        return [], str(e)
    print(f"started {PEER} on {peer.url} in {time.perf_counter() - t:.0f}s (log {peer.log_path})", flush=True)
    runs = []
    try:
        for i, level in enumerate(args.concurrency):
            run = asyncio.run(drive(peer.url, None, "chat", peer.model, PEER, level, args, warm_up=i == 0))
            runs.append(run)
            print_rows([summarize(run)])
    finally:
        stop_peer(peer)
    failed = [r for r in runs if len(r.ok) < len(r.results)]
    note = f"{len(failed)} peer run(s) had failed requests; its log: {peer.log_path}" if failed else ""
    return runs, note


def parse_levels(text: str) -> list[int]:
    """`"1,8,32"` -> [1, 8, 32]: the concurrency levels, each run for every configuration."""
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--concurrency takes integers like 1,8,32, not {text!r}") from e
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"--concurrency takes positive integers like 1,8,32, not {text!r}")
    return levels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help="benchmark a running server instead (one configuration, no ratio)")
    p.add_argument("--api-key", help="Bearer key for --url")
    p.add_argument("--route", choices=["images", "chat", "both"], default="both")
    p.add_argument(
        "--concurrency",
        type=parse_levels,
        default=[8],
        help="requests in flight, one or a list: 1,8,32 (default 8)",
    )
    p.add_argument(
        "--configs",
        type=parse_configs,
        default=list(CONFIG_KEYS),
        help="which embedded configurations to deploy: continuous,python-proxy,static,single (default all)",
    )
    p.add_argument(
        "--stream-interval",
        type=lambda x: x if x == "auto" else int(x),
        default="auto",
        help="chat.stream_interval of the continuous deployment: tokens per streamed chunk, or auto (default)",
    )
    p.add_argument(
        "--ingress-replicas",
        type=int,
        default=2,
        help="in-ingress: ingress replicas, each with its own engine (default 2: one per core of a 2-core box)",
    )
    p.add_argument("--requests", type=int, default=32, help="requests per route, configuration and level")
    p.add_argument("--image-model", default="tiny-sd", help="preset, path or registered model")
    p.add_argument("--chat-model", default="tiny-vlm")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--steps", type=int, default=4, help="num_inference_steps")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--min-tokens", type=int, default=None, help="draw chat max_tokens from [min, max] (default: all max)"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--no-batch-invariant",
        dest="batch_invariant",
        action="store_false",
        help="images: fully batched kernels (faster; bytes then depend on the batch up to rounding)",
    )
    p.add_argument(
        "--num-cpus", type=int, default=None, help="embedded Ray logical CPUs (default: all, at least 2)"
    )
    p.add_argument("--port", type=int, default=8011, help="HTTP port of the embedded server")
    p.add_argument("--peer", choices=["transformers"], help="also drive this server with the same chat load")
    p.add_argument(
        "--peer-python",
        default=sys.executable,
        help="interpreter with transformers[serving] (default: this one)",
    )
    p.add_argument(
        "--peer-threads",
        type=int,
        default=1,
        help="the peer's OMP_NUM_THREADS (default 1, as the chat replica's one Ray CPU; 0: leave unset)",
    )
    args = p.parse_args(argv)

    if args.url:
        for level in args.concurrency:
            for route, model in (("images", args.image_model), ("chat", args.chat_model)):
                if args.route in (route, "both"):
                    run = asyncio.run(drive(args.url, args.api_key, route, model, "as deployed", level, args))
                    print_rows([summarize(run)])
        return 0

    runs = run_embedded(args)
    peer_missing = ""  # why the peer's targets were not measured
    if args.peer and args.route in ("chat", "both"):
        peer_runs, peer_note = run_peer(args)
        runs += peer_runs
        if not peer_runs:
            peer_missing = f"{PEER} could not run: {peer_note}"
        elif peer_note:
            print(f"note: {peer_note}")
    tokens = f"{args.max_tokens}" if args.min_tokens is None else f"{args.min_tokens}-{args.max_tokens}"
    levels = ",".join(map(str, args.concurrency))
    print(f"\nserve_load: concurrency {levels}, {args.requests} requests per route, config and level, images "
          f"{args.size}x{args.size} x {args.steps} steps ({args.image_model}), chat max_tokens {tokens} "
          f"({args.chat_model}), device {args.device}")  # fmt: skip
    print_table(runs)
    print_ratios(runs)
    print_targets(runs, mixed_lengths=args.min_tokens is not None, peer_missing=peer_missing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
