"""The one error model of the OpenAI surface: `APIError` (status, type, param, code) and its body.

    from raybooth.openai.errors import APIError, limit_exceeded
    err = limit_exceeded("limits.max_n", 9, 4, param="n")
    err.status, err.body()   # 400, {"error": {"message": "n=9 exceeds ...", "type": "invalid_request_error",
                             #                 "param": "n", "code": "limit_exceeded"}}

The HTTP layer sends `body()` with `status`; the batch job writes the same body with the same status
into a result line, so a request refused over HTTP and in a batch file reads the same. The OpenAI
error `type` is derived from the status here and nowhere else (`error_type`).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

# OpenAI's `type` is coarse (its SDK picks the exception class from the status); `code` says what exactly.
_ERROR_TYPES = {429: "rate_limit_error"}


class ErrorDetail(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail


def error_type(status: int) -> str:
    """The OpenAI error `type` of an HTTP status: client mistakes are invalid requests, 5xx server errors."""
    return _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


class APIError(Exception):
    """An error the client sees: HTTP status + the OpenAI error body. Client mistakes are 4xx."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return error_type(self.status)

    def body(self) -> dict[str, Any]:
        info = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump(mode="json")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def limit_exceeded(setting: str, value: object, allowed: object, param: str) -> APIError:
    """A 400 that names the setting holding the limit, e.g. `n=1000 exceeds the server limit limits.max_n=4`."""
    return APIError(
        400,
        f"{param}={value} exceeds the server limit {setting}={allowed}",
        param=param,
        code="limit_exceeded",
    )


# Pydantic puts the union arm it tried into an error's loc (`stop.str`, `tool_choice.NamedToolChoice.type`):
# type names, not fields, so they stay out of the param the client reads.
_UNION_ARM = re.compile(r"^(str|int|float|bool|none|[a-z-]+\[.*\]|[A-Z][A-Za-z0-9]*)$")


def loc_to_param(loc: tuple[Any, ...]) -> str:
    """`("body", "messages", 0, "content")` -> `messages[0].content`, the way OpenAI names a field."""
    out = ""
    for i, part in enumerate(loc):
        if part == "body" or (i > 0 and isinstance(part, str) and _UNION_ARM.match(part)):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """Pydantic's errors (of an HTTP body or a batch line) as one 400 naming the first bad field."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(
            400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
        )
    param = loc_to_param(tuple(first["loc"])) or None
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field (not part of this API)"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"{param or 'body'}: {msg}{more}", param=param, code="invalid_value")
