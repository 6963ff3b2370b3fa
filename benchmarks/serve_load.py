"""Load generator for the OpenAI-compatible app: continuous vs static batching vs `max_batch_size=1`, one run.

    .venv/bin/python benchmarks/serve_load.py                       # embedded Ray, tiny models, CPU
    .venv/bin/python benchmarks/serve_load.py --image-model sd15-arch --size 512 --steps 20 --device cuda
    .venv/bin/python benchmarks/serve_load.py --route chat --concurrency 32 --min-tokens 8 --max-tokens 256
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key KEY   # a running server

Without `--url` it starts an embedded Ray and deploys `raybooth.serving.app` three times: chat with
continuous batching (`chat.scheduler: continuous`, rows join and leave at every decode step), then
static batching (`chat.scheduler: static`, `@serve.batch` batches; the image route's dynamic batching),
both with `max_batch_size` = concurrency, then `max_batch_size=1`. It drives the routes at `--concurrency`
with an asyncio client each time (the image route has no scheduler, so it runs in the last two only) and
prints every run and the ratios. With `--min-tokens` each chat request's `max_tokens` is drawn (seeded)
from `[--min-tokens, --max-tokens]`, the mixed answer lengths under which static batches lose most.

Metrics follow vLLM's serving benchmark: TTFT = request start to the first content chunk; ITL = the
gaps between successive content chunks of a stream; TPOT = (E2E - TTFT) / (output tokens - 1) per
request; E2E = request start to the last byte; throughput = completed work / wall time of the whole
run (images/s, output tokens/s from `usage`, requests/s). Requests are all issued at once and a
semaphore keeps `--concurrency` in flight (vLLM's `--max-concurrency` with request rate inf).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from raybooth.cluster.workdir import default_models_dir


@dataclass
class RequestResult:
    ok: bool
    e2e_s: float
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    images: int = 0
    error: str = ""


@dataclass
class RunResult:
    route: str
    label: str
    duration_s: float
    results: list[RequestResult]

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    def throughput(self) -> float:
        """images/s for the image route, output tokens/s for chat."""
        work = sum(r.images if self.route == "images" else r.output_tokens for r in self.ok)
        return work / self.duration_s


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


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
    base_url: str, api_key: str | None, route: str, model: str, label: str, args: argparse.Namespace
) -> RunResult:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=600, limits=limits) as http:
        call = image_request if route == "images" else chat_request
        await call(http, model, "warm up", 0, args)  # loads the model; not measured
        gate = asyncio.Semaphore(args.concurrency)

        async def one(i: int) -> RequestResult:
            async with gate:
                return await call(http, model, f"a photo of sks dog number {i}", 1000 + i, args)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(args.requests)))
        return RunResult(route, label, time.perf_counter() - start, list(results))


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def summarize(run: RunResult) -> dict[str, Any]:
    ok = run.ok
    ms = [r.e2e_s * 1000 for r in ok]
    row: dict[str, Any] = {
        "route": run.route,
        "config": run.label,
        "ok": f"{len(ok)}/{len(run.results)}",
        "throughput": run.throughput(),
        "unit": "images/s" if run.route == "images" else "tok/s",
        "req/s": len(ok) / run.duration_s,
        "e2e p50 ms": percentile(ms, 50),
        "e2e p99 ms": percentile(ms, 99),
    }
    if run.route == "chat":
        ttft = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
        itl = [x * 1000 for r in ok for x in r.itl_s]
        tpot = [
            (r.e2e_s - r.ttft_s) * 1000 / (r.output_tokens - 1)
            for r in ok
            if r.ttft_s is not None and r.output_tokens > 1
        ]
        row.update({
            "ttft p50 ms": percentile(ttft, 50), "ttft p99 ms": percentile(ttft, 99),
            "itl p50 ms": percentile(itl, 50), "itl p99 ms": percentile(itl, 99),
            "tpot mean ms": statistics.fmean(tpot) if tpot else float("nan"),
        })  # fmt: skip
    errors = {r.error for r in run.results if not r.ok}
    if errors:
        row["errors"] = "; ".join(sorted(errors))[:300]
    return row


def print_rows(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        parts = [f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()]
        print("  " + "  ".join(parts))


# --------------------------------------------------------------------------------------------------
# Embedded server, deployed twice
# --------------------------------------------------------------------------------------------------


CONFIGS = (  # label, max_batch_size (None: the concurrency), chat scheduler
    ("continuous batching", None, "continuous"),
    ("static batching", None, "static"),
    ("max_batch_size=1", 1, "static"),
)


def settings_for(args: argparse.Namespace, max_batch_size: int, scheduler: str) -> dict[str, Any]:
    batching = {
        "max_batch_size": max_batch_size,
        "max_ongoing_requests": max(16, 2 * args.concurrency),
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


def run_embedded(args: argparse.Namespace) -> list[RunResult]:
    import ray
    from ray import serve

    from raybooth.cluster.config import ClusterSection
    from raybooth.cluster.runtime import init_ray
    from raybooth.models.presets import resolve_model
    from raybooth.serving.app import build_app

    for name in (args.image_model, args.chat_model):
        resolve_model(name, models_dir=default_models_dir())  # build presets once, before replicas race to
    # One whole CPU per model replica (its torch threads); the ingress takes none.
    init_ray(ClusterSection(num_cpus=args.num_cpus or max(2, os.cpu_count() or 2)))
    port = args.port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs = []
    try:
        for label, max_batch, scheduler in CONFIGS:
            routes = [r for r in ("images", "chat") if args.route in (r, "both")]
            if scheduler == "continuous":
                routes = [r for r in routes if r == "chat"]  # the image route does not change
            if not routes:
                continue
            t = time.perf_counter()
            serve.run(
                build_app({"settings": settings_for(args, max_batch or args.concurrency, scheduler)}),
                name="raybooth-bench",
                route_prefix="/",
            )
            print(f"deployed with {label} in {time.perf_counter() - t:.0f}s", flush=True)
            for route, model in (("images", args.image_model), ("chat", args.chat_model)):
                if route in routes:
                    runs.append(
                        asyncio.run(drive(f"http://127.0.0.1:{port}", None, route, model, label, args))
                    )
                    print_rows([summarize(runs[-1])])
    finally:
        serve.shutdown()
        ray.shutdown()
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help="benchmark a running server instead (one configuration, no ratio)")
    p.add_argument("--api-key", help="Bearer key for --url")
    p.add_argument("--route", choices=["images", "chat", "both"], default="both")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--requests", type=int, default=32, help="requests per route and configuration")
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
    args = p.parse_args(argv)

    if args.url:
        for route, model in (("images", args.image_model), ("chat", args.chat_model)):
            if args.route in (route, "both"):
                print_rows(
                    [summarize(asyncio.run(drive(args.url, args.api_key, route, model, "as deployed", args)))]
                )
        return 0

    runs = run_embedded(args)
    tokens = f"{args.max_tokens}" if args.min_tokens is None else f"{args.min_tokens}-{args.max_tokens}"
    print(f"\nserve_load: concurrency {args.concurrency}, {args.requests} requests per route and config, "
          f"images {args.size}x{args.size} x {args.steps} steps ({args.image_model}), chat max_tokens "
          f"{tokens} ({args.chat_model}), device {args.device}")  # fmt: skip
    print_rows([summarize(r) for r in runs])
    print_ratios(runs)
    return 0


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def print_ratios(runs: list[RunResult]) -> None:
    by = {(r.route, r.label): r for r in runs}
    static, single = by.get(("images", "static batching")), by.get(("images", "max_batch_size=1"))
    if static and single:
        print(f"images: {static.throughput():.2f} vs {single.throughput():.2f} images/s -> dynamic batching "
              f"ratio {ratio(static.throughput(), single.throughput()):.2f}x")  # fmt: skip
    chat = {label: by[("chat", label)] for label, _, _ in CONFIGS if ("chat", label) in by}
    cont, static, single = (chat.get(label) for label, _, _ in CONFIGS)
    if cont and static:
        p99 = [percentile([x.ttft_s for x in r.ok if x.ttft_s is not None], 99) for r in (cont, static)]
        print(f"chat: continuous {cont.throughput():.2f} vs static {static.throughput():.2f} output tok/s -> "
              f"ratio {ratio(cont.throughput(), static.throughput()):.2f}x; TTFT p99 {p99[0] * 1000:.0f} vs "
              f"{p99[1] * 1000:.0f} ms -> ratio {ratio(p99[0], p99[1]):.2f}x")  # fmt: skip
    for label, run in (("continuous", cont), ("static", static)):
        if run and single:
            print(f"chat: {label} {run.throughput():.2f} vs max_batch_size=1 {single.throughput():.2f} output "
                  f"tok/s -> ratio {ratio(run.throughput(), single.throughput()):.2f}x")  # fmt: skip

    return 0


if __name__ == "__main__":
    sys.exit(main())
