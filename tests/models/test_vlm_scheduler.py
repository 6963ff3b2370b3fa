"""Continuous batching (`models/vlm_scheduler.py`): rows join and leave mid-flight without changing a row.

.venv/bin/python -m pytest tests/models/test_vlm_scheduler.py
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from raybooth.cluster.workdir import default_models_dir
from raybooth.models.decoding import (
    NoTokenError,
    SamplingParams,
    pick_tokens,
    row_generator,
    sample_token,
    sampling_distributions,
)
from raybooth.models.presets import resolve_model
from raybooth.models.vlm_engine import GenerationRequest, StreamDelta, VLMEngine
from raybooth.models.vlm_scheduler import QueueFull, Scheduler, _Outbox
from raybooth.samples import draw_sample_image

SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["cat", "dog"]}, "ok": {"type": "boolean"}},
    "required": ["label", "ok"],
    "additionalProperties": False,
}
_ENGINES: dict[str, VLMEngine] = {}


def engine_for(name: str) -> VLMEngine:
    """Each preset loads once for the module, whichever test asks for it."""
    if name not in _ENGINES:
        path = resolve_model(name, kind="vlm", models_dir=default_models_dir())
        _ENGINES[name] = VLMEngine.from_pretrained(path, device="cpu")
    return _ENGINES[name]


@pytest.fixture(scope="module", params=["tiny-vlm", "tiny-llm", "tiny-qwen2.5-vl"])
def engine(request) -> VLMEngine:
    return engine_for(request.param)


@pytest.fixture
def scheduler(engine) -> Iterator[Scheduler]:
    sched = Scheduler(engine, max_rows=4, max_queue=4)
    yield sched
    sched.close()


def request(engine: VLMEngine, text: str, images: int = 0, **params) -> GenerationRequest:
    """A request whose row never says EOS (banned), so its length is its `max_tokens` on any model."""
    parts = [
        {"type": "image", "image": draw_sample_image(i)}
        for i in range(images if engine.family.takes_images else 0)
    ]
    parts.append({"type": "text", "text": text})
    bias = {t: -100.0 for t in engine.eos_token_ids} | params.pop("logit_bias", {})
    return GenerationRequest(
        messages=[{"role": "user", "content": parts}], params=SamplingParams(logit_bias=bias, **params)
    )  # fmt: skip


class Collector:
    """A row's deltas as the loop delivers them; `finished` records the order rows ended in."""

    def __init__(
        self, finished: list[Collector] | None = None, on_token: Callable[[Collector], None] | None = None
    ):
        self.deltas: list[StreamDelta] = []
        self.done = threading.Event()
        self.finished = finished if finished is not None else []
        self.on_token = on_token

    def __call__(self, delta: StreamDelta) -> None:
        self.deltas.append(delta)
        if delta.done:
            self.finished.append(self)
            self.done.set()
        elif self.on_token is not None:
            self.on_token(self)

    def wait(self) -> Collector:
        assert self.done.wait(60), "the row never finished"
        return self

    @property
    def tokens(self) -> list[int]:
        return [t for d in self.deltas for t in d.token_ids]

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def last(self) -> StreamDelta:
        return self.deltas[-1]


@contextmanager
def scheduler_on(name: str, **options) -> Iterator[tuple[VLMEngine, Scheduler]]:
    """A scheduler over preset `name`'s engine, closed after the block."""
    engine = engine_for(name)
    sched = Scheduler(engine, **options)
    try:
        yield engine, sched
    finally:
        sched.close()


def wait_until(
    condition: Callable[[], bool], what: str, timeout_s: float = 60, every_s: float = 0.0005
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(every_s)


def wait_for_step(sched: Scheduler, step: int) -> None:
    wait_until(lambda: sched.steps >= step, f"the scheduler never reached step {step}")


def test_rows_admitted_mid_flight_decode_as_they_do_alone(engine, scheduler):
    requests = [
        request(engine, "a photo of a dog and a cat on the beach " * 6, images=1, max_tokens=12, temperature=0.0),
        request(engine, "hi", max_tokens=24, temperature=0.0, stop=["zzz"]),
        request(engine, "What color is it?", images=1, max_tokens=16, temperature=0.9, seed=7, logprobs=2),
    ]  # fmt: skip
    alone = [engine.generate([r])[0] for r in requests]
    rows = [Collector() for _ in requests]
    prepared = [engine.prepare(r) for r in requests]  # before: a slow prepare must not let steps pass
    for i, (req, row) in enumerate(zip(prepared, rows, strict=True)):
        wait_for_step(scheduler, 3 * i)  # row 1 joins at step 3, row 2 at step 6, while row 0 decodes
        scheduler.submit(req, row)
        # Joined before the next one is submitted (on a busy box steps 3 to 6 can pass before a join).
        wait_until(lambda n=i + 1: len(scheduler.admissions) >= n, f"row {i} joining")
    for row, result in zip(rows, alone, strict=True):
        row.wait()
        assert row.tokens == result.token_ids and row.text == result.text
        assert row.last.finish_reason == result.finish_reason == "length"
        # Same tokens; logprobs agree to float32 rounding (batched matmuls may sum in another order).
        streamed = [e for d in row.deltas for e in d.logprobs]
        assert [e.token for e in streamed] == [e.token for e in result.logprobs or []]
        assert [e.logprob for e in streamed] == pytest.approx(
            [e.logprob for e in result.logprobs or []], abs=1e-4
        )
    stats = scheduler.stats()
    assert stats["admissions"] == [1, 1, 1] and stats["merges_mid_flight"], stats  # three separate joins
    # Row 0 (the longest prompt) left first: the pad columns it left behind were cut off the cache.
    assert stats["trimmed_columns"] > 0 and stats["queue_length"] == 0


def test_a_short_request_finishes_while_a_long_one_decodes(engine, scheduler):
    finished: list[Collector] = []
    long_row, short_row = Collector(finished), Collector(finished)
    scheduler.submit(
        engine.prepare(request(engine, "Tell me a long story.", max_tokens=48, temperature=0.0)), long_row
    )
    wait_for_step(scheduler, 2)
    short = request(engine, "hi", max_tokens=4, temperature=0.0)
    scheduler.submit(engine.prepare(short), short_row)
    short_row.wait()
    assert not long_row.done.is_set()  # it did not wait for the long row's batch to end
    long_row.wait()
    assert finished == [short_row, long_row]
    assert short_row.tokens == engine.generate([short])[0].token_ids


def test_cancel_frees_the_row_at_the_next_step_and_the_others_are_unaffected(engine, scheduler):
    keep = [request(engine, "Name three colours.", max_tokens=12, temperature=0.0),
            request(engine, "hi", max_tokens=10, temperature=1.0, seed=3)]  # fmt: skip
    tickets = {}

    def cancel_after_three(row: Collector) -> None:  # runs in the loop thread: exact, not timing-based
        if len(row.tokens) == 3:
            scheduler.cancel(tickets["gone"])

    gone = Collector(on_token=cancel_after_three)
    rows = [Collector() for _ in keep]
    tickets["gone"] = scheduler.submit(
        engine.prepare(request(engine, "A very long story.", max_tokens=200)), gone
    )
    for req, row in zip(keep, rows, strict=True):
        scheduler.submit(engine.prepare(req), row)
    gone.wait()
    assert gone.last.finish_reason == "cancelled" and gone.last.completion_tokens == 3
    assert len(gone.tokens) == 3  # nothing sampled for it after the cancel
    for req, row in zip(keep, rows, strict=True):
        assert row.wait().tokens == engine.generate([req])[0].token_ids
    assert scheduler.stats()["cancelled_rows"] == [3]


def test_the_queue_bound_refuses_with_queue_full():
    with scheduler_on("tiny-llm", max_rows=1, max_queue=1) as (engine, sched):
        running, waiting = Collector(), Collector()
        first = sched.submit(engine.prepare(request(engine, "A long story.", max_tokens=500)), running)
        wait_for_step(sched, 1)  # admitted: the only row
        second = sched.submit(engine.prepare(request(engine, "hi", max_tokens=2)), waiting)
        assert sched.stats()["queue_length"] == 1
        with pytest.raises(QueueFull, match=r"queue is full \(1 requests waiting\); retry"):
            sched.submit(engine.prepare(request(engine, "hi", max_tokens=2)), Collector())
        sched.cancel(second)  # a waiting row is dropped at once
        assert waiting.wait().last.finish_reason == "cancelled" and not waiting.tokens
        sched.cancel(first)
        assert running.wait().last.finish_reason == "cancelled"


def test_row_errors_and_grammars_stay_per_row_mid_flight():
    with scheduler_on("tiny-vlm", max_rows=4) as (engine, sched):
        good = request(engine, "Describe the image.", images=1, max_tokens=16, temperature=0.0)
        constrained = request(engine, "Label it.", max_tokens=40, temperature=0.0, json_schema=SCHEMA)
        bad = request(engine, "hi", max_tokens=4, logit_bias={10**9: 1.0})
        rows = [Collector() for _ in range(3)]
        sched.submit(engine.prepare(good), rows[0])
        wait_for_step(sched, 2)
        sched.submit(engine.prepare(constrained), rows[1])
        sched.submit(engine.prepare(bad), rows[2])
        assert (
            rows[2].wait().last.error_type == "invalid_request_error" and "logit_bias" in rows[2].last.error
        )
        assert rows[0].wait().tokens == engine.generate([good])[0].token_ids
        assert rows[1].wait().text == engine.generate([constrained])[0].text
        assert rows[1].text.startswith("{") and rows[1].last.finish_reason == "stop"


def test_encoder_decoder_rows_are_admitted_between_batches():
    with scheduler_on("tiny-florence2", max_rows=4) as (engine, sched):
        assert not sched.merges_mid_flight
        finished: list[Collector] = []
        first, second = Collector(finished), Collector(finished)
        req = GenerationRequest(
            messages=[{"role": "user", "content": [{"type": "image", "image": draw_sample_image(0)},
                                                    {"type": "text", "text": "<CAPTION>"}]}],
            params=SamplingParams(max_tokens=12, temperature=0.0, logit_bias={t: -100.0 for t in engine.eos_token_ids}),
        )  # fmt: skip
        sched.submit(engine.prepare(req), first)
        wait_for_step(sched, 1)
        sched.submit(engine.prepare(req), second)
        assert sched.stats()["queue_length"] == 1  # it waits for the running batch to drain
        first.wait(), second.wait()
        assert sched.stats()["admissions"] == [1, 1]
        assert (
            finished == [first, second]
            and first.tokens == second.tokens == engine.generate([req])[0].token_ids
        )


def test_a_lone_request_waits_for_company_only_where_latecomers_could_not_join():
    """idle_wait_s gathers a burst for a family that admits between batches; a merging one starts at once."""
    wait_s = 3.0
    with scheduler_on("tiny-llm", max_rows=4, idle_wait_s=wait_s) as (engine, sched):
        assert sched.merges_mid_flight
        alone = Collector([])
        began = time.monotonic()
        sched.submit(engine.prepare(request(engine, "Hello there.", max_tokens=4)), alone)
        alone.wait()
        assert time.monotonic() - began < wait_s / 2  # it did not wait for company
        joined = Collector([])  # and one that comes while a row decodes joins it mid-flight
        long = Collector([])
        sched.submit(engine.prepare(request(engine, "A long one.", max_tokens=60)), long)
        wait_for_step(sched, sched.steps + 2)
        sched.submit(engine.prepare(request(engine, "A short one.", max_tokens=4)), joined)
        joined.wait(), long.wait()
        assert max(sched.stats()["step_rows"]) == 2
    with scheduler_on("tiny-florence2", max_rows=4, idle_wait_s=0.5) as (engine, sched):
        assert not sched.merges_mid_flight
        req = GenerationRequest(
            messages=[{"role": "user", "content": [{"type": "image", "image": draw_sample_image(0)},
                                                    {"type": "text", "text": "<CAPTION>"}]}],
            params=SamplingParams(max_tokens=4, temperature=0.0),
        )  # fmt: skip
        first, second = Collector([]), Collector([])
        prepared = engine.prepare(req)
        sched.submit(prepared, first)
        time.sleep(0.1)  # within the wait: both start in one batch
        sched.submit(prepared, second)
        first.wait(), second.wait()
        assert sched.stats()["admissions"] == [2]


def test_async_stream_does_not_block_the_loop_and_leaving_cancels():
    engine = engine_for("tiny-llm")
    sched = Scheduler(engine, max_rows=4)
    full = request(engine, "Name three colours.", max_tokens=16, temperature=0.0)

    async def main() -> tuple[list[int], int, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        tick_task = asyncio.create_task(ticker())

        async def read_all() -> list[int]:
            return [t async for d in sched.stream(engine.prepare(full)) for t in d.token_ids]

        async def leave_after_two() -> int:
            seen = 0
            async for _ in sched.stream(engine.prepare(request(engine, "A long story.", max_tokens=300))):
                seen += 1
                if seen == 2:
                    break  # the client left
            return seen

        tokens, seen = await asyncio.gather(read_all(), leave_after_two())
        tick_task.cancel()
        return tokens, seen, ticks

    try:
        tokens, seen, ticks = asyncio.run(main())
        assert tokens == engine.generate([full])[0].token_ids and seen == 2
        assert ticks > 5  # the event loop ran while the rows decoded
        wait_until(
            lambda: sched.stats()["cancelled_rows"],
            "the row of the stream that was left was never cancelled",
            timeout_s=30,
            every_s=0.01,
        )
        assert sched.stats()["cancelled_rows"][0] < 300
    finally:
        sched.close()


def test_a_reader_that_falls_behind_gets_the_missed_steps_as_one_delta():
    engine = engine_for("tiny-llm")
    sched = Scheduler(engine, max_rows=4)
    full = request(engine, "Name three colours.", max_tokens=24, temperature=0.0, logprobs=1)
    alone = engine.generate([full])[0]

    async def read(pause_s: float) -> list[StreamDelta]:
        got = []
        async for delta in sched.stream(engine.prepare(full)):
            got.append(delta)
            await asyncio.sleep(pause_s)  # a busy event loop: the scheduler steps on meanwhile
        return got

    try:
        slow = asyncio.run(read(0.2))
        assert len(slow) < len(alone.token_ids)  # several steps per delta
        assert [t for d in slow for t in d.token_ids] == alone.token_ids
        assert "".join(d.text for d in slow) == alone.text
        assert [e.token for d in slow for e in d.logprobs] == [e.token for e in alone.logprobs or []]
        assert [d.done for d in slow] == [False] * (len(slow) - 1) + [True]
        assert (slow[-1].finish_reason, slow[-1].completion_tokens) == ("length", 24)
        keeping_up = asyncio.run(read(0.0))
        assert [t for d in keeping_up for t in d.token_ids] == alone.token_ids

        async def read_every(interval: int) -> list[StreamDelta]:
            return [d async for d in sched.stream(engine.prepare(full), stream_interval=interval)]

        chunked = asyncio.run(read_every(5))
        sizes = [len(d.token_ids) for d in chunked]
        # The first delta goes out with the first token (more only if this reader was late to wake).
        assert sizes[0] < 5 and all(n >= 5 for n in sizes[1:-1]) and sum(sizes) == 24, sizes
        assert [t for d in chunked for t in d.token_ids] == alone.token_ids
        with pytest.raises(ValueError, match="stream_interval"):
            sched.stream(engine.prepare(full), stream_interval=0)
    finally:
        sched.close()


class SlowSteps(Scheduler):
    """A scheduler whose every step takes 20 ms more (a slower model): an idle reader sees every step."""

    def _iterate(self, batch, newcomers) -> None:
        super()._iterate(batch, newcomers)
        time.sleep(0.02)


def test_deltas_go_out_at_once_until_one_shows_text():
    """A row's first tokens may show no text yet (here a stop-string prefix is held back): chunking waits
    for the first text, or a client's time to first token would wait a whole chunk more."""
    engine = engine_for("tiny-llm")
    sched = SlowSteps(engine, max_rows=4)
    plain = request(engine, "Name three colours.", max_tokens=24, temperature=0.0)
    alone = engine.generate([plain])[0]
    two = engine.generate([replace(plain, params=replace(plain.params, max_tokens=2))])[0].text
    assert two and alone.text.startswith(two)
    # Starts like the answer's first two tokens and never matches: their text is held back.
    held = replace(plain, params=replace(plain.params, stop=[two + "\x00"]))

    async def read(interval: int) -> list[StreamDelta]:
        return [d async for d in sched.stream(engine.prepare(held), stream_interval=interval)]

    try:
        every = asyncio.run(read(1))
        assert "".join(d.text for d in every) == alone.text
        shows_at = 0  # tokens until the first text: at least the two held back
        for delta in every:
            shows_at += len(delta.token_ids)
            if delta.text:
                break
        assert 3 <= shows_at < 10, shows_at
        chunked = asyncio.run(read(10))
        assert "".join(d.text for d in chunked) == alone.text
        assert [t for d in chunked for t in d.token_ids] == alone.token_ids
        first = next(i for i, d in enumerate(chunked) if d.text)
        sizes = [len(d.token_ids) for d in chunked]
        # The first text comes out with its own token (a late reader may merge a few), not a chunk later.
        assert sum(sizes[: first + 1]) < 10 and first >= 1, sizes
        assert all(n >= 10 for n in sizes[first + 1 : -1]), sizes
    finally:
        sched.close()


def test_a_streamed_row_wakes_its_event_loop_once_per_chunk_not_per_token():
    engine = engine_for("tiny-llm")
    sched = Scheduler(engine, max_rows=4)
    full = request(engine, "Name three colours.", max_tokens=40, temperature=0.0)

    async def read() -> tuple[list[StreamDelta], int]:
        loop = asyncio.get_running_loop()
        real, wakes = loop.call_soon_threadsafe, [0]

        def counting(*args, **kwargs):
            wakes[0] += 1
            return real(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        got = [d async for d in sched.stream(engine.prepare(full), stream_interval=10)]
        return got, wakes[0]

    try:
        got, wakes = asyncio.run(read())
        assert [t for d in got for t in d.token_ids] == engine.generate([full])[0].token_ids
        # 40 tokens in chunks of 10 after the first: about 5 wake-ups, not 40 (one per step)
        assert len(got) <= 6 and wakes <= len(got) + 1, (len(got), wakes)
    finally:
        sched.close()


def test_an_error_behind_text_comes_alone_after_it():
    async def main() -> list[StreamDelta]:
        outbox = _Outbox(asyncio.get_running_loop())
        outbox.put(StreamDelta(text="Hi", token_ids=[1]))
        outbox.want(5)
        first = await outbox.take()
        outbox.put(StreamDelta(text=" there", token_ids=[2]))
        outbox.put(StreamDelta(text="!", token_ids=[3]))
        outbox.put(StreamDelta(finish_reason="error", error="boom", error_type="server_error"))
        return first + await outbox.take()

    chunks = asyncio.run(main())
    assert [(c.text, c.token_ids, c.error) for c in chunks] == [
        ("Hi", [1], None),
        (" there!", [2, 3], None),  # held below 5 tokens until the error ended the row
        ("", [], "boom"),
    ]


def test_the_auto_stream_interval_grows_with_the_running_rows():
    sched = Scheduler(engine_for("tiny-llm"), max_rows=64)
    try:
        picks = {}
        for running in (0, 1, 3, 4, 8, 32, 64):
            sched._running = running  # what the loop thread counts; read as a heuristic
            picks[running] = sched.auto_stream_interval()
        assert picks == {0: 1, 1: 1, 3: 1, 4: 2, 8: 4, 32: 16, 64: 16}
    finally:
        sched._running = 0
        sched.close()


def test_deltas_merge_text_tokens_and_take_the_last_ones_end():
    first = StreamDelta(text="Hel", token_ids=[1])
    last = StreamDelta(
        text="lo", token_ids=[2, 3], finish_reason="stop", prompt_tokens=5, completion_tokens=3
    )
    merged = first.followed_by(last)
    assert (merged.text, merged.token_ids, merged.finish_reason) == ("Hello", [1, 2, 3], "stop")
    assert (merged.prompt_tokens, merged.completion_tokens, merged.done) == (5, 3, True)
    assert not first.followed_by(StreamDelta(text="!", token_ids=[4])).done


def test_a_failed_forward_pass_fails_only_the_rows_it_served(monkeypatch):
    with scheduler_on("tiny-llm", max_rows=4) as (engine, sched):
        real_prefill, real_step = engine.prefill, engine.decode_step
        long_req = request(engine, "Name three colours.", max_tokens=20, temperature=0.0)
        running, newcomer = Collector(), Collector()
        sched.submit(engine.prepare(long_req), running)
        wait_for_step(sched, 2)

        def failing_prefill(prepared):
            monkeypatch.setattr(engine, "prefill", real_prefill)  # fails once
            raise RuntimeError("prefill blew up")

        monkeypatch.setattr(engine, "prefill", failing_prefill)
        sched.submit(engine.prepare(request(engine, "hi", max_tokens=4)), newcomer)
        assert newcomer.wait().last.error_type == "server_error"  # the newcomers' prefill failed: theirs only
        assert running.wait().tokens == engine.generate([long_req])[0].token_ids

        def failing_step(tokens, state):
            monkeypatch.setattr(engine, "decode_step", real_step)
            raise RuntimeError("decode step blew up")

        doomed, after = Collector(), Collector()
        monkeypatch.setattr(engine, "decode_step", failing_step)
        sched.submit(engine.prepare(long_req), doomed)
        assert doomed.wait().last.error_type == "server_error"  # the shared step failed: its rows end
        sched.submit(engine.prepare(long_req), after)  # and the loop serves on
        assert after.wait().tokens == engine.generate([long_req])[0].token_ids


@pytest.mark.parametrize("name", ["tiny-llm", "tiny-vlm"])
def test_a_long_prompt_prefills_in_chunks_between_the_running_rows_steps(name):
    """Chunked prefill: the long prompt's tokens equal its unchunked ones, and the running row keeps
    taking tokens while the long prompt's chunks run (it does not wait for the whole prefill)."""
    with scheduler_on(name, max_rows=4, max_queue=4, prefill_chunk_tokens=8) as (engine, sched):
        running = request(engine, "hi", max_tokens=40, temperature=0.0)
        long = request(engine, "a photo of a dog and a cat on the beach " * 8, max_tokens=6, temperature=0.0)
        prepared_long = engine.prepare(long)
        assert prepared_long.prompt_tokens > 5 * 8  # several chunks
        chunks_seen: list[int] = []
        long_queued = threading.Event()

        def on_token(row: Collector) -> None:
            chunks_seen.append(sched.prefill_chunks)
            if len(row.deltas) == 2:  # the loop waits here until the long prompt is queued: on a busy
                assert long_queued.wait(60)  # machine the running row could otherwise finish first

        running_row = Collector(on_token=on_token)
        prepared_running = engine.prepare(running)
        before = -(-prepared_running.prompt_tokens // 8) if prepared_running.prompt_tokens > 8 else 0
        sched.submit(prepared_running, running_row)
        wait_until(lambda: len(running_row.deltas) >= 2, "the running row never took its second token")
        long_row = Collector()
        sched.submit(prepared_long, long_row)
        long_queued.set()
        long_row.wait()
        running_row.wait()
        expected_chunks = before + -(-prepared_long.prompt_tokens // 8)
        assert sched.stats()["prefill_chunks"] == expected_chunks
        assert long_row.tokens == engine.generate([long])[0].token_ids
        assert running_row.tokens == engine.generate([running])[0].token_ids
        # Tokens of the running row arrived between chunks, one chunk apart at most.
        during = [c for c in chunks_seen if before < c < expected_chunks]
        assert len(set(during)) >= expected_chunks - before - 2, chunks_seen


def test_prompts_with_images_are_prefilled_whole():
    with scheduler_on("tiny-vlm", max_rows=4, max_queue=4, prefill_chunk_tokens=8) as (engine, sched):
        with_image = request(engine, "What is in the photo? " * 6, images=1, max_tokens=4, temperature=0.0)
        row = Collector()
        sched.submit(engine.prepare(with_image), row)
        row.wait()
        assert sched.stats()["prefill_chunks"] == 0
        assert row.tokens == engine.generate([with_image])[0].token_ids


@contextmanager
def per_row_sampling(engine: VLMEngine) -> Iterator[None]:
    """The engine's reference path: every row adjusts, checks and samples its own logits."""
    engine.batched_sampling = False
    try:
        yield
    finally:
        engine.batched_sampling = True


def test_batched_sampling_equals_the_per_row_path_on_a_mixed_batch():
    """The batched sampling path (one argmax and one indexed logit_bias add per step for the batch) picks
    what each row picks alone on the per-row path: greedy rows with and without logit_bias, seeded
    sampling with top_p, penalties, logprobs and a JSON grammar, in one batch and through the scheduler."""
    engine = engine_for("tiny-llm")
    plain = GenerationRequest(
        messages=[{"role": "user", "content": "hello there"}], params=SamplingParams(max_tokens=24, temperature=0.0)
    )  # fmt: skip
    mixed = [
        plain,
        request(engine, "Describe a dog.", max_tokens=24, temperature=0.0, logit_bias={5: 30.0}),
        request(engine, "Tell a story.", max_tokens=24, temperature=0.9, top_p=0.8, seed=7),
        request(engine, "Count.", max_tokens=24, temperature=0.7, seed=3, frequency_penalty=1.5, presence_penalty=0.5),
        request(engine, "Say hi.", max_tokens=12, temperature=0.0, logprobs=3, presence_penalty=-1.0),
        request(engine, "Label it.", max_tokens=40, temperature=0.0, json_schema=SCHEMA),
    ]  # fmt: skip

    def outputs(results) -> list[tuple]:
        return [(r.token_ids, r.text, r.finish_reason, r.logprobs) for r in results]

    with per_row_sampling(engine):
        reference = outputs(engine.generate(mixed))
    assert outputs(engine.generate(mixed)) == reference
    with scheduler_on("tiny-llm", max_rows=8, max_queue=8) as (_, sched):
        rows = [Collector() for _ in mixed]
        sched.submit_many([engine.prepare(r) for r in mixed], lambda i, delta: rows[i](delta))
        for row, (tokens, text, reason, _) in zip(rows, reference, strict=True):
            row.wait()
            assert (row.tokens, row.text, row.last.finish_reason) == (tokens, text, reason)


def test_batched_token_picks_raise_what_each_row_raises_alone():
    """`pick_tokens` finds a row's NaN, +inf and all-masked logits from the batch's one argmax and gives
    that row its error; the other rows get their tokens, the same as each drawn alone."""
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor(
        [[0.0, 2.0, 2.0, 1.0], [1.0, nan, 3.0, 0.0], [-inf, 1.0, inf, 0.0], [-inf] * 4, [0.5, 0.1, 0.3, 0.2]]
    )  # fmt: skip
    params = [SamplingParams(temperature=0.0)] * 4 + [SamplingParams(temperature=0.8, seed=1)]
    picks = pick_tokens(logits, params, [row_generator(p) for p in params])
    assert [type(p).__name__ for p in picks] == [
        "int",
        "SamplingError",
        "SamplingError",
        "NoTokenError",
        "int",
    ]
    assert picks[0] == 1  # a tie goes to the first maximum, as the 1-D argmax picks it
    assert picks[4] == pick_tokens(logits[4:], params[4:], [row_generator(params[4])])[0]
    with pytest.raises(NoTokenError, match="no token may follow"):
        sample_token(logits[3], params[0], row_generator(params[0]))
    _, problems = sampling_distributions(logits, params)
    assert [type(p).__name__ for p in problems] == [
        "NoneType",
        *[type(p).__name__ for p in picks[1:4]],
        "NoneType",
    ]


@pytest.mark.parametrize(
    "temperature, top_p",
    [(0.0, 1.0), (0.7, 1.0), (1.3, 0.6), (0.9, 0.95), (0.5, 1e-300)],
)
def test_the_draws_follow_the_distributions_speculative_decoding_compares(temperature, top_p):
    """Speculative decoding keeps the model's output distribution only if `sampling_distributions` is the
    distribution `pick_tokens` really draws from: the same temperature, the same top_p cut (no token
    outside it ever drawn), one-hot for greedy rows."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -6.0]])
    params = SamplingParams(temperature=temperature, top_p=top_p)
    expected = sampling_distributions(logits, [params])[0][0]
    draws = 6000
    counts = torch.zeros(8)
    rows = pick_tokens(
        logits.expand(draws, -1),
        [params] * draws,
        [row_generator(SamplingParams(seed=s)) for s in range(draws)],
    )
    for token in rows:
        counts[token] += 1
    observed = counts / draws
    assert torch.all(observed[expected == 0] == 0)
    assert torch.allclose(observed, expected, atol=0.025), (observed, expected)
