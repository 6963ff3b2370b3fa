"""Live progress and the end-of-job summary of the batch inference jobs.

    counter = ProgressCounter.remote()                  # replicas call counter.add.remote(...) per block
    with ProgressBar(counter, total=rows, label="caption"):
        ds.write_parquet(...)                           # blocks while the bar updates from a thread
    summary = JobSummary.from_counts("caption", output, run_counts(new_parts), skipped, seconds, errors)
    print(summary.text()); sys.exit(summary.exit_code)   # 1 when too many rows failed (job_failed)

Ray Data runs the pipeline inside the cluster, so the driver cannot count rows itself. Each model replica
reports what it finished to one tiny counter actor (fire-and-forget, zero CPUs), and a driver thread
polls it twice a second to move a tqdm bar showing rows done, failed and rows per second. The summary
is computed from the rows actually written (their error and packing columns), not from the counter.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
from tqdm import tqdm

POLL_INTERVAL_S = 0.5  # fast enough to look live, slow enough to cost the actor nothing


@ray.remote(num_cpus=0)
class ProgressCounter:
    """Rows and failed rows reported by the model replicas, for the live bar."""

    def __init__(self) -> None:
        self.counts = {"rows": 0, "failed": 0}

    def add(self, rows: int, failed: int) -> None:
        self.counts["rows"] += rows
        self.counts["failed"] += failed

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


class ProgressBar:
    """A tqdm bar fed from a `ProgressCounter` by a background thread while the job runs."""

    def __init__(self, counter: Any, total: int | None, label: str):
        self.counter = counter
        interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            desc=label,
            unit="row",
            dynamic_ncols=True,
            file=sys.stderr,
            smoothing=0.1,
            # In a log file (CI, Ray job logs) a line every 10 s is a progress log, not a flood.
            mininterval=0.1 if interactive else 10.0,
        )
        self._failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="raybooth-progress", daemon=True)

    def _update(self) -> None:
        counts = ray.get(self.counter.snapshot.remote())
        if counts["failed"] != self._failed:
            self._failed = counts["failed"]
            self.bar.set_postfix(failed=self._failed, refresh=False)
        if counts["rows"] != self.bar.n:
            self.bar.update(counts["rows"] - self.bar.n)  # redraws at most every mininterval

    def _poll(self) -> None:
        while not self._stop.wait(POLL_INTERVAL_S):
            try:
                self._update()
            except Exception:  # the bar is cosmetic: never let it take the job down
                pass

    def __enter__(self) -> ProgressBar:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._update()
            self.bar.set_postfix(failed=self._failed, refresh=False)
        finally:
            self.bar.close()


def job_failed(rows: int, failed: int, max_error_fraction: float = 1.0) -> bool:
    """Whether a run failed as a job: every row it processed failed (it did nothing useful: a wrong model,
    a bad prompt), or more than `max_error_fraction` of them did (0: any failed row fails the job)."""
    if rows <= 0:
        return False
    return failed == rows or failed > max_error_fraction * rows + 1e-9  # exactly at the fraction passes


@dataclass
class JobSummary:
    job: str
    output: str
    rows: int  # rows processed by this run
    failed: int  # of those, rows whose error column is set
    skipped: int  # rows already in the output from earlier runs (resume)
    seconds: float
    rows_per_s: float
    padding_fraction: float  # share of the token slots this run's batches paid that held no token
    first_errors: list[str] = field(default_factory=list)  # a few distinct errors of failed rows
    max_error_fraction: float = 1.0  # the config's: more failed rows than this share fail the job

    @classmethod
    def from_counts(
        cls,
        job: str,
        output: str,
        counts: dict[str, int],
        skipped: int,
        seconds: float,
        first_errors: list[str] | None = None,
        max_error_fraction: float = 1.0,
    ) -> JobSummary:
        padded = counts.get("padded_tokens", 0)
        return cls(
            job=job,
            output=output,
            rows=counts.get("rows", 0),
            failed=counts.get("failed", 0),
            skipped=skipped,
            seconds=seconds,
            rows_per_s=counts.get("rows", 0) / seconds if seconds > 0 else 0.0,
            padding_fraction=counts.get("padding_tokens", 0) / padded if padded else 0.0,
            first_errors=list(first_errors or []),
            max_error_fraction=max_error_fraction,
        )

    @property
    def all_failed(self) -> bool:
        """Every row this run processed failed: the job did nothing useful (a wrong model, a bad prompt)."""
        return self.rows > 0 and self.failed == self.rows

    @property
    def exit_code(self) -> int:
        """The CLI's: 1 when the run failed as a job (`job_failed`), so scripts and schedulers see it; else 0."""
        return 1 if job_failed(self.rows, self.failed, self.max_error_fraction) else 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        return (
            f"raybooth {self.job}: {self.rows} rows ({self.failed} failed), {self.skipped} already done and "
            f"skipped; {self.rows_per_s:.1f} rows/s over {self.seconds:.1f}s; padding fraction "
            f"{self.padding_fraction:.3f}; output: {self.output}"
        )

    def error_text(self) -> str:
        """What went wrong, for stderr: empty unless rows failed."""
        if not self.failed:
            return ""
        if self.all_failed:
            head = f"all {self.rows} rows failed"
        elif self.exit_code:
            head = (
                f"{self.failed} of {self.rows} rows failed ({self.failed / self.rows:.1%} > max_error_fraction "
                f"{self.max_error_fraction:.1%})"
            )
        else:
            head = f"{self.failed} rows failed"
        return "\n".join(
            [f"raybooth {self.job}: {head}; first errors:"] + [f"  {e}" for e in self.first_errors]
        )
