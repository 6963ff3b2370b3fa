"""`raybooth batch`'s per-row path on every VLM preset and the text-only LLM, without Ray: OpenAI batch lines
→ the job's CPU stage (`prepare_request_line`) → its model replica (`BatchWorker`, continuous batching) →
200 lines whose answers equal the engine on each request alone. The Ray Data plumbing around these two
stages is tested once in tests/pipelines/test_batch.py; a job per family would cost minutes.

    .venv/bin/python -m pytest tests/pipelines/test_batch_families.py
"""

from __future__ import annotations

import base64
import json

import pyarrow as pa
import pytest

from raybooth.cluster.workdir import default_models_dir
from raybooth.models.presets import resolve_model
from raybooth.openai.chat import ChatLimits
from raybooth.pipelines.batch import PREPARED_SCHEMA, BatchWorker, prepare_request_line
from raybooth.pipelines.inference import load_processor, prepared_from_row
from raybooth.samples import draw_sample_image, png_bytes

# What each family reads as its text: a task prompt (Florence-2), a prefix prompt (PaliGemma), else a question.
PROMPTS = {"tiny-florence2": "<CAPTION>", "tiny-paligemma": "caption en"}
VLM_PRESETS = [
    "tiny-vlm", "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-smolvlm", "tiny-idefics2", "tiny-llava-next",
    "tiny-llava-onevision", "tiny-mllama", "tiny-florence2", "tiny-paligemma",
]  # fmt: skip


def data_url(index: int, size: int) -> str:
    png = png_bytes(draw_sample_image(index, size=size))
    return "data:image/png;base64," + base64.b64encode(png).decode()


def lines(preset: str) -> list[bytes]:
    """Two requests with images of different sizes (VLMs), or two text requests (the text-only LLM)."""
    out = []
    for i, size in enumerate((32, 48)):
        text = {"type": "text", "text": PROMPTS.get(preset, "Describe the image.")}
        content = [{"type": "image_url", "image_url": {"url": data_url(i, size)}}, text]
        if preset == "tiny-llm":
            content = [{"type": "text", "text": f"Say something about the number {i}."}]
        body = {"model": preset, "messages": [{"role": "user", "content": content}], "max_tokens": 3 + i}
        out.append(json.dumps({"custom_id": f"{preset}-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": body}).encode())  # fmt: skip
    return out


@pytest.mark.parametrize("preset", [*VLM_PRESETS, "tiny-llm"])
def test_batch_lines_on_each_family_answer_200_as_the_engine_alone(preset):
    model = str(resolve_model(preset, models_dir=default_models_dir()))
    processor = load_processor(model)
    prepared = [
        prepare_request_line(n, raw, processor, ChatLimits(), seed=0) for n, raw in enumerate(lines(preset))
    ]
    assert [row["error"] for row in prepared] == [None, None], prepared
    table = pa.Table.from_pylist(prepared, schema=PREPARED_SCHEMA)
    worker = BatchWorker(
        model=model, device="cpu", dtype=None, max_rows=4, max_batch_tokens=8192, packing="token_budget",
        counter=None, model_label=preset,
    )  # fmt: skip
    try:
        out = worker(table).to_pylist()
        assert [row["error"] for row in out] == [None, None], out
        for row, source in zip(out, prepared, strict=True):
            line = json.loads(row["line"])
            assert line["custom_id"] == source["custom_id"] and line["response"]["status_code"] == 200
            body = line["response"]["body"]
            alone = worker.engine.generate([prepared_from_row(source)])[0]
            assert body["choices"][0]["message"]["content"] == alone.text
            assert body["usage"]["completion_tokens"] == alone.completion_tokens
    finally:
        worker.close()
