"""Overload and failure handling that needs no cluster: the ingress's own admission limit, how failures
of the model deployments become OpenAI errors, the engine's failed rows, and the prompt-size check.

    .venv/bin/python -m pytest tests/serving/test_overload_checks.py
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from raybooth.cluster.config import BatchConfig, ServeConfig
from raybooth.openai.chat import ChatLimits, check_prompt_size, generation_request_from_chat
from raybooth.openai.errors import APIError
from raybooth.openai.protocol import ChatCompletionRequest
from raybooth.serving.serving_chat import row_error
from raybooth.serving.upstream import OverloadGuard, call_deployment, error_headers, next_item

# --------------------------------------------------------------------------------------------------
# The ingress's admission limit
# --------------------------------------------------------------------------------------------------


async def _slow(request):
    await asyncio.sleep(0.5)
    return JSONResponse({"ok": True})


async def _plain_503(request):
    return PlainTextResponse("Request dropped due to backpressure", status_code=503)


def _guarded_app() -> Starlette:
    routes = [Route("/v1/slow", _slow), Route("/healthz", _slow), Route("/v1/plain", _plain_503)]
    app = Starlette(routes=routes)
    app.add_middleware(OverloadGuard)
    return app


@pytest.fixture
def guard_limit_2():
    before = OverloadGuard.limit
    OverloadGuard.configure(2, retry_after_s=3)
    yield
    OverloadGuard.configure(before, retry_after_s=1)


def _burst(path: str, n: int) -> list[httpx.Response]:
    async def run():
        transport = httpx.ASGITransport(app=_guarded_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            return await asyncio.gather(*(http.get(path) for _ in range(n)))

    return asyncio.run(run())


def test_requests_over_the_ingress_limit_get_the_openai_503_with_retry_after(guard_limit_2):
    responses = _burst("/v1/slow", 5)
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 503, 503, 503], codes
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["content-type"] == "application/json"
    assert refused.headers["retry-after"] == "3"
    error = refused.json()["error"]
    assert error["code"] == "overloaded" and error["type"] == "server_error", error
    assert "ingress" in error["message"]
    assert OverloadGuard.ongoing == 0  # every admitted request released its seat
    assert [r.status_code for r in _burst("/v1/slow", 2)] == [200, 200]  # and the limit is free again


def test_a_plain_text_503_from_inside_the_app_leaves_as_the_openai_error():
    [resp] = _burst("/v1/plain", 1)
    assert resp.status_code == 503 and resp.headers["content-type"] == "application/json"
    assert resp.headers["retry-after"] == "1" and resp.json()["error"]["code"] == "overloaded"


def test_healthz_is_never_refused_for_load(guard_limit_2):
    assert [r.status_code for r in _burst("/healthz", 5)] == [200] * 5


def test_every_503_carries_retry_after_and_401_the_auth_challenge():
    assert error_headers(APIError(503, "busy", code="overloaded")) == {"Retry-After": "1"}
    assert error_headers(APIError(401, "no key")) == {"WWW-Authenticate": "Bearer"}
    assert error_headers(APIError(400, "bad")) is None


# --------------------------------------------------------------------------------------------------
# Failures of the model deployments
# --------------------------------------------------------------------------------------------------


class _Failing:
    """Stands in for a DeploymentResponse / its generator (both need a running Serve app otherwise)."""

    def __init__(self, error: BaseException):
        self.error = error
        self.cancelled = False

    def __await__(self):
        raise self.error
        yield  # pragma: no cover (makes this a generator)

    async def __anext__(self):
        raise self.error

    def cancel(self):
        self.cancelled = True


@pytest.mark.parametrize(
    ("error", "code"),
    [(BackPressureError(64, 64), "overloaded"), (ActorDiedError(), "replica_failed")],
    ids=["queue-full", "replica-died"],
)
def test_deployment_failures_are_openai_503s(error, code):
    for call in (
        lambda: call_deployment(_Failing(error), 5, "chat completion"),
        # the deadline is in loop time: asyncio's loop clock is time.monotonic
        lambda: next_item(_Failing(error), time.monotonic() + 5, "chat completion", 5),
    ):
        with pytest.raises(APIError) as info:
            asyncio.run(_run(call))
        assert info.value.status == 503 and info.value.code == code, info.value.body()
        assert "chat completion" in info.value.message


async def _run(make):
    return await make()


def test_a_row_the_engine_failed_keeps_its_status():
    server = row_error({"error": "internal error while generating", "error_type": "server_error"})
    client = row_error({"error": "prompt too long", "error_type": "invalid_request_error"})
    assert (server.status, server.type) == (500, "server_error")
    assert (client.status, client.type) == (400, "invalid_request_error")


# --------------------------------------------------------------------------------------------------
# Prompt size: checked before anything tokenizes it, on the chat route and in the batch job
# --------------------------------------------------------------------------------------------------


def _chat(text: str) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": text}]})


@pytest.mark.parametrize(
    ("limits", "setting"),
    [
        (
            ChatLimits.for_serving(ServeConfig.model_validate({"limits": {"max_prompt_bytes": 1000}})),
            "limits.",
        ),
        (
            ChatLimits.for_batch(BatchConfig.model_validate({"max_prompt_bytes": 1000, "input": "x.jsonl"})),
            "",
        ),
    ],
    ids=["serving", "batch"],
)
def test_a_prompt_over_max_prompt_bytes_is_refused_naming_the_limit(limits, setting):
    check_prompt_size(_chat("é" * 500), limits)  # 1000 bytes: at the limit
    with pytest.raises(APIError) as info:
        generation_request_from_chat(_chat("é" * 501), limits)  # 1002 bytes (characters are not bytes)
    err = info.value
    assert err.status == 400 and err.code == "limit_exceeded" and err.param == "messages"
    assert f"{setting}max_prompt_bytes=1000" in err.message and "1002 bytes" in err.message


def test_the_default_limit_refuses_a_10_mb_prompt_at_once():
    # check_prompt_size takes no tokenizer: the prompt is measured in bytes, never tokenized.
    with pytest.raises(APIError, match="limits.max_prompt_bytes=262144") as info:
        check_prompt_size(_chat("word " * 2_000_000), ChatLimits.for_serving(ServeConfig()))
    assert "10000000 bytes" in info.value.message
