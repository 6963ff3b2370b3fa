"""Failures through the real Serve app: poisoned rows, slow refusals, overload and a replica that dies.

    .venv/bin/python -m pytest tests/serving/test_failures.py

This module runs its own app (conftest's module-scoped `serve_app`) because its last tests kill the
model replicas' processes. What each test holds:
- a poisoned row (tiny temperature/top_p, a self-referencing schema) never fails the good requests
  batched with it;
- slow refusals (prompts over limits.max_prompt_bytes, schemas near the compile bounds) do not hold the
  good requests' batches, and the replica's memory stays at its baseline;
- every 503 (the chat and image queues, the ingress's own limit) is OpenAI's JSON error with
  Retry-After; a request past the request timeout is a 504 and its UNet batch / chat rows stop;
- a replica killed mid-request: non-streamed requests get a JSON 503, streams an error event then
  [DONE], and the service answers again once Serve has replaced it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

AUTH = {"Authorization": "Bearer test-key-1"}


def _chat(content: str = "hi", **extra) -> dict:
    return {"model": "tiny-vlm", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


async def _post(http: httpx.AsyncClient, path: str, body: dict, delay_s: float = 0.0):
    """(response, seconds from send to answer), sent after `delay_s`."""
    await asyncio.sleep(delay_s)
    started = time.monotonic()
    resp = await http.post(path, json=body)
    return resp, time.monotonic() - started


def _gather(base_url: str, calls: list[tuple[str, dict, float]]) -> list[tuple[httpx.Response, float]]:
    async def run():
        async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=120) as http:
            return await asyncio.gather(*(_post(http, path, body, delay) for path, body, delay in calls))

    return asyncio.run(run())


def wait_until(probe, what: str, timeout_s: float = 90, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while not (value := probe()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:g}s"
        time.sleep(every_s)
    return value


def _assert_openai_503(resp: httpx.Response, codes: set[str]) -> dict:
    assert resp.status_code == 503, resp.text
    assert resp.headers["content-type"] == "application/json", resp.headers
    assert resp.headers["retry-after"].isdigit(), resp.headers
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error", error
    assert error["code"] in codes, error
    return error


# --------------------------------------------------------------------------------------------------
# One request never fails the others
# --------------------------------------------------------------------------------------------------


def test_poisoned_rows_batched_with_good_requests_fail_alone(serve_app):
    poison = [
        _chat(temperature=1e-300),
        _chat(top_p=1e-300),
        _chat(
            response_format={"type": "json_schema", "json_schema": {"name": "loop", "schema": {"$ref": "#"}}}
        ),
    ]
    good = [_chat(f"good request {i}", temperature=0) for i in range(8)]
    calls = [("/v1/chat/completions", body, 0.0) for body in poison + good]
    results = _gather(serve_app.base_url, calls)
    for resp, _ in results[: len(poison)]:
        assert resp.status_code in (200, 400), resp.text  # greedy, or refused: never a 5xx
        if resp.status_code == 400:
            assert resp.json()["error"]["type"] == "invalid_request_error"
    for resp, _ in results[len(poison) :]:
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["finish_reason"] in ("stop", "length")
    steps = serve_app.stats()["chat"]["step_rows"]
    assert max(steps) > 1, steps  # they did share batches


# --------------------------------------------------------------------------------------------------
# Slow refusals
# --------------------------------------------------------------------------------------------------


def _near_bound_schema(tag: str) -> dict:
    """Two 1000-character strings: at the compile bounds (constrained.py), a compile of ~2 s here. The
    property names differ per call so no two share the grammar cache."""
    text = {"type": "string", "minLength": 1000, "maxLength": 1000}
    schema = {
        "type": "object",
        "properties": {f"a{tag}": text, f"b{tag}": text},
        "required": [f"a{tag}", f"b{tag}"],
    }
    return {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}}


def test_slow_refusals_do_not_hold_good_requests(serve_app):
    big = "many words " * 80_000  # 880 KB: under the test app's 1 MB body limit, over max_prompt_bytes
    rss_before = serve_app.stats()["chat"]["rss_bytes"]
    slow = [_chat(big), _chat(big)] + [_chat(response_format=_near_bound_schema(str(i))) for i in range(2)]
    # The good ones arrive just after, so they would land in the same batches as the slow ones.
    good = [_chat(f"good request {i}", temperature=0) for i in range(4)]
    calls = [("/v1/chat/completions", b, 0.0) for b in slow] + [
        ("/v1/chat/completions", b, 0.1) for b in good
    ]
    results = _gather(serve_app.base_url, calls)
    for resp, seconds in results[:2]:
        assert resp.status_code == 400, resp.text
        assert "limits.max_prompt_bytes=262144" in resp.json()["error"]["message"]
        assert seconds < 5, seconds  # counted at the ingress, never tokenized
    compiled = [seconds for resp, seconds in results[2:4]]
    assert all(resp.status_code == 200 for resp, _ in results[2:]), [r.text for r, _ in results]
    good_latency = [seconds for _, seconds in results[4:]]
    # Admission compiles the grammars off the batch: good requests do not wait for them.
    assert max(good_latency) < min(compiled), (good_latency, compiled)
    rss_after = serve_app.stats()["chat"]["rss_bytes"]
    assert rss_after - rss_before < 64 * 2**20, (rss_before, rss_after)


# --------------------------------------------------------------------------------------------------
# Overload: every 503 is the OpenAI error with Retry-After
# --------------------------------------------------------------------------------------------------


def test_chat_queue_overflow_is_the_openai_503(serve_app):
    body = _chat(max_tokens=64, temperature=0)  # long enough that the 8 ongoing + 16 queued stay busy
    results = _gather(serve_app.base_url, [("/v1/chat/completions", body, 0.0)] * 48)
    codes = [r.status_code for r, _ in results]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) >= 8, codes
    for resp, _ in results:
        if resp.status_code == 503:
            _assert_openai_503(resp, {"overloaded"})


def test_image_queue_overflow_is_the_openai_503(serve_app):
    body = {"model": "tiny-sd", "prompt": "a dog", "size": "64x64", "num_inference_steps": 4}
    results = _gather(
        serve_app.base_url, [("/v1/images/generations", {**body, "seed": i}, 0.0) for i in range(48)]
    )
    codes = [r.status_code for r, _ in results]
    assert set(codes) <= {200, 503} and codes.count(503) > 0, codes
    for resp, _ in results:
        if resp.status_code == 503:
            _assert_openai_503(resp, {"overloaded"})


def test_the_ingress_limit_is_the_openai_503_not_the_proxy_text(serve_app):
    settings = copy.deepcopy(serve_app.settings)
    settings["ingress"]["max_ongoing_requests"] = 2  # below the chat queue, so the ingress is what fills
    with serve_app.redeployed(settings):
        wait_until(lambda: _chat_answers(serve_app.base_url), "the redeployed ingress answering")
        body = _chat(max_tokens=32, temperature=0)
        results = _gather(serve_app.base_url, [("/v1/chat/completions", body, 0.0)] * 12)
    codes = [r.status_code for r, _ in results]
    assert set(codes) <= {200, 503} and codes.count(200) >= 2 and codes.count(503) > 0, codes
    for resp, _ in results:
        if resp.status_code == 503:
            assert "ingress" in _assert_openai_503(resp, {"overloaded"})["message"]


def _answers_in_time(base_url: str) -> bool:
    """One small request of each route within the (short) request timeout; False on a 504."""
    image = {"model": "tiny-sd", "prompt": "warm up", "size": "64x64", "num_inference_steps": 1}
    for path, body in (("/v1/images/generations", image), ("/v1/chat/completions", _chat(max_tokens=2))):
        resp = httpx.post(f"{base_url}{path}", json=body, headers=AUTH, timeout=60)
        if resp.status_code == 504:  # the replicas are still loading models
            return False
        assert resp.status_code == 200, resp.text
    return True


@pytest.mark.own_settings  # right after the ingress-limit variant: one ingress redeploy between them
def test_requests_past_the_timeout_get_504_and_their_work_stops(serve_app, eos_token_id):
    settings = copy.deepcopy(serve_app.settings)
    # Well below a 100-step image or 4 x 900 tokens here, above a small request's batch wait (1 s at most).
    # Only the ingress restarts: the model replicas keep running, warm.
    settings["ingress"]["request_timeout_s"] = 1.5
    with serve_app.redeployed(settings):
        wait_until(
            lambda: _answers_in_time(serve_app.base_url), "answering small requests after the redeploy"
        )
        before = serve_app.stats()
        body = {"model": "tiny-sd", "prompt": "a dog", "n": 4, "size": "128x128", "num_inference_steps": 100}
        resp = httpx.post(f"{serve_app.base_url}/v1/images/generations", json=body, headers=AUTH, timeout=60)
        assert resp.status_code == 504, resp.text
        error = resp.json()["error"]
        assert error["code"] == "timeout" and "1.5s" in error["message"], error
        stopped = wait_until(
            lambda: serve_app.stats()["images"]["abandoned"][len(before["images"]["abandoned"]) :],
            "stopping the timed-out request's UNet batch",
        )
        assert stopped[0][0] < stopped[0][1], stopped

        # Chat: four choices of 900 tokens each, EOS banned so none ends early.
        body = _chat(n=4, max_tokens=900, temperature=0, logit_bias={str(eos_token_id): -100})
        resp = httpx.post(f"{serve_app.base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
        assert resp.status_code == 504, resp.text
        assert resp.json()["error"]["code"] == "timeout"
        cancelled = wait_until(
            lambda: serve_app.stats()["chat"]["cancelled_rows"][len(before["chat"]["cancelled_rows"]) :],
            "cancelling the timed-out chat rows",
        )
        assert all(tokens < 900 for tokens in cancelled), cancelled  # the rows stopped, not ran out


def _chat_answers(base_url: str) -> bool:
    try:
        resp = httpx.post(f"{base_url}/v1/chat/completions", json=_chat(), headers=AUTH, timeout=60)
    except httpx.HTTPError:
        return False
    return resp.status_code == 200


# --------------------------------------------------------------------------------------------------
# A replica that dies mid-request (last: these kill the module's replicas)
# --------------------------------------------------------------------------------------------------


def _sse_events(lines: list[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


@pytest.fixture(scope="module")
def eos_token_id(tiny_vlm_path) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_vlm_path).eos_token_id


def test_a_chat_replica_killed_mid_request(serve_app, eos_token_id):
    eos_banned = {"logit_bias": {str(eos_token_id): -100}}  # answers still running at the kill
    long_body = _chat(max_tokens=900, temperature=0, **eos_banned)
    pid = serve_app.stats()["chat"]["pid"]

    async def run():
        async with httpx.AsyncClient(base_url=serve_app.base_url, headers=AUTH, timeout=120) as http:
            whole = asyncio.create_task(http.post("/v1/chat/completions", json=long_body))
            lines: list[str] = []
            async with http.stream(
                "POST", "/v1/chat/completions", json={**long_body, "stream": True}
            ) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    lines.append(line)
                    if len(lines) == 6:  # a few chunks in: the stream has started
                        os.kill(pid, signal.SIGKILL)
            return await whole, lines

    whole, lines = asyncio.run(run())
    _assert_openai_503(whole, {"replica_failed", "overloaded"})
    events = _sse_events(lines)
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["code"] in ("replica_failed", "overloaded") and error["type"] == "server_error", error

    # New requests are answered (a fast 503 while no replica is up, or queued until the new one is) and
    # the service is back within a stated time.
    killed = time.monotonic()

    def answered_200() -> bool:
        started = time.monotonic()
        resp = httpx.post(
            f"{serve_app.base_url}/v1/chat/completions", json=_chat(), headers=AUTH, timeout=120
        )
        assert time.monotonic() - started < serve_app.settings["ingress"]["request_timeout_s"]
        assert resp.status_code in (200, 503), resp.text
        if resp.status_code == 503:
            _assert_openai_503(resp, {"replica_failed", "overloaded"})
        return resp.status_code == 200

    wait_until(answered_200, "chat answering after its replica was killed", timeout_s=120)
    print(f"chat service back {time.monotonic() - killed:.1f}s after the kill")
    assert serve_app.stats()["chat"]["pid"] != pid


def test_an_image_replica_killed_mid_request(serve_app):
    pid = serve_app.stats()["images"]["pid"]
    body = {"model": "tiny-sd", "prompt": "a dog", "size": "128x128", "num_inference_steps": 100}

    async def run():
        async with httpx.AsyncClient(base_url=serve_app.base_url, headers=AUTH, timeout=120) as http:
            pending = asyncio.create_task(http.post("/v1/images/generations", json=body))
            await asyncio.sleep(3)  # the request is sampling
            os.kill(pid, signal.SIGKILL)
            return await pending

    _assert_openai_503(asyncio.run(run()), {"replica_failed", "overloaded"})
    killed = time.monotonic()
    small = {"model": "tiny-sd", "prompt": "a dog", "size": "64x64", "num_inference_steps": 1}

    def answered_200() -> bool:
        resp = httpx.post(
            f"{serve_app.base_url}/v1/images/generations", json=small, headers=AUTH, timeout=120
        )
        assert resp.status_code in (200, 503), resp.text
        return resp.status_code == 200

    wait_until(answered_200, "images answering after the replica was killed", timeout_s=120)
    print(f"image service back {time.monotonic() - killed:.1f}s after the kill")
