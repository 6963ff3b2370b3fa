"""OpenAI chat request → engine request, engine result → OpenAI response (batch job and chat route).

    from raybooth.models.chat import ChatLimits, generation_request_from_chat, chat_completion_response
    gen_req = generation_request_from_chat(ChatCompletionRequest.model_validate(body), ChatLimits())
    [result] = engine.generate([gen_req])
    response = chat_completion_response(result, model="tiny-vlm")

Images in `image_url` parts are fetched and decoded here (data: URLs, paths, s3://), with the byte and
pixel limits of `images.py`; any problem is a `ChatRequestError` whose `param` says which part, the way
OpenAI's error bodies do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raybooth.models.decoding import SamplingParams
from raybooth.models.images import ImageError, ImageLimits, load_image
from raybooth.models.openai_schema import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ImageContentPart,
    TopLogprob,
    Usage,
)
from raybooth.models.openai_schema import TokenLogprob as OpenAITokenLogprob
from raybooth.models.vlm_engine import GenerationRequest, GenerationResult, TokenLogprob


class ChatRequestError(ValueError):
    """A request that cannot run; `param` names the offending field (OpenAI error `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ChatLimits:
    default_max_tokens: int = 64  # when the request gives neither max_tokens nor max_completion_tokens
    max_tokens_cap: int = 1024  # a request asking for more is refused, not silently truncated
    images: ImageLimits = ImageLimits()


def sampling_params_from_chat(
    request: ChatCompletionRequest, limits: ChatLimits, default_seed: int | None = None
) -> SamplingParams:
    max_tokens = request.requested_max_tokens() or limits.default_max_tokens
    if max_tokens > limits.max_tokens_cap:
        raise ChatRequestError(
            f"max_tokens {max_tokens} exceeds this deployment's cap of {limits.max_tokens_cap}",
            param="max_tokens",
        )
    fmt = request.response_format
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed if request.seed is not None else default_seed,
        stop=request.stop_list(),
        json_schema=fmt.json_schema.json_schema if fmt is not None and fmt.json_schema is not None else None,
        json_object=fmt is not None and fmt.type == "json_object",
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=request.token_bias(),
        logprobs=request.requested_logprobs(),
    )


def engine_messages_from_chat(request: ChatCompletionRequest, limits: ImageLimits) -> list[dict[str, Any]]:
    """OpenAI messages → engine messages, with every `image_url` fetched and decoded to a PIL image."""
    messages: list[dict[str, Any]] = []
    for m, message in enumerate(request.messages):
        # "developer" is OpenAI's newer name for the system role; chat templates know only "system".
        role = "system" if message.role == "developer" else message.role
        if not isinstance(message.content, list):
            messages.append({"role": role, "content": message.content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for p, part in enumerate(message.content):
            if isinstance(part, ImageContentPart):
                param = f"messages[{m}].content[{p}].image_url"
                try:
                    image = load_image(
                        part.image_url.url, limits, name=_image_label(part.image_url.url, m, p)
                    )
                except ImageError as e:
                    raise ChatRequestError(str(e), param=param) from e
                parts.append({"type": "image", "image": image})
            else:
                parts.append({"type": "text", "text": part.text})
        messages.append({"role": role, "content": parts})
    return messages


def _image_label(url: str, message: int, part: int) -> str:
    where = f"message {message} part {part}"
    return where if url.startswith("data:") else f"{where} ({url})"


def generation_request_from_chat(
    request: ChatCompletionRequest, limits: ChatLimits, default_seed: int | None = None
) -> GenerationRequest:
    try:
        params = sampling_params_from_chat(request, limits, default_seed)
    except ValueError as e:
        if isinstance(e, ChatRequestError):
            raise
        raise ChatRequestError(str(e)) from e
    return GenerationRequest(messages=engine_messages_from_chat(request, limits.images), params=params)


def chat_completion_response(
    result: GenerationResult, model: str, completion_id: str | None = None
) -> ChatCompletionResponse:
    """A successful result as OpenAI's `chat.completion` body (callers handle `result.error` first)."""
    fields: dict[str, Any] = {}
    if completion_id is not None:
        fields["id"] = completion_id
    choice = Choice(
        message=AssistantMessage(content=result.text),
        finish_reason=result.finish_reason,
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
            OpenAITokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=e.bytes,
                top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in e.top],
            )
            for e in entries
        ]
    )
