"""`ChatDeployment`: the shared VLM engine, with concurrent callers' requests decoded as one batch.

    gen = handle.options(stream=True).generate.remote(GenerationRequest(...))
    async for event in gen: ...          # ChatEvent dicts: text deltas, then one final event

Callers that arrive within `batch_wait_timeout_s` of each other are batched by `@serve.batch` into one
`VLMEngine.generate_stream` call: one forward pass per decode step for every row. The batch function is
an async generator that yields one list per step (a `ChatEvent` per caller, `StopIteration` for callers
already finished), so each caller streams its own tokens as they are produced. Before a caller joins a
batch, its request is prepared (chat template, tokens, images) and checked (context, grammar compile) in
a worker thread: a slow compile or a refusal never holds a batch that good requests wait for. A row that
fails ends with an event holding `error` and `error_type` (the engine's contract: "invalid_request_error"
is the client's 400, "server_error" a 500), and the other rows of its batch go on. Generated text goes
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
from raybooth.models.vlm_engine import (
    GenerationRequest,
    PreparedRequest,
    StreamDelta,
    VLMEngine,
    error_delta,
)
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
    error_type: str | None  # with `error`: "invalid_request_error" (HTTP 400) | "server_error" (500)
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
            model, device=str(device), dtype=dtype, models_dir=default_models_dir()
        )
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
            description="Requests decoded together in one engine batch.",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        )
        self._tokens = metrics.Counter("raybooth_chat_completion_tokens", description="Tokens generated.")

    async def generate(self, request: GenerationRequest):
        """Stream `ChatEvent`s for one request (batched with concurrent callers)."""
        # A client that disconnects cancels this call (the ingress cancels its handle call); the batch
        # then drops the row instead of decoding for nobody.
        try:
            prepared = await asyncio.get_running_loop().run_in_executor(self._admission, self.admit, request)
        except Exception as e:  # this request's refusal (a ValueError: its 400) or a bug (500)
            yield final_event(error_delta(e), "")
            return
        with attending(prepared) as caller:
            async for event in self.generate_batch(caller):
                yield event

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
        return {
            "time": time.time(),
            "pid": os.getpid(),  # the replica's process (tests kill it to check failure handling)
            "rss_bytes": rss_bytes(),
            "batch_sizes": list(self.batch_sizes),
            "cancelled_rows": list(self.cancelled_rows),
        }

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """`user_config` in the Serve YAML may retune batching without a restart."""
        if "max_batch_size" in user_config:
            self.generate_batch.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self.generate_batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
