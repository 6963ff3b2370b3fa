"""How a batch-job replica generates one call's rows, and the padding each row really paid.

    scheduler = Scheduler(engine, max_rows=8, max_queue=64, prefill_token_budget=8192)
    outcomes = generate_continuous(scheduler, {0: prepared_a, 1: prepared_b})   # {index: (result, RowStats)}
    outcomes = generate_static(engine, prepared, pack_by_token_budget(items, 8, 8192))

Two ways, chosen by the job's `scheduler` key:

- continuous (the default): the call's rows go to the replica's `vlm_scheduler.Scheduler` as one group
  (`submit_many`, sorted by image count and prompt length so rows admitted together pad little). Up to
  `max_rows` decode together; a finished row's slot is taken at the next step by the call's next waiting
  row, so the batch stays full until the call's last rows drain. The synchronous `__call__` of the Ray
  Data worker simply waits for the rows' last deltas: the scheduler's own thread runs the loop, so no
  event loop is needed, and the rows' outputs are batch-independent (greedy: the same as alone).
- static: the call's rows are packed (`models/packing.py`) and each packed batch decodes to its slowest
  row (`VLMEngine.generate_stream`) before the next starts.

What a row paid, measured the same way both ways, in token slots the model ran:
- `padding_tokens`: pads its prompt got in its prefill (left-padded to the longest prompt prefilled with
  it: its packed batch, or the rows the scheduler admitted in the same step).
- `decode_steps` / `idle_slot_steps`: the decode steps it sampled at, and the steps its batch slot then sat
  empty: static, until the batch's slowest row finished; continuous, until a waiting row took the slot (the
  earliest-vacated slot is taken first), or until the call's last row finished. On an accelerator a decode
  step costs about the same whatever rows it holds, so an empty slot is paid in time.
The job's padding fraction is (prompt pads + idle slots) / (padded prompt tokens + decode steps + idle
slots) over its rows (`parts.run_counts`). Cache columns the scheduler's merges left-pad are not counted:
they cost attention reads, never a forward pass of their own. No Ray here.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field

from raybooth.models.packing import PackedBatch
from raybooth.models.vlm_engine import SERVER_ERROR, GenerationResult, PreparedRequest, VLMEngine
from raybooth.models.vlm_requests import StreamDelta, TokenLogprob
from raybooth.models.vlm_scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass
class RowStats:
    generate_ms: float = 0.0  # static: the wall time of its batch; continuous: queued to its last token
    batch_rows: int = 0  # rows decoding with it when it started (0: it never joined a batch)
    batch_padding_fraction: float = 0.0  # share of the token slots held for this row that carried no token
    padding_tokens: int = 0  # pads added to its prompt in its prefill
    decode_steps: int = 0  # decode steps it sampled at
    idle_slot_steps: int = 0  # steps its batch slot sat empty after its last one (see the module doc)
    server_error: bool = False  # the whole batch failed in the model (not the row's fault)


@dataclass
class RowRun:
    """One row's deltas gathered into its result, with the decode steps it sampled at."""

    prepared: PreparedRequest
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    first_step: int | None = None
    last_step: int | None = None
    result: GenerationResult | None = None
    finished_at: float = 0.0

    def add(self, delta: StreamDelta, step: int) -> None:
        # A step counts when the row sampled at it; an error before its first token (refused at admission)
        # held no slot.
        if delta.token_ids or self.first_step is not None:
            self.first_step = step if self.first_step is None else self.first_step
            self.last_step = step
        self.text.append(delta.text)
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        if delta.done:
            self.finished_at = time.perf_counter()
            self.result = GenerationResult(
                text="".join(self.text),
                finish_reason=delta.finish_reason,
                prompt_tokens=delta.prompt_tokens,
                completion_tokens=delta.completion_tokens,
                token_ids=self.token_ids,
                error=delta.error,
                logprobs=self.logprobs if self.prepared.params.logprobs is not None else None,
                error_type=delta.error_type,
            )

    @property
    def decode_steps(self) -> int:
        return (
            0 if self.first_step is None or self.last_step is None else self.last_step - self.first_step + 1
        )


def idle_slot_steps(spans: dict[int, tuple[int, int]], end: int) -> dict[int, int]:
    """Steps each row's slot sat empty after its last step: `spans` are `(first, last)` steps per row;
    a row starting at step s takes the earliest slot vacated before s, else a slot of its own; a slot
    nobody took stays empty until `end`, the last step run."""
    idle = dict.fromkeys(spans, 0)
    vacated: list[tuple[int, int]] = []  # (last step, row): a heap, the earliest-vacated slot first
    for index, (first, last) in sorted(spans.items(), key=lambda item: item[1][0]):
        if vacated and vacated[0][0] < first:
            left, previous = heapq.heappop(vacated)
            idle[previous] = first - 1 - left
        heapq.heappush(vacated, (last, index))
    for left, previous in vacated:
        idle[previous] = end - left
    return idle


def _row_stats(
    runs: dict[int, RowRun], spans_of: Iterable[int], end: int, generate_ms: dict[int, float]
) -> dict[int, RowStats]:
    """Padding, slots and batch rows of the rows in `spans_of` (one static batch, or one call)."""
    spans = {i: (runs[i].first_step, runs[i].last_step) for i in spans_of if runs[i].first_step is not None}
    idle = idle_slot_steps(spans, end)  # type: ignore[arg-type]  # spans hold ints (filtered above)
    longest: dict[int, int] = {}  # rows prefilled together start sampling at the same step
    for i, (first, _) in spans.items():
        longest[first] = max(longest.get(first, 0), runs[i].prepared.prompt_tokens)
    stats = {}
    for i in spans_of:
        run, span = runs[i], spans.get(i)
        stats[i] = RowStats(generate_ms=generate_ms[i])
        if span is None:
            continue
        prompt = run.prepared.prompt_tokens
        pads = longest[span[0]] - prompt
        decode = run.decode_steps
        slots = prompt + pads + decode + idle[i]
        stats[i] = RowStats(
            generate_ms=generate_ms[i],
            batch_rows=sum(1 for f, last in spans.values() if f <= span[0] <= last),
            batch_padding_fraction=(pads + idle[i]) / slots if slots else 0.0,
            padding_tokens=pads,
            decode_steps=decode,
            idle_slot_steps=idle[i],
        )
    return stats


def generate_static(
    engine: VLMEngine, prepared: dict[int, PreparedRequest], batches: list[PackedBatch]
) -> dict[int, tuple[GenerationResult, RowStats]]:
    """Each packed batch decodes to its slowest row, one after the other. A batch that fails as a whole
    (e.g. out of memory) fails its rows, not the job."""
    outcomes: dict[int, tuple[GenerationResult, RowStats]] = {}
    for batch in batches:
        runs = {i: RowRun(prepared[i]) for i in batch.indices}
        started = time.perf_counter()
        steps = 0
        server_error = False
        try:
            for step in engine.generate_stream([prepared[i] for i in batch.indices]):
                steps += 1
                for i, delta in zip(batch.indices, step, strict=True):
                    if delta is not None:
                        runs[i].add(delta, steps)
        except Exception as e:  # the rows carry the error; the job goes on
            log.error("generation failed for a batch of %d rows:\n%s", batch.rows, traceback.format_exc())
            server_error = True
            message = f"generation failed: {type(e).__name__}: {e}"
            for run in runs.values():
                run.result = GenerationResult(
                    "", "error", run.prepared.prompt_tokens, 0, error=message, error_type=SERVER_ERROR
                )
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        stats = _row_stats(runs, batch.indices, steps, dict.fromkeys(batch.indices, elapsed_ms))
        for i, run in runs.items():
            if run.result is None:  # generate_stream promises a last delta per row; anything else is a bug
                raise RuntimeError(f"row {i} of a batch never finished")
            stats[i].server_error = server_error
            outcomes[i] = (run.result, stats[i])
    return outcomes


def generate_continuous(
    scheduler: Scheduler, prepared: dict[int, PreparedRequest]
) -> dict[int, tuple[GenerationResult, RowStats]]:
    """Every row through the scheduler as one group; returns when each has its last delta. Per-row
    refusals and failures come back as that row's error result (the scheduler's contract)."""
    order = sorted(prepared, key=lambda i: (prepared[i].num_images, prepared[i].prompt_tokens))
    runs = {i: RowRun(prepared[i]) for i in order}
    all_done = threading.Event()
    left = [len(order)]

    def on_delta(position: int, delta: StreamDelta) -> None:  # on the scheduler's thread
        run = runs[order[position]]
        run.add(delta, scheduler.steps)  # the loop thread counts the steps, so this is the current one
        if delta.done:
            left[0] -= 1
            if not left[0]:
                all_done.set()

    started = time.perf_counter()
    if order:
        scheduler.submit_many([prepared[i] for i in order], on_delta)
        while not all_done.wait(timeout=1.0):
            if not scheduler.alive:  # the rows would never finish: fail the call, Ray Data retries it
                raise RuntimeError("the replica's generation scheduler stopped before its rows finished")
    end = max((run.last_step for run in runs.values() if run.last_step is not None), default=0)
    waited = {i: (run.finished_at - started) * 1000.0 for i, run in runs.items()}
    stats = _row_stats(runs, order, end, waited)
    return {i: (run.result, stats[i]) for i, run in runs.items() if run.result is not None}
