"""Every OpenAI request/response shape raybooth speaks: chat completions (and their stream chunks), the
Batch API's lines, image generations and the model list.

    from raybooth.openai.protocol import ChatCompletionRequest, BatchRequestLine
    req = ChatCompletionRequest.model_validate_json(body)      # an HTTP body or a batch line's `body`

Names and fields follow OpenAI's API reference so the official `openai` client and OpenAI batch files
work unchanged. Pydantic only (no Ray, no torch): the batch job and the serving app import the same
models, `raybooth.openai.chat` turns a request into engine input and a result back, and the error body
lives with its status mapping in `raybooth.openai.errors`. Unknown fields of a chat request are refused
(as OpenAI does), and so are OpenAI parameters raybooth does not implement (`store`, tool_choice `auto`)
at anything but their no-op values, with a message naming them.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CHAT_COMPLETIONS_URL = "/v1/chat/completions"
_TOKEN_ID = re.compile(r"[0-9]{1,10}")


# Requests are strict about types, as README promises: `"stream": "yes"` or `"max_tokens": "10"` is a 400
# naming the field, never silently coerced (an int is still a valid float); NaN/Infinity are refused too.
_REQUEST_CONFIG = ConfigDict(strict=True, allow_inf_nan=False, populate_by_name=True, protected_namespaces=())


class _Lenient(BaseModel):
    """Request parts: unknown fields are ignored, so clients that send newer fields still work."""

    model_config = ConfigDict(extra="ignore", **_REQUEST_CONFIG)


class _Response(BaseModel):
    model_config = ConfigDict(populate_by_name=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------------
# Request
# --------------------------------------------------------------------------------------------------


class TextContentPart(_Lenient):
    type: Literal["text"] = "text"
    text: str


class ImageURL(_Lenient):
    url: str = Field(..., description="data:image/...;base64,... URL, a local path, file:// or s3:// URI.")
    detail: Literal["auto", "low", "high"] | None = None


class ImageContentPart(_Lenient):
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL


class VideoURL(_Lenient):
    url: str = Field(
        ...,
        description="data:video/mp4;base64,... URL, a local path, file:// or s3:// URI (MP4/MOV, WebM, AVI).",
    )


class VideoContentPart(_Lenient):
    """A video (vLLM's and Qwen's `video_url` part): its frames, sampled at the configured fps, reach the
    model's video processor or, for other vision models, the model as that many images."""

    type: Literal["video_url"] = "video_url"
    video_url: VideoURL


ContentPart = TextContentPart | ImageContentPart | VideoContentPart


class FunctionCall(_Response):
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)


class ToolCall(_Response):
    id: str = Field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    @model_validator(mode="after")
    def _tool_turns(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs the tool_call_id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls belong to assistant messages, not {self.role!r} ones")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _discriminate_parts(cls, value: Any) -> Any:
        # Pick the part model by its `type`, so a bad part gets one clear error instead of one per union arm.
        if not isinstance(value, list):
            return value
        parts: list[Any] = []
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(TextContentPart.model_validate(part))
            elif kind == "image_url":
                parts.append(ImageContentPart.model_validate(part))
            elif kind == "video_url":
                parts.append(VideoContentPart.model_validate(part))
            else:
                raise ValueError(
                    f"content part {i}: type must be 'text', 'image_url' or 'video_url', got {kind!r}"
                )
        return parts


class JSONSchemaFormat(_Lenient):
    name: str = "response"
    description: str | None = None
    # `schema` would shadow a BaseModel attribute, so the field has another name and the wire name as alias.
    json_schema: dict[str, Any] = Field(..., alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format type json_schema needs a json_schema object with a schema")
        return self


class StreamOptions(_Lenient):
    include_usage: bool = False


class FunctionDefinition(_Lenient):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    # JSON Schema of the arguments object; OpenAI's default is a function without parameters.
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ToolDefinition(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(_Lenient):
    """A chat request. Unknown top-level fields are refused (as OpenAI does: "Unrecognized request argument")
    rather than ignored; OpenAI parameters this engine does not implement are accepted only at their no-op
    values (e.g. `store: false`, `service_tier: "auto"`), anything else is a 400 that names them."""

    model_config = ConfigDict(extra="forbid", **_REQUEST_CONFIG)

    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # a 64-bit integer, as in OpenAI's API
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # Token id (as a string, as in OpenAI's API) -> bias in [-100, 100].
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    tools: list[ToolDefinition] | None = None
    # "none", "required" or a named function; "auto" would need a parser for the model's own tool-call
    # syntax, which this server does not have (vLLM without a tool-call parser refuses it too).
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI parameters without an implementation here: accepted at their no-op values only.
    store: bool | None = None
    metadata: dict[str, str] | None = None  # labels for OpenAI's stored completions; nothing to label here
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("stop takes at most 4 sequences (as in OpenAI's API)")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_by_token_id(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            # ASCII digits, at most 10: a token id, and never long enough for int() to refuse it later.
            if not _TOKEN_ID.fullmatch(key.strip()):
                raise ValueError(f'logit_bias keys are token ids like "1234", got {key[:20]!r}')
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias for token {key} must be in [-100, 100], got {bias}")
        return value

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        self._check_tools()
        unsupported = {
            "store": bool(self.store),
            "service_tier": self.service_tier not in (None, "auto", "default"),
        }
        named = [name for name, used in unsupported.items() if used]
        if named:
            raise ValueError(
                f"{', '.join(named)}: not supported by this server; leave "
                f"{'it' if len(named) == 1 else 'them'} out (or at the default)"
            )
        return self

    def _check_tools(self) -> None:
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError(f"tools: function names must be unique, got {names}")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(
                f"tool_choice names function {choice.function.name!r}, which is not in tools {names}"
            )
        if choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        if names and choice in (None, "auto"):
            raise ValueError(
                "tool_choice 'auto' (the default with tools) is not supported: this server has no parser for "
                "a model's free-form tool calls. Set tool_choice to 'required' or "
                '{"type": "function", "function": {"name": ...}} (decoding is then constrained to a valid '
                "call), or 'none'"
            )
        if (
            self.forced_tools() is not None
            and self.response_format is not None
            and self.response_format.type != "text"
        ):
            raise ValueError(
                "response_format cannot be combined with a forced tool_choice; use one or the other"
            )

    def forced_tools(self) -> list[ToolDefinition] | None:
        """The tools the answer must call, when tool_choice forces a call: the named one, or all of them
        ('required'); None when the answer is text."""
        if not self.tools or self.tool_choice in (None, "none", "auto"):
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools if t.function.name == self.tool_choice.function.name]
        return list(self.tools)

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` (the current name) wins over the deprecated `max_tokens`."""
        return self.max_completion_tokens or self.max_tokens

    def requested_logprobs(self) -> int | None:
        """None without `logprobs: true`; else how many alternatives per token (`top_logprobs`, default 0)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def token_bias(self) -> dict[int, float]:
        return {int(key): bias for key, bias in (self.logit_bias or {}).items()}


# --------------------------------------------------------------------------------------------------
# Response
# --------------------------------------------------------------------------------------------------

# content_filter: the safety policy ended the answer (the HTTP route; a batch line never gets it).
FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None  # why the safety policy ended the answer (finish_reason content_filter)
    tool_calls: list[ToolCall] | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionTokenLogprob(TopLogprob):
    """One generated token's entry in `choices[].logprobs.content` (the OpenAI SDK's name; the engine's
    own per-token record is `raybooth.models.vlm_engine.TokenLogprob`)."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Response):
    """`choices[].logprobs`: one entry per generated token (OpenAI's shape; `refusal` is never filled)."""

    content: list[ChatCompletionTokenLogprob] | None = None
    refusal: list[ChatCompletionTokenLogprob] | None = None


class Choice(_Response):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(_Response):
    id: str = Field(default_factory=new_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Response):
    """A streamed piece of tool call `index`: its first piece has id, type and name; arguments follow."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(_Response):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Response):
    """One server-sent event of a streamed completion (`data: {...}`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# --------------------------------------------------------------------------------------------------
# Batch API (one JSONL line in, one out)
# --------------------------------------------------------------------------------------------------


class BatchRequestLine(_Lenient):
    custom_id: str = Field(..., min_length=1)
    method: Literal["POST"] = "POST"
    url: Literal["/v1/chat/completions"] = CHAT_COMPLETIONS_URL
    body: ChatCompletionRequest


class BatchResponse(_Response):
    status_code: int
    request_id: str
    body: dict[str, Any]


class BatchError(_Response):
    code: str
    message: str


class BatchOutputLine(_Response):
    """A result line: `response` for anything that got an HTTP status, `error` for lines that never did."""

    id: str = Field(default_factory=lambda: f"batch_req_{uuid.uuid4().hex}")
    custom_id: str | None
    response: BatchResponse | None = None
    error: BatchError | None = None


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


class ImageGenerationRequest(BaseModel):
    """POST /v1/images/generations; the last four fields come through the SDK's `extra_body`."""

    model_config = ConfigDict(extra="forbid", **_REQUEST_CONFIG)

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
