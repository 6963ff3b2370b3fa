"""`chat.placement: ingress`: every ingress replica runs its own engine, called in-process
(serving/local_handle.py), so a chat request never leaves the process that holds its connection. Through the
official `openai` client on tiny-llm: no ChatDeployment runs, streamed and whole answers are the engine's own,
concurrent streams decode together, a client that leaves mid-stream frees its row, and stats, /healthz and
the image route (still a deployment) answer.

.venv/bin/python -m pytest tests/serving/test_chat_in_ingress.py
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator

import httpx
import pytest

from tests.serving.conftest import ServeApp

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_app(serve_app: ServeApp) -> Iterator[ServeApp]:
    chat = {**serve_app.settings["chat"], "placement": "ingress"}
    with serve_app.redeployed({**serve_app.settings, "chat_model": "tiny-llm", "chat": chat}):
        yield serve_app


def alone(prompt: str, max_tokens: int) -> str:
    """tiny-llm's greedy answer, in this process."""
    from raybooth.cluster.workdir import default_models_dir
    from raybooth.models.decoding import SamplingParams
    from raybooth.models.vlm_engine import GenerationRequest, VLMEngine

    engine = VLMEngine.from_pretrained("tiny-llm", device="cpu", models_dir=default_models_dir())
    messages = [{"role": "user", "content": prompt}]
    [result] = engine.generate(
        [GenerationRequest(messages, SamplingParams(max_tokens=max_tokens, temperature=0))]
    )
    return result.text


def test_the_engine_runs_in_the_ingress_and_answers_as_alone(local_app: ServeApp):
    from ray import serve

    deployments = serve.status().applications["raybooth"].deployments
    assert "ChatDeployment" not in deployments and deployments["Ingress"].status == "HEALTHY"
    assert httpx.get(f"{local_app.base_url}/healthz").status_code == 200
    client = local_app.openai()
    ask = {"model": "tiny-llm", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 24}
    whole = client.chat.completions.create(**ask, temperature=0)
    assert whole.choices[0].message.content == alone("Say something.", 24)
    chunks = list(
        client.chat.completions.create(
            **ask, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 24
    stats = local_app.stats()
    assert stats["chat"]["scheduler"] == "continuous" and stats["chat"]["decode_steps"] > 0
    # The image route still calls its deployment.
    image = client.images.generate(
        model="tiny-sd",
        prompt="a dog",
        size="64x64",
        response_format="b64_json",
        extra_body={"num_inference_steps": 1},
    )
    assert base64.b64decode(image.data[0].b64_json).startswith(b"\x89PNG")


def test_concurrent_streams_decode_together_each_as_alone(local_app: ServeApp):
    prompts = [f"Name {i} colours." for i in range(4)]
    before = len(local_app.stats()["chat"]["step_rows"])

    async def ask(client, prompt: str) -> str:
        stream = await client.chat.completions.create(
            model="tiny-llm",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=40,
            temperature=0,
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main() -> list[str]:
        client = local_app.async_openai()
        return await asyncio.gather(*(ask(client, p) for p in prompts))

    answers = asyncio.run(main())
    assert answers == [alone(p, 40) for p in prompts]
    assert max(local_app.stats()["chat"]["step_rows"][before:]) >= 2  # they shared decode steps


def test_a_client_that_leaves_mid_stream_frees_its_row(local_app: ServeApp):
    before = len(local_app.stats()["chat"]["cancelled_rows"])
    body = {
        "model": "tiny-llm",
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 900,
        "temperature": 0,
        "logit_bias": {"5": -100},  # tiny-llm's EOS: the row would run to its 900 tokens
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{local_app.base_url}/v1/chat/completions", json=body, headers=local_app.auth, timeout=60
    ) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(3)]  # the role chunk and some text: the row is decoding
        assert all(line.startswith("data: ") or not line for line in got), got
    cancelled = []
    for _ in range(300):  # the row leaves at the engine's next step once the ingress sees the disconnect
        cancelled = local_app.stats()["chat"]["cancelled_rows"][before:]
        if cancelled:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert len(cancelled) == 1 and cancelled[0] < 900, cancelled
