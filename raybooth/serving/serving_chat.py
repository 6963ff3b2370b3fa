"""POST /v1/chat/completions: validate at the edge, stream from `ChatDeployment`, speak OpenAI's shapes.

    data: {"object": "chat.completion.chunk", "choices": [{"delta": {"role": "assistant", "content": ""}}]}
    data: {... "delta": {"content": "The"} ...}
    data: {... "delta": {}, "finish_reason": "stop"}
    data: {... "choices": [], "usage": {...}}          # only with stream_options.include_usage
    data: [DONE]

Checks before any model work: the model name, message and image counts, the prompt's size in bytes
(before anything tokenizes it), `max_tokens`, images (data:
URLs only over HTTP, decoded with the byte and pixel limits), the JSON schemas (response_format and the
tools' parameters), and the safety policy on
the prompt, whose block is a normal answer with `finish_reason: content_filter` and a `refusal`. The
first event is awaited before the HTTP response starts, so an engine-side refusal (a prompt longer than
the context, a schema the grammar compiler rejects) is still a 400, not a broken stream. After the 200,
any failure (a row the engine failed, a replica that died, the timeout) ends the stream with an OpenAI
error event and then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import jsonschema
from ray.serve.handle import DeploymentHandle

from raybooth.cluster.config import ServeConfig
from raybooth.models.safety import SafetyPolicy
from raybooth.models.schema_checks import GrammarError, check_schema
from raybooth.models.vlm_requests import GenerationRequest
from raybooth.openai.chat import (
    ChatLimits,
    ToolCallFormat,
    assistant_message,
    check_prompt_size,
    generation_request_from_chat,
    max_tokens_for,
)
from raybooth.openai.errors import APIError, bad_request, limit_exceeded
from raybooth.openai.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ImageContentPart,
    TextContentPart,
    Usage,
    VideoContentPart,
    new_completion_id,
)
from raybooth.serving.upstream import next_item, overloaded

logger = logging.getLogger("ray.serve")


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def prompt_texts(req: ChatCompletionRequest) -> list[str]:
    texts = []
    for message in req.messages:
        if isinstance(message.content, str):
            texts.append(message.content)
        elif message.content:
            texts += [p.text for p in message.content if isinstance(p, TextContentPart)]
    return texts


def row_error(event: dict[str, Any]) -> APIError:
    """The APIError of a row the engine failed: its request's fault (400), the server's (500), or a full
    scheduler queue (503, retry). Raised before the HTTP response starts it is that status; after,
    `_sse_lines` sends it as an error event."""
    if event.get("error_type") == "overloaded":
        return overloaded("chat generation")
    if event.get("error_type") == "server_error":
        return APIError(500, event["error"], code="server_error")
    return bad_request(event["error"], code="invalid_request")


class ChatService:
    def __init__(self, handle: DeploymentHandle, cfg: ServeConfig, policy: SafetyPolicy, model_name: str):
        self.handle = handle.options(stream=True)
        self.cfg = cfg
        self.policy = policy
        self.model_name = model_name
        self.limits = ChatLimits.for_serving(cfg)

    # ------------------------------------------------------------------ validation

    def check_request(self, req: ChatCompletionRequest) -> None:
        limits = self.cfg.limits
        if req.model not in (None, self.model_name):
            raise APIError(
                404,
                f"model {req.model!r} is not served for chat; use {self.model_name!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        if len(req.messages) > limits.max_messages:
            raise limit_exceeded("limits.max_messages", len(req.messages), limits.max_messages, "messages")
        if req.n > limits.max_n:
            raise limit_exceeded("limits.max_n", req.n, limits.max_n, "n")
        check_prompt_size(req, self.limits)  # before anything tokenizes it (and in the batch job too)
        max_tokens_for(req, self.limits)  # the batch job's check too; here before any image is decoded
        images = videos = 0  # videos: their frames are checked with the images by ChatLimits.for_serving
        for m, message in enumerate(req.messages):
            for p, part in enumerate(message.content if isinstance(message.content, list) else []):
                videos += isinstance(part, VideoContentPart)
                if isinstance(part, ImageContentPart):
                    images += 1
                    if not part.image_url.url.startswith("data:"):
                        raise bad_request(
                            "over HTTP images must be inline data: URLs (data:image/png;base64,...); the server "
                            "does not read its own files or fetch URLs",
                            param=f"messages[{m}].content[{p}].image_url",
                        )
        if images > limits.max_images_per_request:
            raise limit_exceeded(
                "limits.max_images_per_request", images, limits.max_images_per_request, "messages"
            )
        if not any(text.strip() for text in prompt_texts(req)) and images == videos == 0:
            raise bad_request("messages hold no text, image or video; send at least one", param="messages")
        fmt = req.response_format
        if fmt is not None and fmt.json_schema is not None:
            _check_schema(
                fmt.json_schema.json_schema, "response_format.json_schema.schema", "response_format"
            )
        for t, tool in enumerate(req.tools or []):
            param = f"tools[{t}].function.parameters"
            _check_schema(tool.function.parameters, param, param)

    async def engine_request(self, req: ChatCompletionRequest) -> GenerationRequest:
        # Image decoding is CPU work: off the event loop, so other requests keep flowing.
        return await asyncio.to_thread(generation_request_from_chat, req, self.limits)

    # ------------------------------------------------------------------ serving

    async def _events(self, gen_req: GenerationRequest, timeout_s: float) -> AsyncIterator[dict[str, Any]]:
        """The deployment's events for one request; the first one is fetched eagerly by `_open`."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        gen = self.handle.generate.remote(gen_req)
        ended = False
        try:
            while True:
                try:
                    event = await next_item(gen, deadline, "chat completion", timeout_s)
                except StopAsyncIteration:
                    ended = True
                    return
                if event.get("error"):
                    raise row_error(event)
                yield event
        finally:
            if not ended:  # the client left (its request was cancelled) or the stream failed
                gen.cancel()  # so the chat replica drops the row instead of decoding for nobody

    async def _open(self, gen_req: GenerationRequest, timeout_s: float) -> AsyncIterator[dict[str, Any]]:
        """Start one choice and wait for its first event (so errors are still HTTP errors)."""
        events = self._events(gen_req, timeout_s)
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            return _single({})
        return _prepend(first, events)

    async def open_choices(
        self, req: ChatCompletionRequest, timeout_s: float
    ) -> list[AsyncIterator[dict[str, Any]]]:
        """Validate, then start the request's `n` choices as `n` engine rows (batched together by the chat
        deployment like any concurrent callers). Choice i samples with `seed + i` when a seed is given."""
        self.check_request(req)
        verdict = self.policy.check_all(prompt_texts(req))
        if verdict is not None:
            refusal = dict(text="", finish_reason="content_filter", refusal=verdict.explanation())
            return [_single(refusal) for _ in range(req.n)]
        first = await self.engine_request(req)
        rows = [first] + [
            replace(first, params=replace(first.params, seed=None if req.seed is None else req.seed + i))
            for i in range(1, req.n)
        ]
        opened = await asyncio.gather(*(self._open(row, timeout_s) for row in rows), return_exceptions=True)
        failures = [o for o in opened if isinstance(o, BaseException)]
        if failures:
            for o in opened:  # started choices must not decode on for a request that failed
                if not isinstance(o, BaseException):
                    await o.aclose()
            raise failures[0]
        return opened  # type: ignore[return-value]

    async def complete(self, req: ChatCompletionRequest, timeout_s: float) -> ChatCompletionResponse:
        streams = await self.open_choices(req, timeout_s)
        collected = await asyncio.gather(*(_collect(events) for events in streams))
        tool_format = ToolCallFormat.of(req)
        choices, prompt, completion = [], 0, 0
        for index, (text, logprobs, final) in enumerate(collected):
            refusal = final.get("refusal")
            answer, finish = assistant_message(text, final.get("finish_reason") or "stop", tool_format)
            if answer.tool_calls:
                message = AssistantMessage(content=None, tool_calls=answer.tool_calls)
            else:
                message = AssistantMessage(content=text if text or not refusal else None, refusal=refusal)
            choices.append(
                Choice(
                    index=index,
                    message=message,
                    finish_reason=finish,
                    logprobs=ChoiceLogprobs(content=logprobs) if req.logprobs else None,
                )
            )
            prompt = final.get("prompt_tokens", 0)  # the same prompt for every choice: counted once
            completion += final.get("completion_tokens", 0)
        return ChatCompletionResponse(
            model=self.model_name,
            choices=choices,
            usage=Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion),
        )

    async def stream(self, req: ChatCompletionRequest, timeout_s: float) -> AsyncIterator[str]:
        """SSE lines; call it after `open_choices` succeeded (HTTP errors must happen before the 200)."""
        streams = await self.open_choices(req, timeout_s)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return self._sse_lines(streams, new_completion_id(), include_usage, ToolCallFormat.of(req))

    async def _sse_lines(
        self,
        streams: list[AsyncIterator[dict[str, Any]]],
        cid: str,
        include_usage: bool,
        tool_format: ToolCallFormat | None,
    ) -> AsyncIterator[str]:
        """The SSE events of `streams` (one per choice), one write per upstream event: the events an
        upstream event makes (its text, a finish chunk) go out together, the role chunks with the first
        content, then the usage chunk with [DONE] once the streams have ended. Each write costs a pass
        through the ASGI stack, a socket write, a packet through HAProxy and a read in the client,
        whatever its size: an 8-token answer took six writes, and takes three. The last text does not
        wait for the end of the stream to go out with [DONE]: that end is one more message from the
        replica, which would delay the answer's last text (one `benchmarks/serve_load.py` run with the
        text held read ITL p99 338 ms; runs without it, 93-321 ms on a noisy box).

        With a forced tool_choice the text is held per choice and its tool calls are sent whole, in one
        chunk, when the choice ends: arguments that are re-serialized once complete (see
        `ToolCallFormat.calls`) cannot be streamed piece by piece."""

        def chunk(
            index: int,
            delta: DeltaMessage,
            finish: str | None = None,
            logprobs: list[dict[str, Any]] | None = None,
        ) -> str:
            choice = ChunkChoice(
                index=index,
                delta=delta,
                finish_reason=finish,
                logprobs=ChoiceLogprobs(content=logprobs) if logprobs else None,
            )
            return sse(ChatCompletionChunk(id=cid, model=self.model_name, choices=[choice]).model_dump())

        # What goes out with the next write. The first event was fetched before the 200 (`_open`), so
        # the role chunks do not wait for anything by going out with it.
        out = [chunk(index, DeltaMessage(role="assistant", content="")) for index in range(len(streams))]
        prompt, completion = 0, 0
        finished: set[int] = set()
        held = [""] * len(streams)  # each choice's text, while it is becoming tool calls
        try:
            async for index, event in _merge(streams):
                text = event.get("text", "")
                if tool_format is not None:
                    held[index] += text
                    text = ""
                if text or event.get("logprobs"):
                    # A token's logprobs go out with the step that sampled it, even while its text is held
                    # back (a possible stop string, half a UTF-8 character), as vLLM streams them.
                    out.append(chunk(index, DeltaMessage(content=text), None, event.get("logprobs")))
                if event.get("finish_reason"):  # a choice's last event
                    finish = event["finish_reason"]
                    if tool_format is not None:
                        answer, finish = assistant_message(held[index], finish, tool_format)
                        calls = answer.tool_calls
                        out.append(
                            chunk(index, _whole_calls(calls) if calls else DeltaMessage(content=held[index]))
                        )
                    if event.get("refusal"):
                        out.append(chunk(index, DeltaMessage(refusal=event["refusal"])))
                    out.append(chunk(index, DeltaMessage(), finish))
                    finished.add(index)
                    prompt = event.get("prompt_tokens", 0)
                    completion += event.get("completion_tokens", 0)
                if out:
                    yield "".join(out)
                    out = []
            # Every choice ends with a finish_reason, even one whose stream ended without saying.
            for index in sorted(set(range(len(streams))) - finished):
                out.append(chunk(index, DeltaMessage(), "stop"))
            if include_usage:
                usage = Usage(
                    prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
                )
                last = ChatCompletionChunk(id=cid, model=self.model_name, choices=[], usage=usage)
                out.append(sse(last.model_dump()))
        except APIError as e:  # after the 200 was sent, an error can only be an event (vLLM does the same)
            out.append(sse(e.body()))
        except Exception as e:  # a bug: still an OpenAI error event and [DONE], never a cut stream
            logger.exception("chat stream failed")
            out.append(sse(APIError(500, f"the stream failed on the server ({type(e).__name__})").body()))
        out.append(sse("[DONE]"))
        yield "".join(out)


def _check_schema(schema: dict[str, Any], what: str, param: str) -> None:
    try:
        # The compile bounds first: their walk is iterative, so a 190-deep schema is refused here before
        # jsonschema's recursive check could hit Python's recursion limit.
        check_schema(schema)
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except GrammarError as e:
        raise bad_request(str(e).replace("response_format json_schema", what), param=param) from e
    except jsonschema.SchemaError as e:
        raise bad_request(f"{what} is not a valid JSON Schema: {e.message}", param=param) from e
    except RecursionError as e:  # still too deep for the recursive check: refused, never a 500
        raise bad_request(f"{what} nests too deeply; flatten it", param=param) from e


def _whole_calls(calls: list[Any]) -> DeltaMessage:
    return DeltaMessage(
        tool_calls=[
            DeltaToolCall(
                index=i,
                id=call.id,
                type="function",
                function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments),
            )
            for i, call in enumerate(calls)
        ]
    )


async def _collect(
    events: AsyncIterator[dict[str, Any]],
) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """One choice's whole text, its token logprobs (when asked for) and its final event."""
    text, logprobs, final = "", [], {}
    async for event in events:
        text += event.get("text", "")
        logprobs += event.get("logprobs", [])
        if event.get("finish_reason"):
            final = event
    return text, logprobs, final


async def _merge(streams: list[AsyncIterator[dict[str, Any]]]) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """`(choice index, event)` from several event streams, in the order events arrive."""
    if len(streams) == 1:  # the common case needs no tasks
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, dict[str, Any] | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, events: AsyncIterator[dict[str, Any]]) -> None:
        try:
            async for event in events:
                await queue.put((index, event, None))
        except Exception as e:
            await queue.put((index, None, e))
            return
        await queue.put((index, None, None))

    tasks = [asyncio.create_task(pump(i, events)) for i, events in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, event, error = await queue.get()
            if error is not None:
                raise error
            if event is None:
                running -= 1
                continue
            yield index, event
    finally:
        # The client left or a choice failed: stop the others (each stream cancels its replica call).
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _single(event: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    yield event


async def _prepend(
    first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]
) -> AsyncIterator[dict[str, Any]]:
    yield first
    async for event in rest:
        yield event
