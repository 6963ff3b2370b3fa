"""Both batch jobs' per-row path on every VLM preset (and `raybooth batch` on the text-only LLM), without Ray:
each job's CPU stage (`prepare_caption_items`, `prepare_request_line`) and its model replica
(`CaptionWorker`, `BatchWorker`, continuous batching), set up from the job's config as the job does, on
images of two sizes; every row succeeds and equals the engine on that request alone. The Ray Data plumbing
around these stages is family-blind and tested in test_caption.py / test_batch.py; a job per family
would cost minutes.

    .venv/bin/python -m pytest tests/pipelines/test_job_families.py
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from raybooth.cluster.config import BatchConfig, CaptionConfig
from raybooth.cluster.workdir import default_models_dir
from raybooth.models.presets import resolve_model
from raybooth.openai.chat import ChatLimits
from raybooth.pipelines import batch, caption
from raybooth.pipelines.inference import load_processor, prepared_from_row, worker_kwargs
from raybooth.samples import draw_sample_image, png_bytes, write_sample_images

# What each family reads as its text: a task prompt (Florence-2), a prefix prompt (PaliGemma), else a question.
PROMPTS = {"tiny-florence2": "<CAPTION>", "tiny-paligemma": "caption en"}
VLM_PRESETS = [
    "tiny-vlm", "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-smolvlm", "tiny-idefics2", "tiny-llava-next",
    "tiny-llava-onevision", "tiny-mllama", "tiny-florence2", "tiny-paligemma", "tiny-mistral3",
]  # fmt: skip


def model_folder(preset: str) -> str:
    return str(resolve_model(preset, models_dir=default_models_dir()))


def answered_alone(worker, prepared_row: dict) -> tuple[str, int]:
    alone = worker.engine.generate([prepared_from_row(prepared_row)])[0]
    return alone.text, alone.completion_tokens


@pytest.mark.parametrize("preset", VLM_PRESETS)
def test_caption_rows_on_each_family_succeed_as_the_engine_alone(preset, tmp_path):
    write_sample_images(tmp_path / "imgs", 2, size=48)
    Image.new("RGB", (64, 32), (200, 40, 0)).save(tmp_path / "imgs" / "wide.png")
    prompt = {"prompt": PROMPTS[preset]} if preset in PROMPTS else {}
    cfg = CaptionConfig(input=str(tmp_path / "imgs"), output=str(tmp_path / "out"), model=model_folder(preset),
                        max_new_tokens=4, **prompt)  # fmt: skip
    items, _ = caption.caption_work_items(caption.check_caption_config(cfg), set())
    prepared = caption.prepare_caption_items(
        pa.Table.from_pylist(items), **caption.caption_prepare_kwargs(cfg)
    )
    assert prepared.column("error").to_pylist() == [None] * 3, prepared.column("error").to_pylist()
    worker = caption.CaptionWorker(**worker_kwargs(cfg, counter=None))
    try:
        rows = worker(prepared).to_pylist()
        assert [r["error"] for r in rows] == [None] * 3, rows
        assert sorted(Path(r["path"]).name for r in rows) == ["img_00000.png", "img_00001.png", "wide.png"]
        for row, source in zip(rows, prepared.to_pylist(), strict=True):
            assert (row["caption"], row["completion_tokens"]) == answered_alone(worker, source)
    finally:
        worker.close()


def request_lines(preset: str) -> list[bytes]:
    """Two requests with images of different sizes (VLMs), or two text requests (the text-only LLM)."""
    out = []
    for i, size in enumerate((32, 48)):
        png = png_bytes(draw_sample_image(i, size=size))
        image = {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()},
        }
        content = [image, {"type": "text", "text": PROMPTS.get(preset, "Describe the image.")}]
        if preset == "tiny-llm":
            content = [{"type": "text", "text": f"Say something about the number {i}."}]
        body = {"model": preset, "messages": [{"role": "user", "content": content}], "max_tokens": 3 + i}
        out.append(json.dumps({"custom_id": f"{preset}-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": body}).encode())  # fmt: skip
    return out


@pytest.mark.parametrize("preset", [*VLM_PRESETS, "tiny-llm"])
def test_batch_lines_on_each_family_answer_200_as_the_engine_alone(preset, tmp_path):
    cfg = BatchConfig(
        input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out.jsonl"), model=model_folder(preset)
    )
    processor = load_processor(cfg.model)
    limits = ChatLimits.for_batch(cfg)
    prepared = [
        batch.prepare_request_line(n, raw, processor, limits, cfg.seed)
        for n, raw in enumerate(request_lines(preset))
    ]
    assert [row["error"] for row in prepared] == [None, None], prepared
    worker = batch.BatchWorker(**{**worker_kwargs(cfg, counter=None), "model_label": preset})
    try:
        out = worker(pa.Table.from_pylist(prepared, schema=batch.PREPARED_SCHEMA)).to_pylist()
        assert [row["error"] for row in out] == [None, None], out
        for row, source in zip(out, prepared, strict=True):
            line = json.loads(row["line"])
            assert line["custom_id"] == source["custom_id"] and line["response"]["status_code"] == 200
            body = line["response"]["body"]
            usage = body["usage"]["completion_tokens"]
            assert (body["choices"][0]["message"]["content"], usage) == answered_alone(worker, source)
    finally:
        worker.close()
