"""The OpenAI HTTP shapes the server speaks: images, model list and errors.

The chat-completions request/response/chunk models live in `raybooth/models/openai_schema.py`, shared
with the batch JSONL job (pipelines must not import serving/); they are re-exported here so the HTTP
layer has one module of shapes. Every error leaves the server as

    {"error": {"message": "...", "type": "invalid_request_error", "param": "n", "code": "limit_exceeded"}}

with the status the `APIError` carries (vLLM's single error model, mapped to the status in one place).
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from raybooth.models.openai_schema import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    DeltaMessage,
    ErrorDetail,
    ErrorResponse,
    Usage,
)

__all__ = [
    "APIError",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ErrorResponse",
    "ImageGenerationRequest",
    "ImageGenerationResponse",
    "ModelList",
    "ServedChatCompletion",
    "ServedChatCompletionChunk",
    "Usage",
]

# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


# OpenAI's `type` is coarse (its SDK picks the exception class from the status); `code` says what exactly.
_ERROR_TYPES = {429: "rate_limit_error"}


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
        return _ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict:
        info = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def limit_exceeded(limit: str, value: object, allowed: object, param: str) -> APIError:
    """A 400 that names the limit, e.g. `n=1000 exceeds limits.max_n=4`."""
    return APIError(
        400,
        f"{param}={value} exceeds the server limit limits.{limit}={allowed}",
        param=param,
        code="limit_exceeded",
    )


# --------------------------------------------------------------------------------------------------
# Chat: what the HTTP route adds to the shared shapes (a safety block is a refusal, as in OpenAI's API)
# --------------------------------------------------------------------------------------------------

ServedFinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class ServedAssistantMessage(AssistantMessage):
    refusal: str | None = None


class ServedChoice(Choice):
    message: ServedAssistantMessage
    finish_reason: ServedFinishReason | None


class ServedDeltaMessage(DeltaMessage):
    refusal: str | None = None


class ServedChunkChoice(ChunkChoice):
    delta: ServedDeltaMessage
    finish_reason: ServedFinishReason | None = None


class ServedChatCompletion(ChatCompletionResponse):
    choices: list[ServedChoice]


class ServedChatCompletionChunk(ChatCompletionChunk):
    choices: list[ServedChunkChoice]


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


class ImageGenerationRequest(BaseModel):
    """POST /v1/images/generations; the last four fields come through the SDK's `extra_body`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, description="What to draw.")
    model: str = Field(
        ..., min_length=1, description="Registered model (name, name/3, name@alias) or a served path."
    )
    n: int = Field(1, ge=1, description="Images to return.")
    size: str | None = Field(None, description="WIDTHxHEIGHT, e.g. 512x512 (default: the server's).")
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="b64_json (default) or url, which is a data: URL here (nothing is stored)."
    )
    output_format: Literal["png"] | None = Field(None, description="Only png.")
    quality: str | None = Field(
        None, description="Only 'auto'/'standard': num_inference_steps sets the quality here."
    )
    style: str | None = Field(None, description="Not offered: describe the style in the prompt.")
    user: str | None = Field(None, description="End-user id, echoed into logs only.")
    negative_prompt: str | None = Field(None, description="What not to draw (the unconditional branch).")
    num_inference_steps: int | None = Field(None, ge=1, description="Denoising steps.")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="Classifier-free guidance scale.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Image i uses seed+i: same seed, same bytes.")

    @field_validator("quality")
    @classmethod
    def _one_quality_tier(cls, value: str | None) -> str | None:
        if value not in (None, "auto", "standard"):  # refused, never silently ignored
            raise ValueError(
                f"quality {value!r} is not offered (only 'auto'/'standard'); raise num_inference_steps for "
                "finer images"
            )
        return value

    @field_validator("style")
    @classmethod
    def _no_style_presets(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError(f"style {value!r} is not offered; describe the style in the prompt instead")
        return value


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImageGenerationResponse(BaseModel):
    created: int = Field(default_factory=lambda: int(time.time()))
    data: list[ImageData]


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "raybooth"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
