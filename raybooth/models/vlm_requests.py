"""What the generation engine takes and gives, and how one request becomes model inputs.

    request = GenerationRequest(
        messages=[{"role": "user", "content": [{"type": "image", "image": pil_image},
                                               {"type": "text", "text": "Describe the image."}]}],
        params=SamplingParams(max_tokens=32),
    )
    prepared = prepare_request(processor, request)   # tokens, every processor tensor, the image count
    prepared.prompt_tokens, prepared.num_images, prepared.inputs["pixel_values"].shape

Preparing needs only the processor (no model), so CPU workers of a batch job prepare rows and ship them
to the GPU actors; the engine (`vlm_engine.py`) batches prepared rows. Results and stream deltas carry a
row's own error: `INVALID_REQUEST` (a ValueError: the request is bad, HTTP 400) or `SERVER_ERROR` (anything
else, logged with its traceback; HTTP 500). Plain PyTorch + transformers: no Ray.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers.video_utils import VideoMetadata

from raybooth.models.decoding import SamplingParams
from raybooth.models.image_budget import check_image_budget
from raybooth.models.images import ImageLimits
from raybooth.models.video import VideoLimits
from raybooth.models.vlm_family import ENGINE_INPUTS

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"  # the row's request is bad (HTTP 400); OpenAI's error type
SERVER_ERROR = "server_error"  # the engine failed on the row (HTTP 500)


@dataclass
class GenerationRequest:
    """One conversation. Content is a string or OpenAI-like parts with images and videos already decoded:
    `{"type": "text", "text": ...}` / `{"type": "image", "image": PIL.Image}` /
    `{"type": "video", "video": [PIL.Image, ...], "fps": 1.0}` (its frames, sampled at `fps` per second of
    video by `models/video.py`; a video processor reads the time between frames from it)."""

    messages: list[dict[str, Any]]
    params: SamplingParams = field(default_factory=SamplingParams)
    # OpenAI tool definitions the chat template shows the model (`{"type": "function", "function": ...}`).
    tools: list[dict[str, Any]] | None = None
    # Aspect-ratio and after-resize pixel limits `prepare_request` checks before the processor resizes;
    # the caller's configured ones travel with the request to wherever it is prepared.
    image_limits: ImageLimits = field(default_factory=ImageLimits)


@dataclass
class PreparedRequest:
    """A request turned into model inputs; what packing measures and what the decode loop consumes."""

    input_ids: list[int]  # prompt tokens, image placeholders already expanded
    params: SamplingParams
    # Every other tensor the processor returned (pixel_values, image_grid_thw, mm_token_type_ids, ...),
    # as it returned them for this row alone; the family's rules batch them (vlm_family.collate_inputs).
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    num_images: int = 0  # images in the request (not patches or tiles): what packing and limits count

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def pixel_values(self) -> torch.Tensor | None:
        return self.inputs.get("pixel_values")


@dataclass
class TokenLogprob:
    """One sampled token (or an alternative to it) with its log-probability, in OpenAI's terms: `token`
    is its text, `bytes` its exact UTF-8 bytes (a token may hold part of a character; `token` then shows
    U+FFFD where `bytes` stay exact)."""

    token: str
    bytes: list[int]
    logprob: float
    top: list[TokenLogprob] = field(default_factory=list)  # the likeliest alternatives, best first


@dataclass
class GenerationResult:
    text: str
    # "stop" (EOS, stop string, grammar complete) | "length" | "cancelled" | "error" (then `error` is set)
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    error: str | None = None
    # One entry per sampled token but EOS, when the request asked for logprobs; None when it did not.
    logprobs: list[TokenLogprob] | None = None
    error_type: str | None = None  # INVALID_REQUEST | SERVER_ERROR when `error` is set


@dataclass
class StreamDelta:
    """What one row produced in one step: new text, and on its last step the finish reason and counts.
    A failed row's last delta has finish_reason "error", `error` and `error_type` (see the module doc)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # tokens sampled this step (EOS included)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # theirs, when asked for (EOS left out)
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_type: str | None = None  # INVALID_REQUEST | SERVER_ERROR when `error` is set

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def followed_by(self, later: StreamDelta) -> StreamDelta:
        """This delta and the `later` one of the same row as one: what a reader that fell behind by a step
        gets, so a busy stream sends fewer, longer chunks instead of queueing one per token."""
        return StreamDelta(
            text=self.text + later.text,
            token_ids=[*self.token_ids, *later.token_ids],
            logprobs=[*self.logprobs, *later.logprobs],
            finish_reason=later.finish_reason,
            error=later.error,
            prompt_tokens=later.prompt_tokens or self.prompt_tokens,
            completion_tokens=later.completion_tokens or self.completion_tokens,
            error_type=later.error_type,
        )


class RequestError(ValueError):
    """A request this engine cannot run (too long for the context, no text, bad images)."""


def error_delta(error: BaseException, prompt_tokens: int = 0, completion_tokens: int = 0) -> StreamDelta:
    """The last delta of a row that failed with `error`: ValueErrors are the request's fault, the rest
    the server's (logged with their traceback; the user sees no internal text)."""
    if isinstance(error, ValueError):
        message, kind = str(error), INVALID_REQUEST
    else:
        log.error("a generation row failed", exc_info=error)
        message, kind = f"internal error while generating this request ({type(error).__name__})", SERVER_ERROR
    return StreamDelta(
        finish_reason="error",
        error=message,
        error_type=kind,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )


# --------------------------------------------------------------------------------------------------
# Preparing one request (processor only: runs on CPU workers too, without the model)
# --------------------------------------------------------------------------------------------------


@dataclass
class SplitContent:
    """Messages for the chat template and the pixels their parts carried, in order."""

    messages: list[dict[str, Any]]  # image parts reduced to {"type": "image"}, videos to {"type": "video"}
    images: list[Image.Image]  # image parts' images and, for a model without a video processor, video frames
    videos: list[list[Image.Image]]  # each video's frames, for the model's video processor
    video_fps: list[float] = field(default_factory=list)  # the rate each video's frames were sampled at
    video_parts: int = 0  # video parts in the request, whichever way their frames go

    @property
    def frames(self) -> int:
        return len(self.images) + sum(len(v) for v in self.videos)


def _video_fps(part: dict[str, Any]) -> float:
    """The frames-per-second a video part's frames were sampled at (`models/video.py`'s default where the
    part does not say)."""
    fps = part.get("fps", VideoLimits().fps)
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not 0 < fps < float("inf"):
        raise RequestError(f"a video part's fps must be a positive number of frames per second, not {fps!r}")
    return float(fps)


def split_content(messages: Sequence[dict[str, Any]], frames_as_images: bool = True) -> SplitContent:
    """Split decoded parts from the messages. A video part (`{"type": "video", "video": [frames]}`) becomes
    one template video and its frames (`frames_as_images=False`: the model has a video processor), or
    that many images in order (every other vision model reads a video as its frames)."""
    split = SplitContent([], [], [])
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type")
                if kind == "image":
                    if not isinstance(part.get("image"), Image.Image):
                        raise RequestError("an image part must carry a decoded PIL image under 'image'")
                    split.images.append(part["image"])
                    parts.append({"type": "image"})
                elif kind == "video":
                    frames = part.get("video")
                    if not frames or not all(isinstance(f, Image.Image) for f in frames):
                        raise RequestError(
                            "a video part must carry its decoded frames (PIL images) under 'video'"
                        )
                    split.video_parts += 1
                    if frames_as_images:
                        split.images.extend(frames)
                        parts.extend({"type": "image"} for _ in frames)
                    else:
                        split.videos.append(list(frames))
                        split.video_fps.append(_video_fps(part))
                        parts.append({"type": "video"})
                elif kind == "text":
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                else:
                    raise RequestError(
                        f"content part type {kind!r} is not 'text', 'image' or 'video'; decode image_url and "
                        "video_url parts first (raybooth.openai.chat.engine_messages_from_chat)"
                    )
            content = parts
        # Tool turns keep what templates read of them (the calls made, the call a tool result answers).
        extra = {k: message[k] for k in ("tool_calls", "tool_call_id", "name") if message.get(k) is not None}
        split.messages.append(
            {"role": message["role"], "content": content if content is not None else "", **extra}
        )
    return split


def split_images(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """Messages for the chat template (image parts reduced to `{"type": "image"}`) and the images in order
    (a video's frames among them)."""
    split = split_content(messages)
    return split.messages, split.images


def takes_images(processor: Any) -> bool:
    """A multimodal processor has an image processor; a text-only LLM's "processor" is its tokenizer."""
    return getattr(processor, "image_processor", None) is not None


def prepare_request(processor: Any, request: GenerationRequest) -> PreparedRequest:
    """Chat template → token ids with expanded image tokens, plus every tensor the processor returns.

    `processor` is a multimodal processor, or a tokenizer for a text-only LLM (whose chat template gets
    each message's text parts joined into one string, the form text templates read). Each image's aspect
    ratio and its size after the processor's resize are checked first (an `ImageError`, a ValueError, so
    the row's 400): the resize is where a thin image costs gigabytes."""
    video_processor = getattr(processor, "video_processor", None)
    split = split_content(request.messages, frames_as_images=video_processor is None)
    template_messages, images = split.messages, split.images
    tokenizer = getattr(processor, "tokenizer", processor)
    vision = takes_images(processor)
    name = Path(str(getattr(tokenizer, "name_or_path", "") or "this model")).name
    if split.video_parts and not vision:
        raise RequestError(f"model {name} takes no video; send text only, or use a vision-language model")
    if images and not vision:
        raise RequestError(f"model {name} takes no images; send text only, or use a vision-language model")
    if not vision:
        template_messages = [{**m, "content": _joined_text(m["content"])} for m in template_messages]
    for i, image in enumerate(images):
        check_image_budget(image.size, processor, request.image_limits, f"image {i}")
    for v, frames in enumerate(split.videos):
        check_image_budget(frames[0].size, processor, request.image_limits, f"video {v}")
    if vision and takes_task_prompts(processor):
        if split.video_parts:
            raise RequestError(
                f"model {name} reads one image with a task prompt and takes no video; send an image"
            )
        encoded = processor(
            text=[task_prompt(template_messages, images)], images=images or None, return_tensors="pt"
        )
        return _prepared(encoded, request, split.frames)
    options = {"tools": request.tools} if request.tools else {}
    prompt = processor.apply_chat_template(
        template_messages, add_generation_prompt=True, tokenize=False, **options
    )
    bos = getattr(tokenizer, "bos_token", None)
    # The template may already write BOS; adding another would shift every position by one.
    special = {"add_special_tokens": not (bos and prompt.startswith(bos)), "return_tensors": "pt"}
    if split.videos:
        special["videos"] = split.videos
        special["video_metadata"] = [
            VideoMetadata(total_num_frames=len(frames), fps=fps, frames_indices=list(range(len(frames))))
            for frames, fps in zip(split.videos, split.video_fps, strict=True)
        ]
    if vision:
        try:
            encoded = processor(text=[prompt], images=images or None, **special)
        except ImportError as e:  # a video processor whose backend is not installed (torchvision)
            package = e.name or "torchvision"
            raise RequestError(
                f"video input for model {name} needs the {package} package, which is not installed here; "
                f"install {package} or send the frames as image_url parts"
            ) from e
    else:
        encoded = tokenizer([prompt], **special)
    return _prepared(encoded, request, split.frames)


def _prepared(encoded: Any, request: GenerationRequest, num_images: int) -> PreparedRequest:
    inputs = {k: v for k, v in encoded.items() if k not in ENGINE_INPUTS and isinstance(v, torch.Tensor)}
    return PreparedRequest(
        input_ids=encoded["input_ids"][0].tolist(),
        params=request.params,
        inputs=inputs,
        num_images=num_images,  # a video's frames count as images: each costs an image's compute
    )


def takes_task_prompts(processor: Any) -> bool:
    """A vision processor without a chat template reads a task prompt (Florence-2: `<CAPTION>`,
    `<OD>`, ...), which it expands itself, instead of a conversation."""
    return getattr(processor, "chat_template", None) is None


def task_prompt(messages: Sequence[dict[str, Any]], images: Sequence[Image.Image]) -> str:
    """The prompt of a task-prompt model: the one user message's text, with at most one image."""
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise RequestError(
            "this model reads one task prompt, not a conversation; send a single user message "
            "(e.g. '<CAPTION>' with one image)"
        )
    if len(images) > 1:
        raise RequestError(f"this model takes one image per request, got {len(images)}; send one image")
    return _joined_text(messages[0]["content"]).strip()


def _joined_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return content


def check_context(prepared: PreparedRequest, max_context: int | None) -> None:
    """Refuse a row whose prompt plus its token budget cannot fit the model's position table."""
    if max_context is not None and prepared.prompt_tokens + prepared.params.max_tokens > max_context:
        raise RequestError(
            f"prompt ({prepared.prompt_tokens} tokens) + max_tokens ({prepared.params.max_tokens}) exceeds the "
            f"model's context of {max_context} tokens; shorten the prompt or lower max_tokens"
        )
