"""OpenAI chat request -> engine request, engine result -> OpenAI response, for the batch job and the chat route.

    from raybooth.openai.chat import ChatLimits, generation_request_from_chat, chat_completion_response
    gen_req = generation_request_from_chat(ChatCompletionRequest.model_validate(body), ChatLimits())
    [result] = engine.generate([gen_req])
    response = chat_completion_response(result, model="tiny-vlm")

Every check that needs no HTTP happens here, once for both callers: `check_prompt_size` refuses a
prompt over `max_prompt_bytes` before anything tokenizes it (a 10 MB prompt would take seconds of a
replica's CPU only to be refused for its length), `max_tokens_for` decides a request's token budget
(default and cap), and images in `image_url` parts are fetched and decoded
(data: URLs, paths, s3://) with the byte and pixel limits of `models/images.py`, videos in `video_url`
parts to frames sampled with the limits of `models/video.py` (their frames count as images). Any problem is an
`APIError` (400) whose `param` says which field or part, the way OpenAI's error bodies do.

Tool calls: a forced `tool_choice` (a named function, or "required") becomes a JSON schema the decoding
is constrained to (`ToolCallFormat`), and the output text becomes `tool_calls` again on the way out, so
the calls always parse and their arguments always validate against the tool's `parameters`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from raybooth.cluster import storage
from raybooth.cluster.config import BatchConfig, ServeConfig
from raybooth.models.decoding import SamplingParams
from raybooth.models.images import ImageError, ImageLimits, load_image
from raybooth.models.video import VideoLimits, load_video
from raybooth.models.vlm_requests import GenerationRequest, GenerationResult, TokenLogprob
from raybooth.openai.errors import bad_request, limit_exceeded
from raybooth.openai.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionTokenLogprob,
    ChatMessage,
    Choice,
    ChoiceLogprobs,
    FunctionCall,
    ImageContentPart,
    TextContentPart,
    ToolCall,
    ToolDefinition,
    TopLogprob,
    Usage,
    VideoContentPart,
)


@dataclass(frozen=True)
class ChatLimits:
    default_max_tokens: int = 64  # when the request gives neither max_tokens nor max_completion_tokens
    max_tokens_cap: int = 1024  # a request asking for more is refused, not silently truncated
    images: ImageLimits = ImageLimits()
    cap_setting: str = "max_tokens_cap"  # the config key that sets the cap: the refusal names it as the fix
    # UTF-8 bytes of all the prompt's text. 256 KiB is ~64K tokens at ~4 bytes a token: more than most
    # context windows hold, while tokenizing it still takes well under a second.
    max_prompt_bytes: int = 256 * 1024
    prompt_setting: str = "max_prompt_bytes"  # the config key of that limit, named in the refusal
    videos: VideoLimits = VideoLimits()
    # Images plus video frames in one request (None: no cap but the per-video frame limit). Each frame is
    # an image to the model, so the chat route's image cap covers them too.
    max_images: int | None = None
    images_setting: str = "max_images_per_request"
    # Over HTTP a video must be inline (data:); the server never reads its own files for a client.
    inline_videos_only: bool = False

    @classmethod
    def for_serving(cls, cfg: ServeConfig) -> ChatLimits:
        """The chat route's limits (`chat.default_max_tokens`, `limits.*` of the serve YAML)."""
        return cls(
            default_max_tokens=cfg.chat.default_max_tokens,
            max_tokens_cap=cfg.limits.max_tokens,
            images=ImageLimits.from_settings(cfg.limits),
            cap_setting="limits.max_tokens",
            max_prompt_bytes=cfg.limits.max_prompt_bytes,
            prompt_setting="limits.max_prompt_bytes",
            videos=VideoLimits.from_settings(cfg.limits),
            max_images=cfg.limits.max_images_per_request,
            images_setting="limits.max_images_per_request",
            inline_videos_only=True,
        )

    @classmethod
    def for_batch(cls, cfg: BatchConfig) -> ChatLimits:
        """The batch job's limits (`max_new_tokens`, `max_tokens_cap`, image limits of the batch YAML)."""
        return cls(
            default_max_tokens=cfg.max_new_tokens,
            max_tokens_cap=cfg.max_tokens_cap,
            images=ImageLimits.from_settings(cfg),
            cap_setting="max_tokens_cap",
            max_prompt_bytes=cfg.max_prompt_bytes,
            videos=VideoLimits.from_settings(cfg),
        )


def max_tokens_for(request: ChatCompletionRequest, limits: ChatLimits) -> int:
    """The one place that decides how many tokens a request may generate: what it asks for (or the
    default), refused with a 400 naming the cap's setting when it asks for more than the cap."""
    max_tokens = request.requested_max_tokens() or limits.default_max_tokens
    if max_tokens > limits.max_tokens_cap:
        raise limit_exceeded(limits.cap_setting, max_tokens, limits.max_tokens_cap, "max_tokens")
    return max_tokens


def prompt_bytes(request: ChatCompletionRequest) -> int:
    """UTF-8 bytes of the texts the prompt holds: message texts and tool-call arguments (tool schemas have
    their own bounds in `models/constrained.py`)."""
    size = 0
    for message in request.messages:
        if isinstance(message.content, str):
            size += len(message.content.encode())
        elif message.content:
            size += sum(len(p.text.encode()) for p in message.content if isinstance(p, TextContentPart))
        for call in message.tool_calls or []:
            size += len(call.function.arguments.encode()) + len(call.function.name.encode())
    return size


def check_prompt_size(request: ChatCompletionRequest, limits: ChatLimits) -> None:
    """Refuse a prompt over `limits.max_prompt_bytes` with a 400 naming the setting (before tokenizing)."""
    size = prompt_bytes(request)
    if size > limits.max_prompt_bytes:
        raise limit_exceeded(limits.prompt_setting, f"<{size} bytes>", limits.max_prompt_bytes, "messages")


@dataclass(frozen=True)
class ToolCallFormat:
    """What a forced tool_choice makes the model write, and how that text becomes `tool_calls`.

    Named function: the output is that function's arguments object, constrained by its `parameters`.
    "required": the output is a JSON list of `{"name", "arguments"}` objects, each one of the tools'
    (one item at most when `parallel_tool_calls` is false). `schema` is what decoding is constrained to."""

    named: str | None  # the one function tool_choice names; None for "required"
    schema: dict[str, Any]

    @classmethod
    def of(cls, request: ChatCompletionRequest) -> ToolCallFormat | None:
        tools = request.forced_tools()
        if tools is None:
            return None
        if isinstance(request.tool_choice, str):  # "required"
            return cls(None, _calls_schema(tools, parallel=request.parallel_tool_calls is not False))
        return cls(tools[0].function.name, tools[0].function.parameters)

    def to_json(self) -> str:
        return json.dumps({"named": self.named, "schema": self.schema})

    @classmethod
    def from_json(cls, text: str) -> ToolCallFormat:
        data = json.loads(text)
        return cls(data["named"], data["schema"])

    def calls(self, text: str) -> list[ToolCall] | None:
        """The calls the output holds; None when it is not a complete document (it ran out of tokens)."""
        try:
            # strict=False: the grammar lets raw control characters into strings; dumping the value again
            # escapes them, so every client's JSON parser reads the arguments.
            value = json.loads(text, strict=False)
        except json.JSONDecodeError:
            return None
        if self.named is not None:
            return [ToolCall(function=FunctionCall(name=self.named, arguments=json.dumps(value)))]
        return [
            ToolCall(function=FunctionCall(name=c["name"], arguments=json.dumps(c["arguments"])))
            for c in value
        ]

    def finish_reason(self, finish: str | None) -> str | None:
        """OpenAI's: "tool_calls" when the model chose to call ("required"); "stop" for a named function."""
        return "tool_calls" if finish == "stop" and self.named is None else finish


def _calls_schema(tools: list[ToolDefinition], parallel: bool) -> dict[str, Any]:
    one_call = [
        {
            "type": "object",
            "properties": {"name": {"enum": [t.function.name]}, "arguments": t.function.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": one_call}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def sampling_params_from_chat(
    request: ChatCompletionRequest, limits: ChatLimits, default_seed: int | None = None
) -> SamplingParams:
    max_tokens = max_tokens_for(request, limits)
    fmt = request.response_format
    schema = fmt.json_schema.json_schema if fmt is not None and fmt.json_schema is not None else None
    tool_format = ToolCallFormat.of(request)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed if request.seed is not None else default_seed,
        stop=request.stop_list(),
        json_schema=tool_format.schema if tool_format is not None else schema,
        json_object=fmt is not None and fmt.type == "json_object",
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=request.token_bias(),
        logprobs=request.requested_logprobs(),
    )


def engine_messages_from_chat(
    request: ChatCompletionRequest, limits: ChatLimits | ImageLimits
) -> list[dict[str, Any]]:
    """OpenAI messages → engine messages, with every `image_url` fetched and decoded to a PIL image and
    every `video_url` to its sampled frames; images and frames together within `limits.max_images`."""
    chat = limits if isinstance(limits, ChatLimits) else ChatLimits(images=limits)
    messages: list[dict[str, Any]] = []
    pictures = 0  # images + video frames so far
    for m, message in enumerate(request.messages):
        # "developer" is OpenAI's newer name for the system role; chat templates know only "system".
        role = "system" if message.role == "developer" else message.role
        extra = _tool_fields(message)
        if not isinstance(message.content, list):
            messages.append({"role": role, "content": message.content or "", **extra})
            continue
        parts: list[dict[str, Any]] = []
        for p, part in enumerate(message.content):
            if isinstance(part, ImageContentPart | VideoContentPart):
                parts.append(_decoded_part(part, chat, m, p))
                pictures += len(parts[-1]["video"]) if "video" in parts[-1] else 1
                if chat.max_images is not None and pictures > chat.max_images:
                    raise limit_exceeded(
                        chat.images_setting,
                        f"{pictures} (images + video frames)",
                        chat.max_images,
                        "messages",
                    )
            else:
                parts.append({"type": "text", "text": part.text})
        messages.append({"role": role, "content": parts, **extra})
    return messages


def _decoded_part(
    part: ImageContentPart | VideoContentPart, limits: ChatLimits, m: int, p: int
) -> dict[str, Any]:
    """An image part as its PIL image, a video part as its frames; a 400 naming the part otherwise."""
    if isinstance(part, ImageContentPart):
        param, url = f"messages[{m}].content[{p}].image_url", part.image_url.url
    else:
        param, url = f"messages[{m}].content[{p}].video_url", part.video_url.url
    name = _image_label(url, m, p)
    try:
        if isinstance(part, ImageContentPart):
            image = load_image(url, limits.images, name=name, filesystem=storage.filesystem)
            return {"type": "image", "image": image}
        if limits.inline_videos_only and not url.startswith("data:"):
            raise bad_request(
                "over HTTP videos must be inline data: URLs (data:video/mp4;base64,...); the server does "
                "not read its own files or fetch URLs",
                param=param,
            )
        frames = load_video(url, limits.videos, limits.images, name=name, filesystem=storage.filesystem)
        return {"type": "video", "video": frames, "fps": limits.videos.fps}  # frames per second sampled
    except ImageError as e:  # VideoError too
        raise bad_request(str(e), param=param) from e


def _tool_fields(message: ChatMessage) -> dict[str, Any]:
    """What chat templates read of a tool turn: the calls an assistant made (arguments as objects, the
    way Hugging Face templates expect them) and the call a tool message answers."""
    fields: dict[str, Any] = {}
    if message.tool_calls:
        fields["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        fields["tool_call_id"] = message.tool_call_id
    return fields


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # as the client sent it; the template shows it verbatim


def _image_label(url: str, message: int, part: int) -> str:
    where = f"message {message} part {part}"
    return where if url.startswith("data:") else f"{where} ({url})"


def generation_request_from_chat(
    request: ChatCompletionRequest, limits: ChatLimits, default_seed: int | None = None
) -> GenerationRequest:
    """The engine request of a chat request; an `APIError` (400) when it cannot run as asked."""
    check_prompt_size(request, limits)  # first: the cheapest check, and the one that saves the most
    try:
        params = sampling_params_from_chat(request, limits, default_seed)
    except ValueError as e:  # SamplingParams' own checks
        raise bad_request(str(e)) from e
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools] if request.tools else None
    return GenerationRequest(
        messages=engine_messages_from_chat(request, limits),
        params=params,
        tools=tools,
        image_limits=limits.images,  # where it is prepared, against the processor's resize
    )


def assistant_message(
    text: str, finish_reason: str | None, tool_format: ToolCallFormat | None
) -> tuple[AssistantMessage, str | None]:
    """The answer's message and finish reason: tool calls when a forced tool_choice produced them, else text
    (a call cut short by max_tokens stays text, with finish_reason "length", as OpenAI returns it)."""
    calls = tool_format.calls(text) if tool_format is not None and finish_reason == "stop" else None
    if calls is None:
        return AssistantMessage(content=text), finish_reason
    return AssistantMessage(content=None, tool_calls=calls), tool_format.finish_reason(finish_reason)


def chat_completion_response(
    result: GenerationResult,
    model: str,
    completion_id: str | None = None,
    tool_format: ToolCallFormat | None = None,
) -> ChatCompletionResponse:
    """A successful result as OpenAI's `chat.completion` body (callers handle `result.error` first)."""
    fields: dict[str, Any] = {}
    if completion_id is not None:
        fields["id"] = completion_id
    message, finish_reason = assistant_message(result.text, result.finish_reason, tool_format)
    choice = Choice(
        message=message,
        finish_reason=finish_reason,
        logprobs=choice_logprobs(result.logprobs) if result.logprobs is not None else None,
    )
    return ChatCompletionResponse(
        model=model,
        choices=[choice],
        usage=Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        ),
        **fields,
    )


def choice_logprobs(entries: list[TokenLogprob]) -> ChoiceLogprobs:
    """The engine's per-token logprobs as OpenAI's `choices[].logprobs` (`{"content": [...]}`)."""
    return ChoiceLogprobs(
        content=[
            ChatCompletionTokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=e.bytes,
                top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in e.top],
            )
            for e in entries
        ]
    )
