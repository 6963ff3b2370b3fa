"""Chat request -> engine request: decoded images, sampling settings, and the `max_tokens` budget that
the chat route and the batch job both take from one function.

.venv/bin/python -m pytest tests/openai/test_chat.py
"""

from __future__ import annotations

import base64
import json

import pytest

from raybooth.cluster.config import BatchConfig, ServeConfig
from raybooth.models.safety import SafetyPolicy
from raybooth.openai.chat import ChatLimits, generation_request_from_chat, max_tokens_for
from raybooth.openai.errors import APIError
from raybooth.openai.protocol import ChatCompletionRequest
from raybooth.samples import draw_sample_image


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_chat_request_becomes_engine_request_with_decoded_images(tmp_path):
    path = tmp_path / "b.png"
    draw_sample_image(2).save(path)
    body = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare"},
                    {"type": "image_url", "image_url": {"url": str(path)}},
                    {"type": "image_url", "image_url": {"url": data_url(path.read_bytes())}},
                ],
            },
        ],
        "max_completion_tokens": 7,
        "temperature": 0.5,
        "stop": "\n",
        "seed": 4,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object"}},
        },
    }
    request = generation_request_from_chat(ChatCompletionRequest.model_validate(body), ChatLimits())
    assert request.messages[0] == {"role": "system", "content": "Be brief."}
    images = [p["image"] for p in request.messages[1]["content"] if p["type"] == "image"]
    assert len(images) == 2 and all(i.mode == "RGB" for i in images)
    p = request.params
    assert (p.max_tokens, p.temperature, p.stop, p.seed, p.json_schema) == (
        7,
        0.5,
        ["\n"],
        4,
        {"type": "object"},
    )


def test_chat_request_errors_name_the_part_and_the_cap(tmp_path):
    missing = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": str(tmp_path / "x.png")}}],
    }
    with pytest.raises(APIError, match="missing image") as info:
        generation_request_from_chat(ChatCompletionRequest(messages=[missing]), ChatLimits())
    assert info.value.param == "messages[0].content[0].image_url"
    too_many = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=5000)
    with pytest.raises(
        APIError, match="max_tokens=5000 exceeds the server limit max_tokens_cap=1024"
    ) as info:
        generation_request_from_chat(too_many, ChatLimits())
    assert (info.value.status, info.value.param, info.value.code) == (400, "max_tokens", "limit_exceeded")


def test_max_tokens_default_and_cap():
    limits = ChatLimits(default_max_tokens=7, max_tokens_cap=50)
    ask = lambda **f: ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **f)  # noqa: E731
    assert max_tokens_for(ask(), limits) == 7
    assert max_tokens_for(ask(max_tokens=50), limits) == 50
    assert max_tokens_for(ask(max_tokens=90, max_completion_tokens=20), limits) == 20  # the current name wins
    with pytest.raises(APIError, match="max_tokens=51 exceeds the server limit max_tokens_cap=50"):
        max_tokens_for(ask(max_completion_tokens=51), limits)
    with pytest.raises(APIError, match="max_tokens=7 exceeds"):  # a default over the cap is no way round it
        max_tokens_for(ask(), ChatLimits(default_max_tokens=7, max_tokens_cap=5))


class _NoDeployment:
    """ChatService only asks its handle for a streaming view; `check_request` never calls the deployment."""

    def options(self, **_: object) -> _NoDeployment:
        return self


def test_route_and_batch_job_refuse_an_over_cap_request_alike(tiny_vlm_path):
    from raybooth.pipelines.batch import batch_output_line, prepare_request_line
    from raybooth.pipelines.inference import RowStats, load_processor
    from raybooth.serving.serving_chat import ChatService

    body = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 101}
    serve_cfg = ServeConfig.model_validate({"limits": {"max_tokens": 100}})
    route = ChatService(_NoDeployment(), serve_cfg, SafetyPolicy.from_settings(serve_cfg.safety.model_dump()), "tiny-vlm")
    with pytest.raises(APIError) as info:
        route.check_request(ChatCompletionRequest.model_validate(body))
    route_error = info.value.body()["error"]

    line = json.dumps({"custom_id": "over", "method": "POST", "url": "/v1/chat/completions", "body": body})
    limits = ChatLimits.for_batch(BatchConfig(max_tokens_cap=100))
    row = prepare_request_line(3, line.encode(), load_processor(str(tiny_vlm_path)), limits, seed=0)
    response = batch_output_line(row, None, RowStats(), "tiny-vlm").response
    batch_error = response.body["error"]

    assert response.status_code == info.value.status == 400
    same = {"type": "invalid_request_error", "param": "max_tokens", "code": "limit_exceeded"}
    assert {k: route_error[k] for k in same} == {k: batch_error[k] for k in same} == same
    # One message, naming the setting that holds the cap where the request was refused.
    assert route_error["message"] == "max_tokens=101 exceeds the server limit limits.max_tokens=100"
    assert batch_error["message"] == "line 3: max_tokens=101 exceeds the server limit max_tokens_cap=100"
