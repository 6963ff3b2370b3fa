"""`raybooth batch` on the session's embedded Ray with tiny-vlm: OpenAI batch lines in and out, errors, resume, S3.

.venv/bin/python -m pytest tests/pipelines/test_batch.py
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import jsonschema
import pytest

from raybooth.cli import main
from raybooth.cluster import storage
from raybooth.cluster.config import BatchConfig
from raybooth.models.vlm_engine import INVALID_REQUEST, SERVER_ERROR, GenerationResult
from raybooth.openai.protocol import BatchOutputLine, ChatCompletionResponse
from raybooth.pipelines.batch import batch_output_line, parts_uri_for, run_batch
from raybooth.pipelines.inference import RowStats
from raybooth.samples import draw_sample_image, png_bytes

pytestmark = pytest.mark.slow

FAST = {"max_prepare_tasks": 2}
SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["cat", "dog"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["label", "count"],
    "additionalProperties": False,
}


def data_url(index: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(draw_sample_image(index, size=32))).decode()


def request_line(custom_id: str, content, **body) -> str:
    return json.dumps(
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "tiny-vlm", "messages": [{"role": "user", "content": content}], **body},
        }
    )


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def read_lines(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines()]


def test_openai_batch_lines_in_and_out(ray_cluster, tmp_path):
    photo = tmp_path / "photo.png"
    draw_sample_image(5, size=32).save(photo)
    lines = [
        request_line("text-only", "Say hello.", max_tokens=6, temperature=0),
        request_line(
            "one-image", [{"type": "text", "text": "What is this?"}, image_part(data_url(1))], max_tokens=6
        ),
        request_line(
            "two-images",
            [image_part(str(photo)), image_part(data_url(2)), {"type": "text", "text": "Compare them."}],
            max_completion_tokens=5,
            temperature=0.8,
            top_p=0.9,
            seed=11,
        ),
        request_line(
            "json",
            "Label the picture.",
            max_tokens=64,
            response_format={"type": "json_schema", "json_schema": {"name": "label", "schema": SCHEMA}},
        ),
        "{this is not json",
        "",  # blank lines are not requests and get no output line
        request_line("unreachable", [image_part(str(tmp_path / "gone.png")), {"type": "text", "text": "?"}]),
        request_line(
            "bad-schema", "x", response_format={"type": "json_schema", "json_schema": {"schema": {"type": 7}}}
        ),
        request_line("seeded-a", "a", max_tokens=8, temperature=1.0, seed=42),
        request_line("seeded-b", "a", max_tokens=8, temperature=1.0, seed=42),
        json.dumps({"custom_id": "wrong-url", "method": "POST", "url": "/v1/embeddings", "body": {}}),
        request_line("two-choices", "a", max_tokens=4, n=2),  # one choice per line: refused, not cut to one
        request_line("typo", "a", max_tokens=4, temprature=0),  # an unknown field: refused, not ignored
        request_line("logprobs", "a", max_tokens=4, temperature=0, logprobs=True, top_logprobs=2),
        request_line("bias-outside", "a", max_tokens=4, logit_bias={"99999999": 1}),  # no such token id
        request_line(
            "tool-call",
            "Label the picture.",
            max_tokens=96,
            tools=[{"type": "function", "function": {"name": "label", "parameters": SCHEMA}}],
            tool_choice={"type": "function", "function": {"name": "label"}},
        ),
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    results = tmp_path / "results.jsonl"

    summary = run_batch(BatchConfig(input=str(requests), output=str(results), **FAST))
    out = read_lines(str(results))
    for line in out:
        BatchOutputLine.model_validate(line)  # OpenAI's batch output shape, every line
    assert [o["custom_id"] for o in out] == [
        "text-only", "one-image", "two-images", "json", None, "unreachable", "bad-schema", "seeded-a", "seeded-b",
        "wrong-url", "two-choices", "typo", "logprobs", "bias-outside", "tool-call",
    ]  # fmt: skip
    ok = {o["custom_id"]: o for o in out if o["response"] and o["response"]["status_code"] == 200}
    assert set(ok) == {
        "text-only", "one-image", "two-images", "json", "seeded-a", "seeded-b", "logprobs", "tool-call"
    }  # fmt: skip
    for o in ok.values():
        body = ChatCompletionResponse.model_validate(o["response"]["body"])
        assert body.object == "chat.completion" and body.model == "tiny-vlm" and o["error"] is None
        assert body.usage.total_tokens == body.usage.prompt_tokens + body.usage.completion_tokens
    usage = {k: ok[k]["response"]["body"]["usage"] for k in ok}
    assert usage["text-only"]["completion_tokens"] <= 6 and usage["two-images"]["completion_tokens"] <= 5
    # Two images cost their image tokens: the two-image prompt is much longer than the one-image one.
    assert usage["two-images"]["prompt_tokens"] >= usage["one-image"]["prompt_tokens"] + 16
    answer = ok["json"]["response"]["body"]["choices"][0]
    assert answer["finish_reason"] == "stop"
    jsonschema.validate(json.loads(answer["message"]["content"]), SCHEMA)
    content = {k: ok[k]["response"]["body"]["choices"][0]["message"]["content"] for k in ok}
    assert content["seeded-a"] == content["seeded-b"]  # same seed, same sample, whatever the batch

    not_json = out[4]
    assert not_json["response"] is None and not_json["error"]["code"] == "invalid_json"
    assert "line 5" in not_json["error"]["message"]
    unreachable = out[5]["response"]
    assert unreachable["status_code"] == 400
    assert (
        "missing image" in unreachable["body"]["error"]["message"]
        and "gone.png" in unreachable["body"]["error"]["message"]
    )
    assert unreachable["body"]["error"]["param"] == "messages[0].content[0].image_url"
    assert (
        out[6]["response"]["status_code"] == 400
        and "cannot be compiled" in out[6]["response"]["body"]["error"]["message"]
    )
    assert out[9]["response"] is None and "line 11" in out[9]["error"]["message"]
    two_choices = out[10]["response"]
    assert two_choices["status_code"] == 400 and two_choices["body"]["error"]["param"] == "n"
    typo = out[11]["response"]
    assert typo["status_code"] == 400 and typo["body"]["error"]["param"] == "temprature"
    scored = ok["logprobs"]["response"]["body"]["choices"][0]
    entries = scored["logprobs"]["content"]
    assert 1 <= len(entries) <= 4 and all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in entries)
    assert all(ok[k]["response"]["body"]["choices"][0]["logprobs"] is None for k in ok if k != "logprobs")
    outside = out[13]["response"]
    assert outside["status_code"] == 400 and "vocabulary" in outside["body"]["error"]["message"]
    called = ok["tool-call"]["response"]["body"]["choices"][0]
    assert called["finish_reason"] == "stop" and called["message"]["content"] is None
    [call] = called["message"]["tool_calls"]
    assert call["function"]["name"] == "label"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMA)
    assert (summary.rows, summary.failed) == (15, 7)


def test_rerun_finishes_the_file_without_duplicates(ray_cluster, tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        "".join(request_line(f"r{i}", f"question {i}", max_tokens=3) + "\n" for i in range(20))
    )
    results = tmp_path / "results.jsonl"
    first = run_batch(BatchConfig(input=str(requests), output=str(results), limit=7, **FAST))
    assert first.rows == 7 and not results.exists()  # results.jsonl appears only when every line is done
    # A cut-off part from a crash is dropped, not trusted.
    part = storage.list_files(parts_uri_for(str(results)), [".parquet"])[0]
    Path(parts_uri_for(str(results)), "crashed.parquet").write_bytes(Path(part).read_bytes()[:64])

    second = run_batch(BatchConfig(input=str(requests), output=str(results), **FAST))
    assert (second.rows, second.skipped) == (13, 7)
    assert [o["custom_id"] for o in read_lines(str(results))] == [f"r{i}" for i in range(20)]
    before = results.read_text()
    third = run_batch(BatchConfig(input=str(requests), output=str(results), **FAST))
    assert (third.rows, third.skipped) == (0, 20) and results.read_text() == before


def test_input_output_and_images_on_s3(ray_cluster, s3_bucket):
    image_uri = f"s3://{s3_bucket}/images/cat.png"
    storage.write_bytes_atomic(image_uri, png_bytes(draw_sample_image(3, size=32)))
    lines = [
        request_line(
            "s3-image", [image_part(image_uri), {"type": "text", "text": "Describe."}], max_tokens=4
        ),
        request_line("s3-missing", [image_part(f"s3://{s3_bucket}/images/nope.png")], max_tokens=4),
        request_line("text", "hi", max_tokens=4),
    ]
    storage.write_text_atomic(f"s3://{s3_bucket}/in/requests.jsonl", "\n".join(lines) + "\n")
    output = f"s3://{s3_bucket}/out/results.jsonl"
    run_batch(BatchConfig(input=f"s3://{s3_bucket}/in/requests.jsonl", output=output, **FAST))
    out = read_lines(output)
    assert [o["custom_id"] for o in out] == ["s3-image", "s3-missing", "text"]
    assert [o["response"]["status_code"] for o in out] == [200, 400, 200]
    assert "missing image" in out[1]["response"]["body"]["error"]["message"]


def test_cli_fails_fast(tmp_path, capsys):
    assert (
        main(["batch", "--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "r.jsonl")]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "in.jsonl").write_text("{}\n")
    assert main(["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("error_type", "status", "code"),
    [(INVALID_REQUEST, 400, "invalid_request"), (SERVER_ERROR, 500, "server_error")],
)
def test_a_row_the_engine_failed_is_its_own_error_with_the_engines_status(error_type, status, code):
    """The engine says whose fault a failed row is; the batch line carries the status the route would send."""
    row = {
        "row_id": 3, "custom_id": "r3", "error": None, "error_kind": None, "error_code": None,
        "error_param": None, "tool_format": None,
    }  # fmt: skip
    result = GenerationResult("", "error", 5, 0, error="the row failed", error_type=error_type)
    line = batch_output_line(row, result, RowStats(), "tiny-vlm")
    assert line.response.status_code == status
    assert line.response.body["error"]["code"] == code
    assert line.response.body["error"]["message"] == "line 3: the row failed"


@pytest.mark.parametrize("model", ["tiny-llm", "tiny-qwen2.5-vl"])
def test_batch_on_a_text_llm_and_qwen_vl(ray_cluster, tmp_path, model):
    """Text lines (one JSON-constrained, one with logprobs) and an image line: a text-only LLM answers the
    text and refuses the image with a 400 naming itself; Qwen-VL answers all three. The LLM runs with
    `quantization: int8` and `speculative` (itself as the draft): its answer is int8's own greedy answer."""
    lines = [
        request_line("plain", "Write a short caption for this photo.", max_tokens=5, temperature=0.0),
        request_line(
            "json",
            "Answer in JSON.",
            max_tokens=40,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}},
            logprobs=True,
        ),
        request_line(
            "image", [image_part(data_url(1)), {"type": "text", "text": "Describe it."}], max_tokens=5
        ),
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    options = {}
    if model == "tiny-llm":
        options = {"quantization": "int8", "speculative": {"draft_model": "tiny-llm", "num_tokens": 2}}
    summary = run_batch(BatchConfig(input=str(src), output=str(out), model=model, **FAST, **options))
    by_id = {line["custom_id"]: line["response"] for line in read_lines(str(out))}
    assert by_id["plain"]["status_code"] == 200
    answer = by_id["json"]["body"]["choices"][0]
    jsonschema.validate(json.loads(answer["message"]["content"]), SCHEMA)
    assert answer["logprobs"]["content"]
    if model == "tiny-llm":
        from raybooth.cluster.workdir import default_models_dir
        from raybooth.models.decoding import SamplingParams
        from raybooth.models.vlm_engine import GenerationRequest, VLMEngine

        alone = VLMEngine.from_pretrained(
            "tiny-llm", device="cpu", models_dir=default_models_dir(), quantization="int8"
        )
        messages = [{"role": "user", "content": "Write a short caption for this photo."}]
        [expected] = alone.generate(
            [GenerationRequest(messages, SamplingParams(max_tokens=5, temperature=0))]
        )
        assert by_id["plain"]["body"]["choices"][0]["message"]["content"] == expected.text
        assert by_id["image"]["status_code"] == 400
        assert "model tiny-llm takes no images" in by_id["image"]["body"]["error"]["message"]
        assert (summary.rows, summary.failed) == (3, 1)
    else:
        assert by_id["image"]["status_code"] == 200 and (summary.rows, summary.failed) == (3, 0)
