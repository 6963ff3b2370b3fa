"""The one error model: OpenAI's error body, the status -> `type` mapping, and field names like OpenAI's.

.venv/bin/python -m pytest tests/openai/test_errors.py
"""

from __future__ import annotations

from pydantic import ValidationError

from raybooth.openai.errors import APIError, loc_to_param, validation_error
from raybooth.openai.protocol import ChatCompletionRequest


def test_error_body_is_the_openai_shape():
    err = APIError(400, "n=9 exceeds", param="n", code="limit_exceeded")
    assert err.body() == {
        "error": {
            "message": "n=9 exceeds",
            "type": "invalid_request_error",
            "param": "n",
            "code": "limit_exceeded",
        }
    }
    assert APIError(503, "busy").body()["error"]["type"] == "server_error"


def test_validation_errors_name_the_field_like_openai():
    assert (
        loc_to_param(("body", "messages", 0, "content", 1, "image_url")) == "messages[0].content[1].image_url"
    )


def test_status_decides_the_error_type():
    assert [APIError(s, "x").type for s in (400, 401, 404, 413, 429, 500, 503)] == [
        "invalid_request_error", "invalid_request_error", "invalid_request_error", "invalid_request_error",
        "rate_limit_error", "server_error", "server_error",
    ]  # fmt: skip


def test_a_validation_error_names_the_first_bad_field():
    try:
        ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}], "temprature": 0}
        )
    except ValidationError as e:
        err = validation_error(e.errors())
    assert (err.status, err.param, err.code) == (400, "temprature", "invalid_value")
    assert err.message == "temprature: unknown field (not part of this API)"
