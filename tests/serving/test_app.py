"""The OpenAI-compatible app end to end: the official `openai` client against the real Serve app.

    .venv/bin/python -m pytest tests/serving/test_app.py

One Serve app per module (see conftest.py): tiny-vlm for chat, tiny-sd plus registered subjects for
images, API keys on, small queues so batching and backpressure show on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import time

import httpx
import jsonschema
import openai
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

API_KEY = "test-key-1"  # conftest configures it (and test-key-2) through RAYBOOTH_API_KEYS
AUTH = {"Authorization": f"Bearer {API_KEY}"}
IMAGE_KW = dict(size="64x64", response_format="b64_json")


def png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def decode_png(b64: str) -> Image.Image:
    raw = base64.b64decode(b64)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(raw))


@pytest.fixture(scope="module")
def errors_before(serve_app) -> int:
    return len(serve_app.log_errors())


@pytest.fixture(scope="module")
def client(serve_app, errors_before):
    return serve_app.openai()


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


def wait_until(probe, what: str, timeout_s: float = 60, every_s: float = 0.2):
    """Call `probe` until it returns something truthy, and return that; fail naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    while not (value := probe()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:g}s"
        time.sleep(every_s)
    return value


# --------------------------------------------------------------------------------------------------
# Models, health, auth
# --------------------------------------------------------------------------------------------------


def test_models_lists_the_chat_model_and_every_subject(client, subjects):
    ids = {m.id for m in client.models.list().data}
    assert {"tiny-vlm", "tiny-sd", subjects.dog, subjects.cat, subjects.toy} <= ids


def test_healthz_needs_no_key_but_everything_else_does(serve_app):
    assert httpx.get(f"{serve_app.base_url}/healthz").json() == {"status": "ok"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        resp = httpx.get(f"{serve_app.base_url}/v1/models", headers=headers)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        serve_app.openai(api_key="wrong").images.generate(model="tiny-sd", prompt="a dog", **IMAGE_KW)
    # The second configured key works too.
    assert serve_app.openai(api_key="test-key-2").models.list().data


def test_prometheus_metrics_cover_serve_and_the_batchers(client):
    from raybooth.serving.server import metrics_port

    client.images.generate(model="tiny-sd", prompt="a dog", extra_body={"num_inference_steps": 1}, **IMAGE_KW)
    client.chat.completions.create(model="tiny-vlm", messages=user("hi"), max_tokens=2)
    wanted = {
        "ray_serve_num_http_requests_total",  # Serve's own: requests per route and status
        "ray_serve_deployment_processing_latency_ms_bucket",
        "ray_raybooth_image_batch_images_bucket",  # images per UNet batch
        "ray_raybooth_chat_batch_rows_bucket",  # callers per engine batch
        "ray_raybooth_chat_completion_tokens_total",
    }
    url = f"http://127.0.0.1:{metrics_port()}/metrics"
    deadline = time.monotonic() + 90  # replicas push their metrics to the node agent every few seconds
    while True:
        text = httpx.get(url, timeout=10).text
        names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
        if wanted <= names or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert wanted <= names, sorted(wanted - names)
    assert 'route="/v1/images/generations"' in text or "/v1/images/generations" in text


# --------------------------------------------------------------------------------------------------
# Chat
# --------------------------------------------------------------------------------------------------


def test_chat_with_text_and_image_parts(client):
    image = Image.new("RGB", (24, 24), (200, 30, 30))
    content = [
        {"type": "text", "text": "What color is the image?"},
        {"type": "image_url", "image_url": {"url": png_data_url(image)}},
    ]
    kwargs = dict(
        model="tiny-vlm",
        messages=user(content),
        max_tokens=6,
        temperature=0.8,
        top_p=0.9,
        seed=7,
        stop=["\n\n"],
    )
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    choice = first.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert first.usage.completion_tokens <= 6 and first.usage.prompt_tokens > 0
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert "\n\n" not in (choice.message.content or "")
    assert again.choices[0].message.content == choice.message.content  # same seed, same answer


def test_chat_streams_sse_chunks_with_usage_and_done(client, serve_app):
    kwargs = dict(model="tiny-vlm", messages=user("Describe a dog."), max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # On the wire: server-sent events ending in data: [DONE].
    body = {**kwargs, "messages": user("Describe a dog."), "stream": True}
    with httpx.stream("POST", f"{serve_app.base_url}/v1/chat/completions", json=body, headers=AUTH) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_json_schema_output_always_validates(client):
    schema = {
        "type": "object",
        "properties": {
            "color": {"type": "string", "enum": ["red", "green", "blue"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["color", "count"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    for seed in (1, 2):
        resp = client.chat.completions.create(
            model="tiny-vlm",
            messages=user("Answer in JSON."),
            max_tokens=48,
            temperature=1.0,
            seed=seed,
            response_format=fmt,
        )
        assert resp.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(resp.choices[0].message.content), schema)


def test_concurrent_streams_are_batched_and_each_is_well_formed(serve_app):
    async def one(client, i: int) -> tuple[str, list]:
        stream = await client.chat.completions.create(
            model="tiny-vlm", messages=user(f"Tell me about dog number {i}."), max_tokens=32, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip  # 32 tokens: rows that reach the replica some ms apart still share decode steps
        return i, [chunk async for chunk in stream]

    async def main():
        async with serve_app.async_openai() as client:
            return await asyncio.gather(*(one(client, i) for i in range(4)))

    stats = serve_app.stats()["chat"]
    before, steps_before = len(stats["batch_sizes"]), len(stats["step_rows"])
    results = asyncio.run(main())
    for _, chunks in results:
        assert chunks[0].choices[0].delta.role == "assistant"
        assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    stats = serve_app.stats()["chat"]
    assert sum(stats["batch_sizes"][before:]) == 4, stats["batch_sizes"][before:]  # each row admitted once
    assert max(stats["step_rows"][steps_before:]) >= 2, stats["step_rows"][steps_before:]  # decoded together


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_vlm_path):
    """The served chat model's own tokenizer: logit_bias speaks in its token ids."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_vlm_path)


def test_chat_logprobs_streamed_and_not(client):
    kwargs = dict(model="tiny-vlm", messages=user("a dog"), max_tokens=6, temperature=0, logprobs=True)
    plain = client.chat.completions.create(
        model="tiny-vlm", messages=user("a dog"), max_tokens=6, temperature=0
    )
    assert plain.choices[0].logprobs is None  # only when asked for
    scored = client.chat.completions.create(**kwargs, top_logprobs=2)
    choice = scored.choices[0]
    assert choice.message.content == plain.choices[0].message.content  # asking for logprobs changes nothing
    entries = choice.logprobs.content
    assert 1 <= len(entries) <= scored.usage.completion_tokens
    for entry in entries:
        assert entry.logprob <= 0 and bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token  # greedy: the best
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    # Streamed: the same entries, spread over the chunks.
    streamed = [
        e
        for chunk in client.chat.completions.create(**kwargs, top_logprobs=2, stream=True)
        for c in chunk.choices
        if c.logprobs is not None
        for e in c.logprobs.content
    ]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in entries
    ]


def test_chat_logit_bias_and_penalties_steer_sampling(client, tokenizer):
    kwargs = dict(model="tiny-vlm", messages=user("a dog"), max_tokens=24, temperature=0)
    plain = client.chat.completions.create(**kwargs, logprobs=True).choices[0]
    tokens = [e.token for e in plain.logprobs.content]
    forced = client.chat.completions.create(**{**kwargs, "max_tokens": 5}, logit_bias={"100": 100})
    assert forced.choices[0].message.content == tokenizer.decode([100] * 5)
    penalized = client.chat.completions.create(
        **kwargs, logprobs=True, frequency_penalty=2.0, presence_penalty=2.0
    ).choices[0]
    penalized_tokens = [e.token for e in penalized.logprobs.content]
    assert len(tokens) - len(set(tokens)) > 0  # greedy tiny-vlm repeats itself on this prompt
    assert len(penalized_tokens) - len(set(penalized_tokens)) < len(tokens) - len(set(tokens))


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time"}},
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_tool_calls_through_the_openai_client(client, stream):
    kwargs = dict(model="tiny-vlm", messages=user("Weather in Rome?"), tools=TOOLS, max_tokens=256, seed=1)
    named = {"type": "function", "function": {"name": "get_weather"}}
    if not stream:
        choice = client.chat.completions.create(**kwargs, tool_choice=named).choices[0]
        assert choice.finish_reason == "stop" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)
        required = client.chat.completions.create(**kwargs, tool_choice="required", parallel_tool_calls=False)
        assert required.choices[0].finish_reason == "tool_calls"
        assert len(required.choices[0].message.tool_calls) == 1
        return
    once = dict(tool_choice="required", parallel_tool_calls=False)  # one call: a short document to finish
    whole = client.chat.completions.create(**kwargs, **once).choices[0]
    chunks = list(client.chat.completions.create(**kwargs, **once, stream=True))
    calls: dict[int, dict] = {}
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    for c in chunks:
        for piece in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = piece.id or call["id"]
            call["name"] = piece.function.name or call["name"]
            call["arguments"] += piece.function.arguments or ""
    assert finish == ["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (t.function.name, json.loads(t.function.arguments)) for t in whole.message.tool_calls
    ]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_a_tool_result_turn_is_answered(client, tool_call_history):
    messages = tool_call_history
    reply = client.chat.completions.create(
        model="tiny-vlm", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=4
    )
    assert reply.choices[0].message.content is not None and reply.choices[0].message.tool_calls is None
    # The tool turn is part of the prompt: a longer history costs more prompt tokens than the question alone.
    alone = client.chat.completions.create(
        model="tiny-vlm", messages=messages[:1], tools=TOOLS, tool_choice="none", max_tokens=4
    )
    assert reply.usage.prompt_tokens > alone.usage.prompt_tokens + 10


def test_images_are_pngs_and_the_same_seed_gives_the_same_bytes(client):
    extra = {"seed": 11, "num_inference_steps": 2, "guidance_scale": 5.0, "negative_prompt": "blurry"}
    a = client.images.generate(model="tiny-sd", prompt="a photo of a dog", n=2, extra_body=extra, **IMAGE_KW)
    b = client.images.generate(model="tiny-sd", prompt="a photo of a dog", n=2, extra_body=extra, **IMAGE_KW)
    assert len(a.data) == 2 and decode_png(a.data[0].b64_json).size == (64, 64)
    assert [d.b64_json for d in a.data] == [d.b64_json for d in b.data]
    assert a.data[0].b64_json != a.data[1].b64_json  # image i uses seed + i
    other = client.images.generate(
        model="tiny-sd", prompt="a photo of a dog", extra_body={**extra, "seed": 12}, **IMAGE_KW
    )
    assert other.data[0].b64_json == a.data[1].b64_json  # image 1 of n=2 is the seed+1 image, to the byte


def test_eight_concurrent_requests_share_unet_batches_and_match_single_results(serve_app):
    prompts = [f"a photo of sks dog number {i}" for i in range(8)]

    async def burst():
        async with serve_app.async_openai() as client:
            extra = [{"seed": i, "num_inference_steps": 2} for i in range(8)]
            calls = [
                client.images.generate(model="tiny-sd", prompt=p, extra_body=e, **IMAGE_KW)
                for p, e in zip(prompts, extra, strict=True)
            ]
            return await asyncio.gather(*calls)

    before = len(serve_app.stats()["images"]["unet_batches"])
    batched = asyncio.run(burst())
    sizes = serve_app.stats()["images"]["unet_batches"][before:]
    assert sum(sizes) == 8 and len(sizes) < 8, sizes  # dynamic batching: fewer UNet batches than requests

    client = serve_app.openai()
    for i, (prompt, result) in enumerate(zip(prompts, batched, strict=True)):
        alone = client.images.generate(
            model="tiny-sd", prompt=prompt, extra_body={"seed": i, "num_inference_steps": 2}, **IMAGE_KW
        )
        # batch_invariant (the default): the same PNG bytes as when the request ran alone
        assert alone.data[0].b64_json == result.data[0].b64_json, (i, sizes)


def test_a_client_that_leaves_stops_its_unet_batch(serve_app):
    before = len(serve_app.stats()["images"]["abandoned"])
    body = {"model": "tiny-sd", "prompt": "a slow dog", "n": 4, "size": "128x128", "num_inference_steps": 100}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 2 s of a ~6 s generation
        httpx.post(f"{serve_app.base_url}/v1/images/generations", json=body, headers=AUTH, timeout=2)
    abandoned = wait_until(
        lambda: serve_app.stats()["images"]["abandoned"][before:], "stopping the batch of a client that left"
    )
    steps_done, steps = abandoned[0]
    assert steps_done < steps, abandoned
    # The replica serves the next request normally.
    ok = httpx.post(
        f"{serve_app.base_url}/v1/images/generations",
        json={**body, "num_inference_steps": 2, "size": "64x64", "n": 1},
        headers=AUTH,
        timeout=60,
    )
    assert ok.status_code == 200 and len(ok.json()["data"]) == 1


def test_lora_subjects_share_one_base_in_memory(client, serve_app, subjects):
    extra = {"seed": 3, "num_inference_steps": 2}
    images = {
        model: client.images.generate(model=model, prompt="a photo of sks cat", extra_body=extra, **IMAGE_KW)
        .data[0]
        .b64_json
        for model in ("tiny-sd", subjects.cat, subjects.toy)
    }
    assert len(set(images.values())) == 3  # each adapter changes the image
    stats = serve_app.stats()["images"]
    assert stats["shared_lora_bases"] == 1
    assert {subjects.cat, subjects.toy} <= set(stats["models"])


def test_alias_move_changes_the_served_model_without_restart(client, serve_app, subjects):
    from raybooth.cluster import tracking

    def generate(model: str) -> str:
        extra = {"seed": 5, "num_inference_steps": 2}
        return (
            client.images.generate(model=model, prompt="a photo of sks dog", extra_body=extra, **IMAGE_KW)
            .data[0]
            .b64_json
        )

    v1, v2 = generate(f"{subjects.dog}/1"), generate(f"{subjects.dog}/2")
    assert v1 != v2
    assert generate(f"{subjects.dog}@prod") == v1
    tracking.set_alias(subjects.dog, "prod", 2)
    try:
        wait_until(lambda: generate(f"{subjects.dog}@prod") == v2, "picking up the alias move", every_s=0.5)
        swaps = serve_app.stats()["images"]["swaps"]
        assert [f"{subjects.dog}@prod", f"{subjects.dog}/1", f"{subjects.dog}/2"] in swaps
    finally:
        tracking.set_alias(subjects.dog, "prod", 1)


def test_requests_in_flight_during_an_alias_move_finish_on_the_old_version(client, serve_app, subjects):
    from concurrent.futures import ThreadPoolExecutor

    from raybooth.cluster import tracking

    prod, v1, v2 = f"{subjects.dog}@prod", f"{subjects.dog}/1", f"{subjects.dog}/2"
    slow = dict(prompt="a photo of sks dog", n=2, size="128x128", response_format="b64_json")
    # Several seconds of sampling on tiny-sd: the swap (a 1 s registry poll, then loading version 2) lands
    # well inside it, and the assertion below says so if it ever does not.
    extra = {"seed": 9, "num_inference_steps": 100}

    def wait_for(condition, what: str) -> None:
        wait_until(lambda: condition(serve_app.stats()["images"]), what, every_s=0.1)

    client.images.generate(model=prod, prompt="warm up", extra_body={"num_inference_steps": 1}, **IMAGE_KW)
    wait_for(lambda s: s["models"].get(prod) == v1, "prod serving version 1")
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(client.images.generate, model=prod, extra_body=extra, **slow)
        wait_for(lambda s: [prod, v1] in s["running"], "the slow request starting on version 1")
        tracking.set_alias(subjects.dog, "prod", 2)
        try:
            wait_for(lambda s: s["models"].get(prod) == v2, "the replica swapping prod to version 2")
            assert not in_flight.done(), "the request ended before the swap: make it slower"
            old = in_flight.result(timeout=120)
        finally:
            tracking.set_alias(subjects.dog, "prod", 1)
    # Byte-identical to what version 1 gives for the same request (batch invariance makes bytes comparable);
    # the test above shows versions 1 and 2 give different images.
    pinned = client.images.generate(model=v1, extra_body=extra, **slow)
    assert [d.b64_json for d in old.data] == [d.b64_json for d in pinned.data]


# --------------------------------------------------------------------------------------------------
# Safety
# --------------------------------------------------------------------------------------------------


def test_image_prompt_blocked_with_category_and_span(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="tiny-sd", prompt="a dog about to KILL a cat", **IMAGE_KW)
    error = info.value.body
    assert error["code"] == "content_filter" and error["param"] == "prompt"
    assert "'violence'" in error["message"] and "'KILL'" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_prompt_blocked_with_content_filter(client, stream):
    kwargs = dict(model="tiny-vlm", messages=user("how do I build   a bomb?"), max_tokens=8)
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        refusal, finish = choice.message.refusal, choice.finish_reason
    else:
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        refusal = "".join(c.choices[0].delta.refusal or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert finish == "content_filter"
    assert "'violence'" in refusal and "build   a bomb" in refusal


@pytest.mark.parametrize("stream", [False, True])
def test_chat_output_blocked_as_it_streams(client, serve_app, greedy_answer, stream):
    span = greedy_answer[2:12]
    kwargs = dict(model="tiny-vlm", messages=user(serve_app.leak_prompt), max_tokens=16, temperature=0)
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        text, refusal, finish = choice.message.content or "", choice.message.refusal, choice.finish_reason
    else:
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        refusal = "".join(c.choices[0].delta.refusal or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert finish == "content_filter"
    assert "'secret-leak'" in refusal and repr(span) in refusal
    assert span not in text and greedy_answer.startswith(text)  # nothing from the blocked span on was sent


def _new_cancelled_rows(serve_app, before: int) -> list[int]:
    return wait_until(lambda: serve_app.stats()["chat"]["cancelled_rows"][before:], "cancelling a chat row")


def test_n_choices_are_seeded_rows_batched_together(client, serve_app):
    kwargs = dict(model="tiny-vlm", messages=user("Name three colours."), max_tokens=16, temperature=1.0)
    before = len(serve_app.stats()["chat"]["step_rows"])
    many = client.chat.completions.create(**kwargs, n=3, seed=40)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert max(serve_app.stats()["chat"]["step_rows"][before:]) >= 2  # the choices decoded as one batch
    # Choice i is what a single request with seed + i samples (rows do not depend on their batch).
    singles = [client.chat.completions.create(**kwargs, seed=40 + i).choices[0] for i in range(3)]
    assert [c.message.content for c in many.choices] == [c.message.content for c in singles]
    assert len({c.message.content for c in many.choices}) > 1
    one = client.chat.completions.create(**kwargs, seed=40)
    assert many.usage.prompt_tokens == one.usage.prompt_tokens  # the shared prompt counts once
    assert many.usage.completion_tokens == sum(
        client.chat.completions.create(**kwargs, seed=40 + i).usage.completion_tokens for i in range(3)
    )

    chunks = list(
        client.chat.completions.create(
            **kwargs, n=3, seed=40, stream=True, stream_options={"include_usage": True}
        )
    )
    texts, finishes = ["", "", ""], [[], [], []]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index].append(choice.finish_reason)
    assert texts == [c.message.content for c in many.choices]
    assert finishes == [[c.finish_reason] for c in many.choices]  # one finish chunk per choice
    assert chunks[-1].usage.completion_tokens == many.usage.completion_tokens


def test_a_blocked_stream_stops_decoding(client, serve_app):
    # Greedy tiny-vlm never says EOS on this prompt: without a cancel the row would decode all 600 tokens.
    before = len(serve_app.stats()["chat"]["cancelled_rows"])
    chunks = list(
        client.chat.completions.create(
            model="tiny-vlm", messages=user(serve_app.leak_prompt), max_tokens=600, temperature=0, stream=True
        )
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "content_filter"
    ]
    cancelled = _new_cancelled_rows(serve_app, before)
    assert len(cancelled) == 1 and cancelled[0] < 32, cancelled  # it left the batch right after the block


def test_a_client_that_disconnects_frees_its_row(client, serve_app):
    before = len(serve_app.stats()["chat"]["cancelled_rows"])
    stream = client.chat.completions.create(
        model="tiny-vlm",
        messages=user("Tell me a very long story."),
        max_tokens=900,
        temperature=0,
        stream=True,
    )
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    stream.close()  # the client goes away after its first chunk
    cancelled = _new_cancelled_rows(serve_app, before)
    assert len(cancelled) == 1 and cancelled[0] < 900, cancelled
    # The replica keeps serving.
    assert client.chat.completions.create(model="tiny-vlm", messages=user("hi"), max_tokens=2).choices


def test_a_client_that_leaves_a_completion_it_did_not_stream_frees_its_row(serve_app):
    """Nothing goes back before the end here, so only the connection tells the server the client left (through
    HAProxy in the suite, as `raybooth serve` runs)."""
    before = len(serve_app.stats()["chat"]["cancelled_rows"])
    steps = serve_app.stats()["chat"]["decode_steps"]
    body = json.dumps({
        "model": "tiny-vlm",
        "messages": user("Tell me a very long story."),
        "max_tokens": 900,
        "temperature": 0,
        "logit_bias": {"2": -100},  # tiny-vlm's EOS: the row would run to its 900 tokens
    }).encode()  # fmt: skip
    url = httpx.URL(serve_app.base_url)
    with socket.create_connection((url.host, url.port)) as conn:  # a client that can leave at any moment
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.host}\r\nAuthorization: {AUTH['Authorization']}"
        conn.sendall(
            f"{head}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        # It leaves once its row decodes (900 tokens take longer than this wait), not on a timer that a
        # fast box could outrun or a slow one could end before the row started.
        wait_until(
            lambda: serve_app.stats()["chat"]["decode_steps"] > steps + 20, "the row decoding", every_s=0.02
        )
    cancelled = _new_cancelled_rows(serve_app, before)
    assert len(cancelled) == 1 and 20 < cancelled[0] < 900, cancelled


# --------------------------------------------------------------------------------------------------
# Bad input, overload
# --------------------------------------------------------------------------------------------------


def _bomb_url() -> str:
    # 50 megapixels in a few kilobytes: a 1-bit PNG of one colour.
    return png_data_url(Image.new("1", (7072, 7072)))


def _chat(content=None, **extra) -> dict:
    return {
        "model": "tiny-vlm",
        "messages": user(content if content is not None else "hi"),
        "max_tokens": 4,
        **extra,
    }


def _image_part(url: str) -> list[dict]:
    return [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}]


BAD_INPUTS = {
    "invalid json (images)": ("images", b'{"model": "tiny-sd", "prompt": ', 400, "not valid JSON"),
    "invalid json (chat)": ("chat", b"[1, 2", 400, "not valid JSON"),
    "wrong type n": ("images", {"model": "tiny-sd", "prompt": "a dog", "n": "two"}, 400, "n:"),
    "wrong type messages": ("chat", {"model": "tiny-vlm", "messages": "hi"}, 400, "messages"),
    "unknown field": ("images", {"model": "tiny-sd", "prompt": "a dog", "colour": "red"}, 400, "colour"),
    "unknown image model": ("images", {"model": "no-such-model", "prompt": "a dog"}, 404, "no-such-model"),
    "unknown chat model": ("chat", {**_chat(), "model": "no-such-model"}, 404, "no-such-model"),
    "empty messages": ("chat", {"model": "tiny-vlm", "messages": []}, 400, "messages"),
    "not an image": (
        "chat",
        _chat(_image_part("data:image/png;base64," + base64.b64encode(b"hello").decode())),
        400,
        "corrupt image",
    ),
    "data url not base64": (
        "chat",
        _chat(_image_part("data:image/png;base64,@@not*base64@@")),
        400,
        "base64",
    ),
    "server file as image": ("chat", _chat(_image_part("file:///etc/passwd")), 400, "data: URLs"),
    "50 megapixels": ("chat", _chat(_image_part(_bomb_url())), 400, "pixels"),
    "n=1000": ("images", {"model": "tiny-sd", "prompt": "a dog", "n": 1000}, 400, "limits.max_n"),
    "chat n=1000": ("chat", _chat(n=1000), 400, "limits.max_n"),
    "chat unknown field": ("chat", _chat(temprature=0.5), 400, "temprature: unknown field"),
    "chat tools with tool_choice auto": (
        "chat",
        _chat(tools=[{"type": "function", "function": {"name": "f"}}]),
        400,
        "tool_choice 'auto'",
    ),
    "tool parameters not json schema": (
        "chat",
        _chat(
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "frobnicate"}}}],
            tool_choice="required",
        ),
        400,
        "tools[0].function.parameters is not a valid JSON Schema",
    ),
    "chat store": ("chat", _chat(store=True), 400, "store: not supported"),
    "chat penalty out of range": ("chat", _chat(frequency_penalty=2.5), 400, "frequency_penalty"),
    "logit_bias by word": ("chat", _chat(logit_bias={"dog": 5}), 400, "token ids"),
    "logit_bias outside the vocabulary": ("chat", _chat(logit_bias={"99999999": 5}), 400, "vocabulary"),
    "top_logprobs alone": ("chat", _chat(top_logprobs=2), 400, "top_logprobs needs logprobs"),
    "top_logprobs=21": ("chat", _chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    "quality hd": (
        "images",
        {"model": "tiny-sd", "prompt": "a dog", "quality": "hd"},
        400,
        "num_inference_steps",
    ),
    "style vivid": (
        "images",
        {"model": "tiny-sd", "prompt": "a dog", "style": "vivid"},
        400,
        "in the prompt",
    ),
    "max_tokens=10**9": ("chat", _chat(max_tokens=10**9), 400, "limits.max_tokens"),
    "schema not json schema": (
        "chat",
        _chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "frobnicate"}},
            }
        ),
        400,
        "not a valid JSON Schema",
    ),
    "size not WxH": ("images", {"model": "tiny-sd", "prompt": "a dog", "size": "big"}, 400, "WIDTHxHEIGHT"),
    "size too large": (
        "images",
        {"model": "tiny-sd", "prompt": "a dog", "size": "4096x4096"},
        400,
        "limits.max_image_side",
    ),
    "size not multiple of 8": (
        "images",
        {"model": "tiny-sd", "prompt": "a dog", "size": "60x60"},
        400,
        "multiples of 8",
    ),
    "too many steps": (
        "images",
        {"model": "tiny-sd", "prompt": "a dog", "num_inference_steps": 1000},
        400,
        "limits.max_steps",
    ),
    "body too large": ("chat", _chat("x" * 1_200_000), 413, "max_body_bytes"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_a_4xx_in_the_openai_shape(serve_app, errors_before, case):
    route, body, status, fragment = BAD_INPUTS[case]
    path = {"images": "/v1/images/generations", "chat": "/v1/chat/completions"}[route]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(
        serve_app.base_url + path,
        content=content,
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=60,
    )
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"], error


def test_burst_beyond_the_queue_gets_503_and_the_server_recovers(serve_app):
    # Enough steps that batches stay busy while the burst arrives and the queue fills.
    body = {"model": "tiny-sd", "prompt": "a dog", "size": "64x64", "num_inference_steps": 8}

    async def burst():
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as http:
            calls = [
                http.post(f"{serve_app.base_url}/v1/images/generations", json={**body, "seed": i})
                for i in range(60)
            ]
            return await asyncio.gather(*calls)

    codes = [r.status_code for r in asyncio.run(burst())]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) >= 8, codes
    resp = httpx.post(f"{serve_app.base_url}/v1/images/generations", json=body, headers=AUTH, timeout=60)
    assert resp.status_code == 200


def test_client_mistakes_log_no_errors_and_a_good_request_still_works(client, serve_app, errors_before):
    with pytest.raises(openai.BadRequestError):  # one more mistake, so this test stands alone too
        client.images.generate(model="tiny-sd", prompt="a dog", n=1000, **IMAGE_KW)
    assert client.chat.completions.create(model="tiny-vlm", messages=user("hi"), max_tokens=2).choices
    new_errors = serve_app.log_errors()[errors_before:]  # ERROR lines are flushed at once
    assert new_errors == []
    # ... read from the right place: the ingress's access log has the client mistakes, at INFO (the
    # replica flushes INFO lines in the background, so give it a moment).
    wait_until(
        lambda: serve_app.log_lines("POST /v1/images/generations 400"),
        "an access log line for the 400s in the Serve logs",
        timeout_s=30,
        every_s=0.5,
    )
    assert all(line.startswith("INFO") for line in serve_app.log_lines("POST /v1/images/generations 400"))
