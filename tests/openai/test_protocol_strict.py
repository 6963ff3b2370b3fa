"""Request models are strict about types: README says a wrong type is a 400 naming the field, never coerced.

.venv/bin/python -m pytest tests/openai/test_protocol_strict.py
"""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from raybooth.openai.errors import validation_error
from raybooth.openai.protocol import BatchRequestLine, ChatCompletionRequest, ImageGenerationRequest

MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


def _refusal(model, body: dict) -> tuple[int, str | None, str]:
    with pytest.raises(ValidationError) as info:
        model.model_validate_json(json.dumps(body))
    err = validation_error(info.value.errors())
    return err.status, err.param, err.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stream", "yes"),
        ("max_tokens", "10"),
        ("n", 1.5),
        ("n", 2.0),  # a whole float is still not an integer
        ("temperature", "1"),
        ("seed", "7"),
        ("logprobs", 1),
        ("stop", 5),
        ("messages", {"role": "user", "content": "hi"}),  # an object where the array belongs
    ],
)
def test_wrong_types_in_a_chat_request_are_400s_naming_the_field(field, value):
    status, param, message = _refusal(ChatCompletionRequest, {"messages": MESSAGES, field: value})
    assert status == 400 and param == field and message.startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("field", "value"),
    [("n", "2"), ("seed", 1.5), ("guidance_scale", "7.5"), ("num_inference_steps", True), ("size", 512)],
)
def test_wrong_types_in_an_image_request_are_400s_naming_the_field(field, value):
    body = {"prompt": "a dog", "model": "tiny-sd", field: value}
    status, param, _ = _refusal(ImageGenerationRequest, body)
    assert status == 400 and param == field


def test_a_video_url_part_parses_and_a_malformed_one_is_a_400_naming_it():
    part = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    request = ChatCompletionRequest.model_validate_json(
        json.dumps({"messages": [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}]})
    )
    assert request.messages[0].content[0].video_url.url == "data:video/mp4;base64,AAAA"
    broken = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": 7}}]}]
    status, param, _ = _refusal(ChatCompletionRequest, {"messages": broken})
    assert status == 400 and param.startswith("messages[0].content")
    unknown = [{"role": "user", "content": [{"type": "audio_url"}]}]
    assert "'text', 'image_url' or 'video_url'" in _refusal(ChatCompletionRequest, {"messages": unknown})[2]


def test_nested_parts_are_strict_too():
    messages = [{"role": "user", "content": [{"type": "text", "text": 42}]}]
    status, param, _ = _refusal(ChatCompletionRequest, {"messages": messages})
    assert status == 400 and param.startswith("messages[0].content")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_literals_are_refused(literal):
    raw = '{"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": ' + literal + "}"
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json(raw)
    assert validation_error(info.value.errors()).param == "frequency_penalty"


def test_correct_json_types_still_parse_with_ints_as_floats():
    req = ChatCompletionRequest.model_validate_json(
        json.dumps({"messages": MESSAGES, "temperature": 1, "top_p": 1, "max_tokens": 10, "stream": True})
    )
    assert (req.temperature, req.max_tokens, req.stream) == (1.0, 10, True)
    image = ImageGenerationRequest.model_validate_json('{"prompt": "a", "model": "m", "guidance_scale": 7}')
    assert image.guidance_scale == 7.0


def test_a_batch_line_parses_strictly_from_json():
    good = {"custom_id": "a", "body": {"messages": MESSAGES, "max_tokens": 4}}
    assert BatchRequestLine.model_validate_json(json.dumps(good)).body.max_tokens == 4
    bad = {"custom_id": "a", "body": {"messages": MESSAGES, "max_tokens": "4"}}
    status, param, _ = _refusal(BatchRequestLine, bad)
    assert status == 400 and param == "max_tokens"  # named as the HTTP route names it
