"""Continuous batching for the generation engine: requests join and leave the running batch at every step.

    scheduler = Scheduler(VLMEngine.from_pretrained("tiny-llm"), max_rows=8, max_queue=64)
    ticket = scheduler.submit(engine.prepare(request), on_delta=print)   # from any thread; QueueFull
    tickets = scheduler.submit_many(prepared_rows, on_delta=lambda i, d: ...)  # queued as one group
    scheduler.cancel(ticket)                                             # leaves at the next step
    async for delta in scheduler.stream(prepared): ...                   # from asyncio (never blocks it)
    scheduler.close()

One thread runs the loop (iteration-level scheduling, as Orca and vLLM do). Each iteration: rows that
were cancelled leave; every running row samples its next token from the logits it holds (the engine's
`DecodeRow`, so per-row sampling params, seeds, stop strings, JSON grammars, logprobs and per-row errors
behave exactly as in `VLMEngine.generate_stream`); finished rows leave the batch and its KV cache; the rest
take one decode step; then waiting requests are admitted, up to `max_rows` running rows and
`prefill_token_budget` prompt tokens per iteration (the first waiting request is always admitted when
there is room, so a long prompt cannot starve), prefilled as a batch of their own, and merged into the
running batch. A short request therefore starts at the next step and finishes while a long one decodes.

The KV cache: newcomers are prefilled alone and their `DynamicCache` merged into the running one (a
re-padding design). Both sides hold left-padded rows, so the shorter side is left-padded with zero
keys/values up to the longer one's length, the attention masks the same way (0: never attended), and the
two concatenate along the batch dimension; each row keeps its own 1-D position and M-RoPE delta (Qwen-VL),
so a merged row computes what it computes alone and nothing of the running rows is recomputed. When rows
leave, columns that no remaining row attends to are cut off the front again (`trim_leading_pads`), so the
padding a long-gone prompt caused is not paid for ever. Why this rather than a slot-based static cache
or paged blocks: it runs every model's own attention through `DynamicCache` unchanged (eager, SDPA,
M-RoPE, any family that takes a 2-D mask), with no custom kernel, and on CPU and small GPUs the copy is
cheap. Its cost is a copy of the running cache at each admission, O(rows x length x layers), and the pad
columns of the shorter side until they are trimmed. Measured (tiny-llm, 2 layers, 8 running rows x 306
cached tokens, one 20-token newcomer; a 2-core box shared with other jobs, load average ~20, so both
figures are inflated alike): a decode step 247 ms, the merge 21 ms, i.e. ~1/12 of one step, paid once
per admission and not per step (a larger model spends more of each step on its weights, which the merge
does not touch). A large model on a GPU with long contexts would want paged blocks (vLLM) instead: a new
cache class behind the same loop.

Chunked prefill (`prefill_chunk_tokens`, `chunked_prefill.py`): a newcomer whose prompt is longer than
one chunk is prefilled alone, one chunk per iteration between the running rows' decode steps, so their
next token waits for one chunk's forward pass rather than the whole prompt's; it joins the batch after
its last chunk. Chunking rows count against `max_rows`. Prompts that cannot chunk (images, M-RoPE, a
draft model: see that module) are prefilled whole.

Families whose decode state does not merge by padding are admitted only between batches (still through
this scheduler, with the same queue, caps and cancel): an encoder-decoder (Florence-2: encoder outputs
and a cross-attention cache per row), Mllama (cross-attention states and masks built by `prepare` for
the whole batch), any family with decode-step inputs, and caches with sliding-window layers (their
length is not the mask's). New rows then wait until the running batch has drained.

With a draft model (`speculative.py`) a step is one speculative step (a row may take several tokens);
the draft's cache merges and trims like the served model's, and a newcomer's first token comes from its
prefill's logits, sampled in the next iteration beside the running rows' speculative deltas. Plain
PyTorch: no Ray.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from raybooth.models.chunked_prefill import ChunkedPrefill
from raybooth.models.speculative import SpeculativeSteps
from raybooth.models.vlm_engine import BatchState, VLMEngine
from raybooth.models.vlm_requests import GenerationRequest, PreparedRequest, StreamDelta, error_delta
from raybooth.models.vlm_rows import DecodeRow
from raybooth.models.vlm_steps import PlainSteps

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The scheduler's waiting queue is at its bound; the caller should answer 503 and let the client retry."""


@dataclass(eq=False)
class Ticket:
    """One submitted request: what the loop reports its deltas to, and whether its caller still wants it."""

    request: GenerationRequest | PreparedRequest
    on_delta: Callable[[StreamDelta], None]
    cancelled: bool = False
    done: bool = False  # its last delta was delivered
    submitted_at: float = field(default_factory=time.perf_counter)

    @property
    def prompt_tokens(self) -> int:
        # An unprepared request is tokenized in the loop; it counts 1 against the budget until then.
        return self.request.prompt_tokens if isinstance(self.request, PreparedRequest) else 1


# --------------------------------------------------------------------------------------------------
# Merging and trimming batch states
# --------------------------------------------------------------------------------------------------


def family_merges(family: Any) -> bool:
    """Whether a family's decode state can take rows mid-flight at all (its cache must also be `mergeable`):
    not an encoder-decoder, nor a family that builds batch-wide inputs (`prepare`) or calls its model its
    own way (`forward`)."""
    return not (family.encoder_decoder or family.prepare or family.forward)


def mergeable(state: BatchState) -> bool:
    """Whether rows can join `state` mid-flight by re-padding (see the module docstring)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(state.cache, "layers", None)
    if layers is None or state.decode_inputs:
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def merge_states(running: BatchState, newcomers: BatchState) -> BatchState:
    """`running` with `newcomers`' rows appended (in place on `running`'s cache): both left-padded to the
    longer one's length, masks padded with 0, positions and M-RoPE deltas kept per row."""
    length = max(running.mask.shape[1], newcomers.mask.shape[1])
    for old, new in zip(running.cache.layers, newcomers.cache.layers, strict=True):
        old.keys = torch.cat(
            [_left_pad(old.keys, length, -2), _left_pad(new.keys, length, -2)]
        )  # (B, H, T, D)
        old.values = torch.cat([_left_pad(old.values, length, -2), _left_pad(new.values, length, -2)])
    running.mask = torch.cat([_left_pad(running.mask, length, 1), _left_pad(newcomers.mask, length, 1)])
    running.positions = torch.cat([running.positions, newcomers.positions])
    if running.rope_deltas is not None or newcomers.rope_deltas is not None:
        if running.rope_deltas is None or newcomers.rope_deltas is None:
            raise RuntimeError("cannot merge a batch with M-RoPE deltas into one without")  # one model: a bug
        running.rope_deltas = torch.cat([running.rope_deltas, newcomers.rope_deltas])
    return running


def trim_leading_pads(state: BatchState) -> int:
    """Cut the leading columns no row attends to (left by rows that left); the number cut."""
    attended = state.mask.any(dim=0).nonzero()
    start = int(attended[0]) if len(attended) else 0
    if start > 0:
        for layer in state.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
        state.mask = state.mask[:, start:]
    return start


# --------------------------------------------------------------------------------------------------
# Streaming a row to an event loop
# --------------------------------------------------------------------------------------------------


class _Outbox:
    """One streamed row's deltas on their way from the loop thread to its reader's event loop.

    The loop thread `put`s every step's delta; the event loop is woken (one `call_soon_threadsafe`) only
    when the held deltas reach the tokens the reader `want`s, or the row ended: with 32 rows streaming 16
    tokens a chunk, that is one wake-up per row every 16 steps instead of every step (measured in-process
    on tiny-llm, per-token wake-ups cost about 30% of the scheduler's tokens/s)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._held: list[StreamDelta] = []
        self._tokens = 0  # in `_held`
        self._wanted = 1  # the first delta goes out with the first token
        self._woken = False  # a wake-up is on its way to the reader (or it is awake)
        self._ready = asyncio.Event()

    def put(self, delta: StreamDelta) -> None:
        """From the loop thread (the scheduler's `on_delta`)."""
        with self._lock:
            self._held.append(delta)
            self._tokens += len(delta.token_ids)
            if self._woken or (not delta.done and self._tokens < self._wanted):
                return
            self._woken = True
        self._loop.call_soon_threadsafe(self._ready.set)

    def want(self, tokens: int) -> None:
        """From the reader: hold the next delta until it has `tokens` tokens (or the row ends)."""
        with self._lock:
            self._wanted = tokens
            if self._woken or not self._held or self._tokens < tokens:
                return
            self._woken = True
        self._ready.set()  # the held deltas already make a chunk

    async def take(self) -> list[StreamDelta]:
        """The next chunk: the held deltas merged into one, or two when an error came behind text (the
        error delta always comes alone, as the last)."""
        await self._ready.wait()
        with self._lock:
            held, self._held, self._tokens, self._woken = self._held, [], 0, False
            self._ready.clear()
        chunks: list[StreamDelta] = []
        for delta in held:
            if chunks and delta.error is None and chunks[-1].error is None:
                chunks[-1] = chunks[-1].followed_by(delta)
            else:
                chunks.append(delta)
        return chunks


# --------------------------------------------------------------------------------------------------
# The scheduler
# --------------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    """The running rows, their tickets (same order) and the decode-step state: the KV cache(s) and what
    each row takes next (its logits, or a speculative step's delta; `vlm_steps.py`)."""

    rows: list[DecodeRow] = field(default_factory=list)
    tickets: list[Ticket] = field(default_factory=list)
    steps: PlainSteps | SpeculativeSteps | None = None

    def keep(self, index: list[int]) -> None:
        if len(index) == len(self.rows):
            return
        self.rows = [self.rows[b] for b in index]
        self.tickets = [self.tickets[b] for b in index]
        if not index:
            self.steps = None
            return
        assert self.steps is not None
        self.steps.select(index)


class Scheduler:
    """Continuous batching over one `VLMEngine` (see the module docstring). Thread-safe."""

    def __init__(
        self,
        engine: VLMEngine,
        *,
        max_rows: int = 8,
        max_queue: int = 64,
        prefill_token_budget: int = 4096,
        prefill_chunk_tokens: int = 0,
        idle_wait_s: float = 0.0,
    ):
        if min(max_rows, prefill_token_budget) < 1 or min(max_queue, prefill_chunk_tokens, idle_wait_s) < 0:
            raise ValueError(
                "Scheduler needs max_rows >= 1, max_queue >= 0, prefill_token_budget >= 1, "
                f"prefill_chunk_tokens >= 0, idle_wait_s >= 0 (got {max_rows}, {max_queue}, "
                f"{prefill_token_budget}, {prefill_chunk_tokens}, {idle_wait_s})"
            )
        self.engine = engine
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.prefill_token_budget = prefill_token_budget
        self.prefill_chunk_tokens = prefill_chunk_tokens  # 0: every prompt is prefilled whole
        # Only when nothing runs, and only where latecomers could not join the batch mid-flight (a
        # family that admits between batches, or whose last batch did not merge): how long the first
        # arrival waits for company, so that a burst decodes as one batch instead of waiting for the
        # first row's batch to drain. A batch that merges starts at once (as vLLM does): whoever comes
        # during its first step joins at the next, and a lone request never pays the wait in its TTFT.
        self.idle_wait_s = idle_wait_s
        family = engine.family
        self.merges_mid_flight = family_merges(family)
        self._last_batch_merged = self.merges_mid_flight  # the last batch's cache could take newcomers
        self._cond = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._running = 0
        self._chunking: deque[tuple[DecodeRow, Ticket, ChunkedPrefill]] = deque()  # loop thread only
        self._closed = False
        self.steps = 0
        self.step_rows: deque[int] = deque(maxlen=10_000)  # rows that sampled together, per step
        self.admissions: deque[int] = deque(maxlen=10_000)  # rows admitted (prefilled) together
        self.admitted_tokens: deque[int] = deque(maxlen=10_000)  # their prompt tokens
        self.cancelled_rows: deque[int] = deque(maxlen=10_000)  # tokens each cancelled row had decoded
        self.merge_s = 0.0  # time spent merging caches
        self.trimmed_columns = 0  # pad columns cut off the cache after rows left
        self.prefill_chunks = 0  # chunks run for chunked prefills
        self._thread = threading.Thread(target=self._run, name="vlm-scheduler", daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------------------------------

    def submit(
        self, request: GenerationRequest | PreparedRequest, on_delta: Callable[[StreamDelta], None]
    ) -> Ticket:
        """Queue `request`; `on_delta` gets its deltas (from the loop thread; it must not block), the last
        with `done` set. Raises QueueFull when `max_queue` requests already wait. Submit prepared and
        checked requests (`engine.prepare`, `engine.check` in a worker) so the loop never tokenizes."""
        ticket = Ticket(request, on_delta)
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed; create a new one")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(
                    f"the generation queue is full ({self.max_queue} requests waiting); retry with backoff"
                )
            self._waiting.append(ticket)
            self._cond.notify_all()
        return ticket

    def submit_many(
        self,
        requests: list[GenerationRequest | PreparedRequest],
        on_delta: Callable[[int, StreamDelta], None],
    ) -> list[Ticket]:
        """Queue `requests` together, in order, in one step: the loop sees all of them at its next
        admission (so they prefill as one batch up to the caps) rather than the first alone. `on_delta`
        gets `(index into requests, delta)`. Raises QueueFull, queueing none, when they do not all fit."""
        tickets = [Ticket(r, lambda delta, i=i: on_delta(i, delta)) for i, r in enumerate(requests)]
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed; create a new one")
            if len(self._waiting) + len(tickets) > self.max_queue:
                raise QueueFull(
                    f"{len(tickets)} requests do not fit the generation queue ({len(self._waiting)} of "
                    f"{self.max_queue} places taken); submit fewer at once or raise max_queue"
                )
            self._waiting.extend(tickets)
            self._cond.notify_all()
        return tickets

    def cancel(self, ticket: Ticket) -> None:
        """Stop `ticket`'s row: a waiting one is dropped now, a running one leaves at the next step (its
        last delta has finish_reason "cancelled"). A no-op once it finished."""
        with self._cond:
            ticket.cancelled = True
            if ticket in self._waiting:
                self._waiting.remove(ticket)
                self._deliver(
                    ticket, StreamDelta(finish_reason="cancelled", prompt_tokens=ticket.prompt_tokens)
                )
            self._cond.notify_all()

    def stream(
        self, request: GenerationRequest | PreparedRequest, stream_interval: int | None = 1
    ) -> AsyncIterator[StreamDelta]:
        """Submit now (QueueFull raises here) and return the request's deltas as an async iterator, for
        the running event loop. Leaving the iteration early (aclose, task cancelled) cancels the row.

        Fewer, longer chunks when streaming costs more than decoding (on Serve every chunk is a message
        to the ingress): deltas go out at once until one has shown text (time to first token does not
        change, even when the first tokens decode to nothing yet: a held-back stop-string prefix, half a
        UTF-8 character, a skipped special token), then each one holds at least `stream_interval` tokens,
        or the rest (vLLM's `--stream-interval`); None: `auto_stream_interval()` at each delta. The loop
        thread holds a row's deltas back until there are that many (`_Outbox`), so the event loop wakes
        once per chunk, not once per token; a reader that fell behind gets everything it missed as one
        delta (`StreamDelta.followed_by`). An error delta always comes alone, as the last."""
        if stream_interval is not None and stream_interval < 1:
            raise ValueError(
                f"stream_interval is tokens per streamed delta, at least 1, not {stream_interval}"
            )
        outbox = _Outbox(asyncio.get_running_loop())
        ticket = self.submit(request, outbox.put)

        async def iterate() -> AsyncIterator[StreamDelta]:
            shown = False  # a delta with text went out
            try:
                while True:
                    for delta in await outbox.take():
                        yield delta
                        if delta.done:
                            return
                        shown = shown or bool(delta.text)
                    outbox.want((stream_interval or self.auto_stream_interval()) if shown else 1)
            finally:
                self.cancel(ticket)

        return iterate()

    def auto_stream_interval(self) -> int:
        """Tokens per streamed delta that keep streaming's cost below decoding's: one while up to 3 rows
        run (every token as it comes), then one more per 2 running rows, at most 16. Measured on Serve
        (benchmarks/serve_load.py, tiny-llm, 2 CPUs): at one token a chunk the ingress and proxy spend
        more CPU on the messages than the replica on decoding; 8 a chunk gave 2.7x the tokens/s at 8
        streams and 2.7x at 32."""
        return max(1, min(16, self._running // 2))

    def load(self) -> tuple[int, int]:
        """`(waiting requests, running rows)` now: cheap, for metrics."""
        with self._cond:
            return len(self._waiting), self._running

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "queue_length": len(self._waiting),
                "running_rows": self._running,
                "steps": self.steps,
                "step_rows": list(self.step_rows),
                "admissions": list(self.admissions),
                "admitted_tokens": list(self.admitted_tokens),
                "cancelled_rows": list(self.cancelled_rows),
                "merge_s": self.merge_s,
                "trimmed_columns": self.trimmed_columns,
                "prefill_chunks": self.prefill_chunks,
                "merges_mid_flight": self.merges_mid_flight,
            }

    @property
    def alive(self) -> bool:
        """Whether the loop thread still runs (it ends only on `close`, or on a bug outside `_iterate`)."""
        return self._thread.is_alive()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the loop: waiting and running rows end with finish_reason "cancelled"."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    # -- the loop -----------------------------------------------------------------------------------

    def _deliver(self, ticket: Ticket, delta: StreamDelta) -> None:
        if ticket.done:
            return
        ticket.done = delta.done
        try:
            ticket.on_delta(delta)
        except Exception:  # a listener that went away (its event loop closed) must not stop the loop
            log.warning("a scheduler listener failed; cancelling its row", exc_info=True)
            ticket.cancelled = True

    def _run(self) -> None:
        batch = _Batch()
        while True:
            newcomers = self._wait_and_take(batch)
            if newcomers is None:  # closed
                for ticket in [*batch.tickets, *(ticket for _, ticket, _ in self._chunking)]:
                    self._deliver(ticket, StreamDelta(finish_reason="cancelled"))
                return
            try:
                self._iterate(batch, newcomers)
            except Exception as e:  # a shared forward pass failed: every running row ends with it
                for ticket in [*batch.tickets, *newcomers]:  # (delivering skips rows already done)
                    self._deliver(ticket, error_delta(e))
                batch = _Batch()
            with self._cond:
                self._running = len(batch.rows) + len(self._chunking)

    def _wait_and_take(self, batch: _Batch) -> list[Ticket] | None:
        """Block while there is nothing to do; then the waiting tickets this iteration admits."""
        with self._cond:
            while not batch.rows and not self._chunking and not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                for ticket in self._waiting:
                    self._deliver(ticket, StreamDelta(finish_reason="cancelled"))
                self._waiting.clear()
                return None
            if not batch.rows and self.idle_wait_s and not self._last_batch_merged:
                deadline = time.monotonic() + self.idle_wait_s
                while len(self._waiting) < self.max_rows and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            if batch.rows and not self._merges(batch.steps):
                return []  # this family admits between batches only
            taken: list[Ticket] = []
            tokens = 0
            while self._waiting and len(batch.rows) + len(self._chunking) + len(taken) < self.max_rows:
                cost = self._waiting[0].prompt_tokens
                if taken and tokens + cost > self.prefill_token_budget:
                    break
                taken.append(self._waiting.popleft())
                tokens += cost
            return taken

    def _merges(self, steps: PlainSteps | SpeculativeSteps | None) -> bool:
        return self.merges_mid_flight and steps is not None and all(mergeable(s) for s in steps.states)

    def _iterate(self, batch: _Batch, newcomers: list[Ticket]) -> None:
        """One step: cancelled rows leave, every row samples, finished rows leave, the rest decode one
        token, then the newcomers are prefilled and merged, and one chunk of a long prompt runs."""
        if batch.rows:
            self.steps += 1
            live = []
            for b, (row, ticket) in enumerate(zip(batch.rows, batch.tickets, strict=True)):
                if ticket.cancelled:
                    self.cancelled_rows.append(row.generated)
                    self._deliver(ticket, row.finish("cancelled"))
                else:
                    live.append(b)
            batch.keep(live)
        if batch.rows:
            assert batch.steps is not None
            self.step_rows.append(len(batch.rows))
            deltas = batch.steps.sample(list(range(len(batch.rows))), batch.rows)
            keep, next_tokens = [], []
            for b, delta in enumerate(deltas):
                self._deliver(batch.tickets[b], delta)
                if not delta.done:
                    keep.append(b)
                    next_tokens.append(delta.token_ids[-1])
            batch.keep(keep)
            if batch.steps is not None:
                if len(keep) < len(deltas) and self._merges(batch.steps):
                    self.trimmed_columns += sum(trim_leading_pads(s) for s in batch.steps.states)
                batch.steps.advance(batch.rows, next_tokens)
        if newcomers:
            self._admit(batch, newcomers)
        if self._chunking:
            self._prefill_one_chunk(batch)

    def _admit(self, batch: _Batch, tickets: list[Ticket]) -> None:
        rows: list[DecodeRow] = []
        started: list[Ticket] = []
        for ticket in tickets:
            if ticket.cancelled:  # cancelled between leaving the queue and its prefill
                self.cancelled_rows.append(0)
                self._deliver(
                    ticket, StreamDelta(finish_reason="cancelled", prompt_tokens=ticket.prompt_tokens)
                )
                continue
            try:
                rows.append(self.engine.start_row(0, ticket.request))
                started.append(ticket)
            except Exception as e:  # this request's refusal (its 400) or a bug (500): the others go on
                self._deliver(ticket, error_delta(e))
        if self.prefill_chunk_tokens:  # long prompts wait in `_chunking`, a chunk per iteration
            whole = []
            for row, ticket in zip(rows, started, strict=True):
                chunked = ChunkedPrefill.begin(self.engine, row.prepared, self.prefill_chunk_tokens)
                if chunked is None:
                    whole.append((row, ticket))
                else:
                    self._chunking.append((row, ticket, chunked))
            rows, started = [row for row, _ in whole], [ticket for _, ticket in whole]
        if not rows:
            return
        try:
            steps = self.engine.start_steps([row.prepared for row in rows])
        except Exception as e:  # the newcomers' prefill failed: they end with it, the running rows go on
            for ticket in started:
                self._deliver(ticket, error_delta(e))
            return
        self._join(batch, rows, started, steps)

    def _prefill_one_chunk(self, batch: _Batch) -> None:
        """The next chunk of the oldest chunked prefill; the row joins the batch after its last one."""
        row, ticket, chunked = self._chunking[0]
        if ticket.cancelled:
            self._chunking.popleft()
            self.cancelled_rows.append(0)
            self._deliver(ticket, StreamDelta(finish_reason="cancelled", prompt_tokens=ticket.prompt_tokens))
            return
        try:
            steps = chunked.step()
        except Exception as e:  # this prompt's forward pass failed: it ends with it, the others go on
            self._chunking.popleft()
            self._deliver(ticket, error_delta(e))
            return
        self.prefill_chunks += 1
        if steps is not None:
            self._chunking.popleft()
            self._join(batch, [row], [ticket], steps)

    def _join(
        self,
        batch: _Batch,
        rows: list[DecodeRow],
        tickets: list[Ticket],
        steps: PlainSteps | SpeculativeSteps,
    ) -> None:
        """Merge prefilled newcomers (their rows, tickets and step state) into the running batch."""
        self.admissions.append(len(rows))
        self.admitted_tokens.append(sum(row.prepared.prompt_tokens for row in rows))
        if batch.steps is None:
            batch.steps = steps
            self._last_batch_merged = self._merges(steps)
        else:
            began = time.perf_counter()
            for running, joining in zip(batch.steps.states, steps.states, strict=True):
                merge_states(running, joining)  # the served model's cache, and the draft's if any
            batch.steps.absorb(steps)  # type: ignore[arg-type]  # one engine: both are the same kind
            self.merge_s += time.perf_counter() - began
        batch.rows += rows
        batch.tickets += tickets
