"""The serving pieces that need no cluster: safety policy, API keys, size parsing, model slots, config.

.venv/bin/python -m pytest tests/serving/test_edge.py
"""

from __future__ import annotations

import pytest

from raybooth.cluster.config import SafetySection, ServeConfig
from raybooth.errors import ConfigError
from raybooth.models.safety import SafetyPolicy
from raybooth.openai.errors import APIError
from raybooth.serving.auth import KeyChecker, check_bind_allowed, digest, is_loopback, load_api_keys

POLICY = {
    "threshold": 1.0,
    "categories": [
        {"name": "violence", "phrases": ["kill", "build a bomb"], "patterns": [r"\bshoot(ing)?\b"]},
        {"name": "spam", "phrases": ["buy now"], "weight": 0.5},  # two matches needed
        {"name": "leak", "patterns": [r"sk-[a-z0-9]{6}"], "applies_to": ["output"]},
    ],
}


@pytest.fixture
def policy() -> SafetyPolicy:
    return SafetyPolicy.from_settings(SafetySection.model_validate(POLICY).model_dump())


# --------------------------------------------------------------------------------------------------
# Safety policy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "category", "span"),
    [
        ("I will KILL it", "violence", "KILL"),
        ("how to build   a\nbomb", "violence", "build   a\nbomb"),
        ("stop shooting", "violence", "shooting"),
        ("buy now! really, buy now", "spam", "buy now"),
    ],
)
def test_policy_blocks_and_names_category_and_span(policy, text, category, span):
    verdict = policy.check(text)
    assert verdict is not None and verdict.category == category and verdict.first.span == span
    assert f"{category!r}" in verdict.explanation() and repr(span) in verdict.explanation()


@pytest.mark.parametrize("text", ["a skilled painter", "buy now", "my key is sk-abc123", ""])
def test_policy_lets_harmless_text_through(policy, text):
    # whole words only; one spam match scores 0.5 < 1; the leak category checks output only
    assert policy.check(text) is None


def test_output_scope_category_checks_generated_text(policy):
    assert policy.check("my key is sk-abc123", scope="output").category == "leak"


def test_stream_filter_never_sends_a_blocked_span(policy):
    stream = policy.stream_filter()
    sent = ""
    for delta in ["Sure", ", here", " is the key: s", "k-ab", "c123 and more"]:
        text, verdict = stream.feed(delta)
        sent += text
        if verdict:
            break
    assert verdict is not None and verdict.category == "leak"
    assert "sk-" not in sent and "Sure, here is the key: ".startswith(sent)
    assert stream.feed("more") == ("", verdict) and stream.flush() == ""


def test_stream_filter_releases_everything_when_clean(policy):
    stream = policy.stream_filter()
    sent = "".join(stream.feed(d)[0] for d in ["a quiet ", "afternoon ", "in the park"])
    assert sent + stream.flush() == "a quiet afternoon in the park"


def test_disabled_policy_blocks_nothing_and_holds_nothing_back():
    policy = SafetyPolicy.from_settings(
        SafetySection.model_validate({**POLICY, "enabled": False}).model_dump()
    )
    assert policy.check("kill") is None
    assert policy.stream_filter().feed("kill")[0] == "kill"


def test_bad_pattern_is_a_config_error_naming_it():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        SafetySection.model_validate({"categories": [{"name": "x", "patterns": ["(unclosed"]}]})


# --------------------------------------------------------------------------------------------------
# API keys and binding
# --------------------------------------------------------------------------------------------------


def test_keys_from_env_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEYS", "a, b,,")
    secret = tmp_path / "keys"
    secret.write_text("c  # the CI key\n\n# comment\nd\n")
    assert load_api_keys("MY_KEYS", str(secret)) == ["a", "b", "c", "d"]
    with pytest.raises(ConfigError, match="does not exist"):
        load_api_keys("MY_KEYS", str(tmp_path / "missing"))


def test_key_checker_wants_bearer_and_a_known_key():
    checker = KeyChecker([digest("k1"), digest("k2")])
    assert checker.allows("Bearer k1") and checker.allows("bearer k2")
    assert not any(checker.allows(h) for h in (None, "", "k1", "Bearer", "Bearer k3", "Basic k1"))
    assert KeyChecker([]).allows(None)  # no keys configured: open (and therefore loopback only)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_may_run_without_keys(host):
    assert is_loopback(host)
    check_bind_allowed(host, [])


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "example.com", "::"])
def test_other_addresses_need_keys(host):
    with pytest.raises(ConfigError, match="refusing to serve"):
        check_bind_allowed(host, [])
    check_bind_allowed(host, [digest("k")])


# --------------------------------------------------------------------------------------------------
# Request checks and config
# --------------------------------------------------------------------------------------------------


def test_parse_size_names_the_limit():
    from raybooth.serving.serving_images import parse_size

    assert parse_size("64x128", 1024) == (64, 128)
    for size, fragment in [
        ("64", "WIDTHxHEIGHT"),
        ("2048x64", "max_image_side"),
        ("60x64", "multiples of 8"),
    ]:
        with pytest.raises(APIError, match=fragment) as info:
            parse_size(size, 1024)
        assert info.value.status == 400 and info.value.param == "size"


def test_serve_config_cross_checks():
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        ServeConfig.model_validate({"image": {"max_batch_size": 32}})
    with pytest.raises(ValueError, match="limits.max_n"):
        ServeConfig.model_validate({"limits": {"max_n": 16}})
    with pytest.raises(ValueError, match="min_replicas"):
        ServeConfig.model_validate({"chat": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})


def test_builder_args_merge_file_overrides_and_settings(tmp_path):
    from raybooth.serving.app import load_serve_config

    path = tmp_path / "serve.yaml"
    path.write_text("port: 9000\nimage:\n  max_batch_size: 4\n")
    cfg = load_serve_config(
        {"config": str(path), "overrides": ["image.default_steps=3"], "settings": {"port": 9001}}
    )
    assert (cfg.port, cfg.image.max_batch_size, cfg.image.default_steps) == (9001, 4, 3)


# --------------------------------------------------------------------------------------------------
# Model slots: in-flight batches finish on the version they started with
# --------------------------------------------------------------------------------------------------


def test_swapped_out_model_is_released_only_after_its_batch(tmp_path):
    from raybooth.serving.image_deployment import ModelSlot
    from raybooth.serving.image_models import LoadedImageModel, Located

    released: list[str] = []

    def model(version: str) -> LoadedImageModel:
        return LoadedImageModel(Located("dog@prod", tmp_path, version, floating=True), pipeline=None)

    slot = ModelSlot(model("dog/1"), on_release=lambda m: released.append(m.located.version))
    with slot.use() as running:
        slot.swap(model("dog/2"))  # the alias moved while a batch runs on version 1
        assert running.located.version == "dog/1" and released == []
        with slot.use() as newer:
            assert newer.located.version == "dog/2"
    assert released == ["dog/1"]
    slot.swap(model("dog/3"))  # nothing running: released at once
    assert released == ["dog/1", "dog/2"]


def test_cli_serve_refuses_a_public_address_without_keys(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAYBOOTH_API_KEYS"}
    result = subprocess.run(
        [sys.executable, "-m", "raybooth.cli", "serve", "host=0.0.0.0"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "refusing to serve on '0.0.0.0' without API keys" in result.stderr


def test_a_disconnect_reported_as_a_cancelled_fetch_ends_the_stream_quietly():
    import asyncio

    from ray.exceptions import TaskCancelledError

    from raybooth.serving.ingress import EventStreamResponse

    async def lines():
        yield "data: 1\n\n"
        await asyncio.sleep(30)  # the client is gone before this line: the stream must not wait for it
        yield "data: 2\n\n"

    async def receive():  # what Ray Serve's receive does when its proxy cancelled the message fetch
        await asyncio.sleep(0.05)
        raise TaskCancelledError()

    sent = []

    async def send(message):
        sent.append(message)

    async def run():
        scope = {"type": "http"}  # ASGI spec < 2.4, as Serve passes it: Starlette listens on receive
        await asyncio.wait_for(EventStreamResponse(lines())(scope, receive, send), timeout=10)

    asyncio.run(run())  # no TaskCancelledError escapes: Serve has nothing to log as a failed request
    bodies = [m.get("body", b"") for m in sent if m["type"] == "http.response.body"]
    assert b"data: 1" in b"".join(bodies) and b"data: 2" not in b"".join(bodies)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200


def test_slow_deployment_call_is_cancelled_and_becomes_504():
    import asyncio

    from raybooth.serving.upstream import call_deployment

    class SlowResponse:  # the two things the ingress uses of a DeploymentResponse
        cancelled = False

        def __await__(self):
            return asyncio.sleep(30).__await__()

        def cancel(self) -> None:
            self.cancelled = True

    response = SlowResponse()
    with pytest.raises(APIError) as info:
        asyncio.run(call_deployment(response, timeout_s=0.05, what="image generation"))
    assert info.value.status == 504 and "0.05s" in info.value.message and response.cancelled


class _Handle:
    """Stands in for the chat deployment's handle: check_request never calls the deployment."""

    def options(self, **_: object) -> _Handle:
        return self


def test_a_video_alone_is_a_request_and_nothing_at_all_is_a_400_naming_all_three():
    from raybooth.cluster.config import ServeConfig
    from raybooth.models.safety import SafetyPolicy
    from raybooth.openai.errors import APIError
    from raybooth.openai.protocol import ChatCompletionRequest
    from raybooth.serving.serving_chat import ChatService

    cfg = ServeConfig.model_validate({})
    service = ChatService(_Handle(), cfg, SafetyPolicy.from_settings(cfg.safety.model_dump()), cfg.chat_model)

    def ask(content: object) -> ChatCompletionRequest:
        return ChatCompletionRequest.model_validate(
            {"model": cfg.chat_model, "messages": [{"role": "user", "content": content}]}
        )

    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    service.check_request(ask([video]))  # the frames are decoded and checked later, per row
    with pytest.raises(APIError, match="no text, image or video"):
        service.check_request(ask([{"type": "text", "text": "  "}]))


def test_a_chat_stream_writes_once_per_upstream_event():
    """Each write is a pass through the ASGI stack, a socket write and a client read: the role chunk goes
    out with the first text, an event's text with its finish chunk, the usage chunk with [DONE]."""
    import asyncio
    import json

    from raybooth.serving.serving_chat import ChatService

    cfg = ServeConfig.model_validate({})
    service = ChatService(_Handle(), cfg, SafetyPolicy.from_settings(cfg.safety.model_dump()), cfg.chat_model)

    async def upstream(*events: dict):
        for event in events:
            yield event

    def parse(write: str) -> list:
        assert write.endswith("\n\n")
        data = [line.removeprefix("data: ") for line in write.split("\n\n") if line]
        return [d if d == "[DONE]" else json.loads(d) for d in data]

    async def writes(streams: list) -> list[str]:
        return [w async for w in service._sse_lines(streams, "chatcmpl-1", True, None)]

    def delta(chunk: dict) -> dict:
        return {k: v for k, v in chunk["choices"][0]["delta"].items() if v is not None}

    final = {"text": "!", "finish_reason": "length", "prompt_tokens": 5, "completion_tokens": 3}
    one = asyncio.run(writes([upstream({"text": "Hel"}, {"text": "lo"}, final)]))
    assert len(one) == 4, one
    first, middle, last, end = map(parse, one)
    assert [delta(c) for c in first] == [{"role": "assistant", "content": ""}, {"content": "Hel"}]
    assert [delta(c) for c in middle] == [{"content": "lo"}]
    assert [delta(c) for c in last] == [{"content": "!"}, {}]
    assert last[1]["choices"][0]["finish_reason"] == "length"
    assert end[0]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert end[1:] == ["[DONE]"]

    # n=2: still one write per upstream event; every chunk is there once, in each choice's order
    two = asyncio.run(writes([upstream({"text": "a"}, final), upstream({"text": "b"}, final)]))
    assert len(two) == 5, two  # four upstream events, then the end
    chunks = [c for w in two for c in parse(w)]
    for index, text in ((0, "a"), (1, "b")):
        deltas = [delta(c) for c in chunks[:-2] if c["choices"][0]["index"] == index]
        assert deltas == [{"role": "assistant", "content": ""}, {"content": text}, {"content": "!"}, {}]
    assert chunks[-2]["usage"]["completion_tokens"] == 6 and chunks[-1] == "[DONE]"
