"""The batch jobs' model replica (`GenerationWorker`) without Ray: continuous batching vs packed batches.

.venv/bin/python -m pytest tests/pipelines/test_generation_worker.py
"""

from __future__ import annotations

import time

import pyarrow as pa
import pytest

from raybooth.cluster.workdir import default_models_dir
from raybooth.models.decoding import SamplingParams
from raybooth.models.presets import resolve_model
from raybooth.models.vlm_engine import GenerationRequest, prepare_request
from raybooth.models.vlm_scheduler import Scheduler
from raybooth.pipelines.caption import PREPARED_SCHEMA, CaptionWorker
from raybooth.pipelines.inference import load_processor, prepared_columns, prepared_from_row
from raybooth.pipelines.parts import run_counts
from raybooth.pipelines.scheduled_generation import generate_continuous, idle_slot_steps
from raybooth.samples import draw_sample_image

WORDS = ["a", "photo", "of", "a", "dog", "on", "the", "beach", "with", "a",
         "red", "ball", "and", "a", "cat", "sleeping", "on", "the", "sofa"]  # fmt: skip
ROWS = 12
MAX_ROWS = 4


def prepared_table(model: str) -> pa.Table:
    """ROWS rows of mixed prompt lengths and max_tokens (EOS banned, so a row's length is its max_tokens),
    one image each for a VLM; row 5 asks for a token id outside the vocabulary (refused by the engine)."""
    processor = load_processor(model)
    takes_images = hasattr(processor, "image_processor")
    rows = []
    for i in range(ROWS):
        parts = [{"type": "image", "image": draw_sample_image(i % 3)}] if takes_images else []
        parts.append({"type": "text", "text": " ".join(WORDS[: 2 + (i * 7) % len(WORDS)])})
        eos = getattr(processor, "tokenizer", processor).eos_token_id
        bias = {eos: -100.0} if i != 5 else {10**9: 1.0}
        params = SamplingParams(max_tokens=1 + (i * 5) % 11, temperature=0.0, logit_bias=bias)
        request = GenerationRequest(messages=[{"role": "user", "content": parts}], params=params)
        columns = prepared_columns(prepare_request(processor, request), None, time.perf_counter())
        rows.append({"row_id": f"r{i}", "path": None, **columns})
    return pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)


def worker(model: str, scheduler: str) -> CaptionWorker:
    return CaptionWorker(
        model=model, device="cpu", dtype=None, max_rows=MAX_ROWS, max_batch_tokens=8192,
        packing="token_budget", counter=None, model_label=model, scheduler=scheduler, pack_window=64,
    )  # fmt: skip


@pytest.fixture(scope="module", params=["tiny-vlm", "tiny-llm"])
def runs(request):
    """The same prepared rows through a continuous and a static replica of one model."""
    model = str(resolve_model(request.param, kind="vlm", models_dir=default_models_dir()))
    table = prepared_table(model)
    continuous, static = worker(model, "continuous"), worker(model, "static")
    try:
        yield continuous, table, continuous(table), static(table)
    finally:
        continuous.close()


def test_continuous_rows_equal_the_engine_alone_and_a_bad_row_fails_only_itself(runs):
    continuous, table, out, _ = runs
    rows = out.to_pylist()
    assert [r["row_id"] for r in rows] == [f"r{i}" for i in range(ROWS)]  # input order kept
    assert "logit_bias names token ids [1000000000]" in rows[5]["error"] and rows[5]["caption"] is None
    for i, (row, source) in enumerate(zip(rows, table.to_pylist(), strict=True)):
        if i == 5:
            continue
        alone = continuous.engine.generate([prepared_from_row(source)])[0]
        assert row["error"] is None and row["caption"] == alone.text, row
        assert row["completion_tokens"] == alone.completion_tokens == 1 + (i * 5) % 11
        assert row["decode_steps"] == row["completion_tokens"]  # one token per step without a draft
        assert 1 <= row["batch_rows"] <= MAX_ROWS
    # The slots stayed full: more rows than MAX_ROWS never decoded at once, and later rows joined mid-flight.
    assert max(r["batch_rows"] for r in rows) == MAX_ROWS


def test_continuous_pays_less_padding_than_packed_batches_on_mixed_lengths(runs):
    _, _, out, static_out = runs
    continuous, static = run_counts(out), run_counts(static_out)
    assert continuous["rows"] == static["rows"] == ROWS and continuous["failed"] == static["failed"] == 1
    fraction = {n: c["padding_tokens"] / c["padded_tokens"] for n, c in (("c", continuous), ("s", static))}
    assert fraction["c"] < fraction["s"], fraction
    # Both modes agree on the rows' text: the mode changes the batching, never an answer.
    assert out.column("caption").to_pylist() == static_out.column("caption").to_pylist()


def test_idle_slots_count_until_a_waiting_row_takes_the_slot_or_the_last_row_ends():
    # Rows 0 and 1 start at step 1; 0 ends at 2, its slot is taken by row 2 at step 5 (2 idle steps);
    # 1 ends at 6 and nobody takes its slot until the last step, 9.
    spans = {0: (1, 2), 1: (1, 6), 2: (5, 9)}
    assert idle_slot_steps(spans, end=9) == {0: 2, 1: 3, 2: 0}
    assert idle_slot_steps({0: (1, 3), 1: (1, 8)}, end=8) == {0: 5, 1: 0}  # a static batch


class LoopBug(BaseException):
    """Escapes the scheduler loop's `except Exception`, as a bug outside one iteration would."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_call_whose_scheduler_loop_died_fails_instead_of_waiting_forever(runs, monkeypatch):
    continuous, table, _, _ = runs
    scheduler = Scheduler(continuous.engine, max_rows=2, max_queue=8)

    def broken(batch, newcomers):
        raise LoopBug("the loop thread dies")

    monkeypatch.setattr(scheduler, "_iterate", broken)
    with pytest.raises(RuntimeError, match="generation scheduler stopped before its rows finished"):
        generate_continuous(scheduler, {0: prepared_from_row(table.to_pylist()[0])})
