"""What `serve_load.py` measured, as results, one table, ratios and the issue's target checks.

    .venv/bin/python benchmarks/serve_load.py --route chat --concurrency 1,8,32 --min-tokens 8 --max-tokens 256

Metrics follow vLLM's serving benchmark: TTFT = request start to the first content chunk; ITL = the gaps
between successive content chunks of a stream; TPOT = (E2E - TTFT) / (output tokens - 1) per request;
E2E = request start to the last byte; throughput = completed work / wall time of the whole run (images/s,
output tokens/s from `usage`, requests/s). The targets (issue 15) are printed PASS/MISS, never asserted.
Beside them, the CPU the whole machine was busy for per 1000 output tokens (Linux's /proc/stat over the
measured calls: server, client and anything else running; a neighbour's load on a shared host shows as
steal, not busy): on a box whose wall-clock figures move by tens of percent between minutes, the cost
of a token moves far less, so changes to the serving path are compared with it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

CONTINUOUS, STATIC, SINGLE = "continuous batching", "static batching", "max_batch_size=1"
PYTHON_PROXY = "continuous, Serve's Python proxy"  # ingress.high_throughput off
IN_INGRESS = "continuous, engine in each ingress"  # chat.placement: ingress
PEER = "transformers serve --continuous-batching"


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
    concurrency: int
    duration_s: float
    results: list[RequestResult]
    cpu_s: float | None = None  # the machine's busy CPU seconds over the measured calls (None: unknown)

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    def throughput(self) -> float:
        """images/s for the image route, output tokens/s for chat."""
        work = sum(r.images if self.route == "images" else r.output_tokens for r in self.ok)
        return work / self.duration_s

    def cpu_ms_per_1k(self) -> float:
        """Busy CPU milliseconds of the whole machine per 1000 output tokens (chat) or per image."""
        work = sum(r.images if self.route == "images" else r.output_tokens / 1000 for r in self.ok)
        return self.cpu_s * 1000 / work if self.cpu_s is not None and work else float("nan")

    def ttft_ms(self, q: float) -> float:
        return percentile([r.ttft_s * 1000 for r in self.ok if r.ttft_s is not None], q)

    def itl_ms(self, q: float) -> float:
        return percentile([x * 1000 for r in self.ok for x in r.itl_s], q)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def summarize(run: RunResult) -> dict[str, Any]:
    """Every metric of one run (one configuration at one concurrency), for the progress lines."""
    ok = run.ok
    ms = [r.e2e_s * 1000 for r in ok]
    row: dict[str, Any] = {
        "route": run.route,
        "config": run.label,
        "concurrency": run.concurrency,
        "ok": f"{len(ok)}/{len(run.results)}",
        "throughput": run.throughput(),
        "unit": "images/s" if run.route == "images" else "tok/s",
        "req/s": len(ok) / run.duration_s,
        "e2e p50 ms": percentile(ms, 50),
        "e2e p99 ms": percentile(ms, 99),
        "cpu ms per " + ("image" if run.route == "images" else "1k tok"): run.cpu_ms_per_1k(),
    }
    if run.route == "chat":
        tpot = [
            (r.e2e_s - r.ttft_s) * 1000 / (r.output_tokens - 1)
            for r in ok
            if r.ttft_s is not None and r.output_tokens > 1
        ]
        row.update({
            "ttft p50 ms": run.ttft_ms(50), "ttft p99 ms": run.ttft_ms(99),
            "itl p50 ms": run.itl_ms(50), "itl p99 ms": run.itl_ms(99),
            "tpot mean ms": statistics.fmean(tpot) if tpot else float("nan"),
        })  # fmt: skip
    errors = {r.error for r in run.results if not r.ok}
    if errors:
        row["errors"] = "; ".join(sorted(errors))[:300]
    return row


def print_rows(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        parts = [f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()]
        print("  " + "  ".join(parts), flush=True)


def print_table(runs: list[RunResult]) -> None:
    """One line per configuration and concurrency: the issue's four figures (chat) or images/s."""
    chat = [r for r in runs if r.route == "chat"]
    if chat:
        print(f"{'config':<42}{'conc':>5}{'ok':>7}{'out tok/s':>11}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}"
              f"{'ITL p99 ms':>12}{'CPU ms/1k tok':>15}")  # fmt: skip
        for r in chat:
            print(f"{r.label:<42}{r.concurrency:>5}{len(r.ok):>4}/{len(r.results):<2}{r.throughput():>11.1f}"
                  f"{r.ttft_ms(50):>13.0f}{r.ttft_ms(99):>13.0f}{r.itl_ms(99):>12.0f}"
                  f"{r.cpu_ms_per_1k():>15.0f}")  # fmt: skip
    for r in (r for r in runs if r.route == "images"):
        print(f"images  {r.label:<34}{r.concurrency:>5}{len(r.ok):>4}/{len(r.results):<2}"
              f"{r.throughput():>11.2f} images/s")  # fmt: skip


def print_ratios(runs: list[RunResult]) -> None:
    """Per concurrency: continuous / the Python-proxy path, / static and / max_batch_size=1 (tok/s, TTFT
    p99), and / the peer."""
    by = {(r.route, r.label, r.concurrency): r for r in runs}
    for level in sorted({r.concurrency for r in runs}):
        static, single = by.get(("images", STATIC, level)), by.get(("images", SINGLE, level))
        if static and single:
            print(f"images @{level}: dynamic / max_batch_size=1 {ratio(static.throughput(), single.throughput()):.2f}x "
                  f"({static.throughput():.2f} vs {single.throughput():.2f} images/s)")  # fmt: skip
        for mine, others in (
            (CONTINUOUS, (PYTHON_PROXY, STATIC, SINGLE, PEER)),
            (IN_INGRESS, (CONTINUOUS, PEER)),
        ):
            cont = by.get(("chat", mine, level))
            for label in others if cont else ():
                other = by.get(("chat", label, level))
                if other:
                    print(f"chat @{level}: {mine} / {label}: tok/s {ratio(cont.throughput(), other.throughput()):.2f}x "
                          f"({cont.throughput():.1f} vs {other.throughput():.1f}), TTFT p99 "
                          f"{ratio(cont.ttft_ms(99), other.ttft_ms(99)):.2f}x ({cont.ttft_ms(99):.0f} vs "
                          f"{other.ttft_ms(99):.0f} ms)")  # fmt: skip


def target_checks(runs: list[RunResult], mixed_lengths: bool) -> list[tuple[str, bool, str]]:
    """Issue 15's targets at the highest concurrency run: (target, passed, figures)."""
    chat = [r for r in runs if r.route == "chat"]
    if not chat:
        return []
    level = max(r.concurrency for r in chat)
    by = {r.label: r for r in chat if r.concurrency == level}
    static, peer = by.get(STATIC), by.get(PEER)
    where = f"@{level}{'' if mixed_lengths else ' (not mixed lengths: pass --min-tokens)'}"
    checks: list[tuple[str, bool, str]] = []
    # static batching: 2x its tokens/s and half its TTFT p99; the peer: 2x its tokens/s, TTFT p99 no worse
    pairs = [
        ("continuous", by.get(CONTINUOUS), static, "static", 0.5),
        ("continuous", by.get(CONTINUOUS), peer, "transformers serve", 1.0),
        ("in-ingress", by.get(IN_INGRESS), peer, "transformers serve", 1.0),
    ]
    for mine, cont, other, name, ttft_goal in pairs:
        if not (cont and other):
            continue
        tok, ttft = ratio(cont.throughput(), other.throughput()), ratio(cont.ttft_ms(99), other.ttft_ms(99))
        checks.append((f"tok/s {mine} / {name} {where}", tok >= 2, f"{tok:.2f}x, target >= 2"))
        checks.append(
            (
                f"TTFT p99 {mine} / {name} {where}",
                ttft <= ttft_goal,
                f"{ttft:.2f}x, target <= {ttft_goal:g}",
            )
        )
    return checks


def print_targets(runs: list[RunResult], mixed_lengths: bool, peer_missing: str = "") -> None:
    for name, passed, figures in target_checks(runs, mixed_lengths):
        print(f"target {'PASS' if passed else 'MISS'}: {name}: {figures}")
    if peer_missing:
        print(f"target not measured: the transformers serve targets ({peer_missing})")
