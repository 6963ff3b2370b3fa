"""`ChatDeployment`: the shared VLM engine, with concurrent callers' requests decoded as one batch.

    gen = handle.options(stream=True).generate.remote(GenerationRequest(...))
    async for event in gen: ...          # ChatEvent dicts: text deltas, then one final event

Two ways to batch, chosen by `chat.scheduler`:

- `continuous` (the default): one `vlm_scheduler.Scheduler` per replica owns the engine. A caller's row
  joins the running batch at the next decode step and leaves it when done, so a short answer never waits
  for a long one (iteration-level scheduling, as vLLM and TGI do). `max_batch_size` caps the running rows;
  a request that finds nothing running starts at once (a burst's later arrivals join at the next step),
  except for a family that admits only between batches, which waits `batch_wait_timeout_s` for company.
  Its queue is bounded by `max_ongoing_requests`; beyond it the caller gets the OpenAI 503 `overloaded`.
- `static`: callers that arrive within `batch_wait_timeout_s` of each other are batched by `@serve.batch`
  into one `VLMEngine.generate_stream` call that decodes to its end; the batch function is an async
  generator yielding one list per step (a `ChatEvent` per caller, `StopIteration` for callers already
  finished). Kept to measure the difference (`benchmarks/serve_load.py`).

Either way each caller streams its own tokens as they are produced. Before a caller's row is queued, its
request is prepared (chat template, tokens, images) and checked (context, grammar compile) in a worker
thread: a slow compile or a refusal never holds a batch that good requests wait for. A row that fails
ends with an event holding `error` and `error_type` (the engine's contract: "invalid_request_error" is
the client's 400, "server_error" a 500, and "overloaded" the scheduler's full queue, a 503), and the
other rows of its batch go on. Generated text goes
through the safety policy's streaming filter before it leaves: a match ends that caller's stream with
`finish_reason: content_filter` and a refusal naming the category and span. A row whose stream ended
that way, or whose client disconnected, is cancelled in the engine: it leaves the batch (and its KV
cache) at the next step instead of decoding on to EOS or `max_tokens` for nobody.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypedDict

from ray import serve
from ray.serve import metrics

from raybooth.cluster.config import ChatServeSection, SafetySection
from raybooth.cluster.workdir import default_models_dir
from raybooth.models.device import pick_device
from raybooth.models.safety import SafetyPolicy, StreamingSafetyFilter
from raybooth.models.speculative import SpeculativeOptions
from raybooth.models.vlm_engine import (
    GenerationRequest,
    PreparedRequest,
    StreamDelta,
    VLMEngine,
    error_delta,
)
from raybooth.models.vlm_scheduler import QueueFull, Scheduler
from raybooth.openai.chat import choice_logprobs
from raybooth.serving.callers import Caller, attending

_END = object()  # the engine's iterator is exhausted


class ChatEvent(TypedDict, total=False):
    """One caller's share of one decode step; the final one has `finish_reason` (or `error`)."""

    text: str
    logprobs: list[dict[str, Any]]  # OpenAI `logprobs.content` entries of this step's tokens, when asked for
    finish_reason: str | None  # "stop" | "length" | "content_filter" | "error"
    refusal: str | None  # the safety policy's explanation when finish_reason is content_filter
    error: str | None  # the request could not run (context too long, schema does not compile)
    # with `error`: "invalid_request_error" (HTTP 400) | "server_error" (500) | "overloaded" (503)
    error_type: str | None
    prompt_tokens: int
    completion_tokens: int


def step_event(delta: StreamDelta, text: str) -> ChatEvent:
    event = ChatEvent(text=text)
    if delta.logprobs:
        event["logprobs"] = choice_logprobs(delta.logprobs).model_dump()["content"]
    return event


def final_event(delta: StreamDelta, text: str, **extra: Any) -> ChatEvent:
    event = step_event(delta, text)
    event.update(
        finish_reason=extra.get("finish_reason", delta.finish_reason),
        refusal=extra.get("refusal"),
        error=delta.error,
        error_type=delta.error_type,
        prompt_tokens=delta.prompt_tokens,
        completion_tokens=delta.completion_tokens,
    )
    return event


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux's /proc; None elsewhere), for the stats route."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


class RowFilter:
    """Per caller: the safety filter on its output, and whether its stream has ended."""

    def __init__(self, policy: SafetyPolicy, caller: Caller[PreparedRequest]):
        self.safety: StreamingSafetyFilter = policy.stream_filter()
        self.caller = caller
        self.finished = False  # its last event was sent

    @property
    def ended(self) -> bool:
        """Nothing more goes to this caller: its stream finished, or it stopped listening."""
        return self.finished or self.caller.gone

    def event(self, delta: StreamDelta | None) -> ChatEvent | type[StopIteration]:
        if self.ended:
            return StopIteration
        if delta is None:
            return ChatEvent(text="")  # nothing new for this caller this step
        text, verdict = self.safety.feed(delta.text)
        if verdict is not None:
            self.finished = True
            return final_event(delta, text, finish_reason="content_filter", refusal=verdict.explanation())
        if delta.done:
            self.finished = True
            return final_event(delta, text + self.safety.flush())
        return step_event(delta, text)


# Resources, replicas and queue limits come from the serve config, set once in serving/app.py's
# deployment_options (and a Serve config file may override them); nothing here repeats them.
@serve.deployment(name="ChatDeployment", health_check_period_s=10)
class ChatDeployment:
    def __init__(self, chat: dict[str, Any], safety: dict[str, Any], model: str):
        self.cfg = ChatServeSection.model_validate(chat)
        self.policy = SafetyPolicy.from_settings(SafetySection.model_validate(safety).model_dump())
        device = pick_device(self.cfg.device or "auto")
        dtype = None if self.cfg.dtype == "auto" else self.cfg.dtype
        self.engine = VLMEngine.from_pretrained(
            model,
            device=str(device),
            dtype=dtype,
            models_dir=default_models_dir(),
            quantization=self.cfg.quantization,
            speculative=SpeculativeOptions(**self.cfg.speculative.model_dump())
            if self.cfg.speculative
            else None,
        )
        self.scheduler: Scheduler | None = None
        self.generate_batch: Any = None
        if self.cfg.scheduler == "continuous":
            self.scheduler = Scheduler(
                self.engine,
                max_rows=self.cfg.max_batch_size,
                max_queue=self.cfg.max_ongoing_requests,  # a replica never holds more callers than this
                prefill_chunk_tokens=self.cfg.prefill_chunk_tokens,
                idle_wait_s=self.cfg.batch_wait_timeout_s,
            )
        else:
            self.generate_batch = serve.batch(
                max_batch_size=self.cfg.max_batch_size,
                batch_wait_timeout_s=self.cfg.batch_wait_timeout_s,
                max_concurrent_batches=self.cfg.max_concurrent_batches,
            )(self._generate_batch)
        # Admission (tokenizing, grammar compiles) has threads of its own: were it to share the default
        # pool, a few slow refusals could take every thread the batches need for their decode steps.
        self._admission = ThreadPoolExecutor(max_workers=4, thread_name_prefix="chat-admission")
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        self.cancelled_rows: deque[int] = deque(maxlen=10_000)  # tokens each cancelled row had decoded
        self._batch_rows = metrics.Histogram(
            "raybooth_chat_batch_rows",
            description="Requests decoded together in one engine batch (continuous: when a request joins).",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        )
        self._tokens = metrics.Counter("raybooth_chat_completion_tokens", description="Tokens generated.")
        self._queue_length = metrics.Gauge(
            "raybooth_chat_queue_length", description="Requests waiting for a row (continuous batching)."
        )
        self._running_rows = metrics.Gauge(
            "raybooth_chat_running_rows", description="Rows in the running batch (continuous batching)."
        )

    async def generate(self, request: GenerationRequest):
        """Stream `ChatEvent`s for one request (batched with concurrent callers)."""
        # A client that disconnects cancels this call (the ingress cancels its handle call); the batch
        # then drops the row instead of decoding for nobody.
        try:
            prepared = await asyncio.get_running_loop().run_in_executor(self._admission, self.admit, request)
        except Exception as e:  # this request's refusal (a ValueError: its 400) or a bug (500)
            yield final_event(error_delta(e), "")
            return
        if self.scheduler is not None:
            events = self._generate_continuous(prepared)
            try:
                async for event in events:
                    yield event
            finally:  # closed between events (a caller's aclose): close the row's stream now, not at GC
                await events.aclose()
            return
        with attending(prepared) as caller:
            async for event in self.generate_batch(caller):
                yield event

    async def _generate_continuous(self, prepared: PreparedRequest):
        """One row through the scheduler; leaving early (a disconnect cancels this call, the safety
        filter ends the stream) cancels the row, which leaves the batch at the next step."""
        assert self.scheduler is not None
        try:
            interval = self.cfg.stream_interval
            deltas = self.scheduler.stream(prepared, None if interval == "auto" else interval)
        except QueueFull as e:
            yield ChatEvent(text="", finish_reason="error", error=str(e), error_type="overloaded")
            return
        self._export_load()
        row = RowFilter(self.policy, Caller(prepared))
        joined = False
        try:
            async for delta in deltas:
                if not joined:  # the rows this one decodes with when it joins the running batch
                    joined = True
                    self._batch_rows.observe(max(1, self.scheduler.load()[1]))
                event = row.event(delta)
                if event is StopIteration:  # ended by the safety filter: nothing more for this caller
                    break
                if delta.done and delta.completion_tokens:  # Ray's Counter refuses inc(0)
                    self._tokens.inc(delta.completion_tokens)
                yield event
                if row.finished:
                    break
        finally:
            await deltas.aclose()  # cancels the row unless it finished
            self._export_load()

    def _export_load(self) -> None:
        if self.scheduler is not None:
            waiting, running = self.scheduler.load()
            self._queue_length.set(waiting)
            self._running_rows.set(running)

    def admit(self, request: GenerationRequest) -> PreparedRequest:
        """Tokenize and check one request (in a worker thread), compiling its grammar into the cache:
        what could be slow or refused happens here, before the request holds a seat in a batch."""
        prepared = self.engine.prepare(request)
        self.engine.check(prepared)
        return prepared

    async def _generate_batch(self, callers: list[Caller[PreparedRequest]]):
        self.batch_sizes.append(len(callers))
        self._batch_rows.observe(len(callers))
        rows = [RowFilter(self.policy, caller) for caller in callers]
        cancelled: set[int] = set()  # rows the engine drops at its next step
        steps = self.engine.generate_stream([caller.item for caller in callers], cancelled)
        while True:
            cancelled.update(i for i, row in enumerate(rows) if row.ended)
            # Each decode step runs in a worker thread so the replica keeps answering health checks.
            step = await asyncio.to_thread(next, steps, _END)
            if step is _END:
                break
            events = [row.event(delta) for row, delta in zip(rows, step, strict=True)]
            done = [d for d in step if d is not None and d.done]
            if done:
                tokens = sum(d.completion_tokens for d in done)
                if tokens:  # rows that failed before decoding sampled none; Ray's Counter refuses inc(0)
                    self._tokens.inc(tokens)
                self.cancelled_rows.extend(
                    d.completion_tokens for d in done if d.finish_reason == "cancelled"
                )
            yield events  # once every row has finished, the next step only reports the cancels and ends
        steps.close()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "time": time.time(),
            "pid": os.getpid(),  # the replica's process (tests kill it to check failure handling)
            "rss_bytes": rss_bytes(),
            "scheduler": self.cfg.scheduler,
            "batch_sizes": list(self.batch_sizes),  # rows per batch (static) or per admission (continuous)
            "cancelled_rows": list(self.cancelled_rows),
            "step_rows": list(self.batch_sizes),  # static: a batch's rows decode together to its end
            "queue_length": 0,
            "running_rows": 0,
        }
        if self.scheduler is not None:
            sched = self.scheduler.stats()
            out.update(
                batch_sizes=sched["admissions"],
                cancelled_rows=sched["cancelled_rows"],
                queue_length=sched["queue_length"],
                running_rows=sched["running_rows"],
                admitted_tokens=sched["admitted_tokens"],
                decode_steps=sched["steps"],
                step_rows=sched["step_rows"],  # rows decoded together at each step
            )
        return out

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """`user_config` in the Serve YAML may retune batching without a restart."""
        if "max_batch_size" in user_config:
            rows = int(user_config["max_batch_size"])
            if self.scheduler is not None:
                self.scheduler.max_rows = rows
            else:
                self.generate_batch.set_max_batch_size(rows)
        if "batch_wait_timeout_s" in user_config:
            wait_s = float(user_config["batch_wait_timeout_s"])
            if self.scheduler is not None:
                self.scheduler.idle_wait_s = wait_s
            else:
                self.generate_batch.set_batch_wait_timeout_s(wait_s)

    def __del__(self) -> None:
        if getattr(self, "scheduler", None) is not None:
            self.scheduler.close(timeout_s=1)
