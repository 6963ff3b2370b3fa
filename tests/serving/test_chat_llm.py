"""The chat route serving a text-only LLM (tiny-llm) through the official `openai` client: streaming,
and an image part refused with a 400 that names the model. The route runs with `chat.quantization: int8`
and `chat.speculative` (tiny-llm drafting for itself): answers are the int8 model's own greedy answers,
and a stream step carries several tokens (the draft's proposals, all kept).

.venv/bin/python -m pytest tests/serving/test_chat_llm.py
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import openai
import pytest

from raybooth.samples import draw_sample_image, png_bytes
from tests.serving.conftest import ServeApp

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["cat", "dog"]}, "count": {"type": "integer"}},
    "required": ["label", "count"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm_app(serve_app: ServeApp) -> Iterator[ServeApp]:
    """The session's app with int8 tiny-llm on the chat route, speculating with itself as the draft (Serve
    restarts only what the change touches)."""
    chat = {**serve_app.settings["chat"], "quantization": "int8"}
    chat["speculative"] = {"draft_model": "tiny-llm", "num_tokens": 3}
    with serve_app.redeployed({**serve_app.settings, "chat_model": "tiny-llm", "chat": chat}):
        yield serve_app


def int8_greedy_answer(messages: list[dict], **params) -> str:
    """What int8 tiny-llm answers alone, in this process, without a draft."""
    from raybooth.cluster.workdir import default_models_dir
    from raybooth.models.decoding import SamplingParams
    from raybooth.models.vlm_engine import GenerationRequest, VLMEngine

    engine = VLMEngine.from_pretrained(
        "tiny-llm", device="cpu", models_dir=default_models_dir(), quantization="int8"
    )
    [result] = engine.generate([GenerationRequest(messages, SamplingParams(temperature=0, **params))])
    return result.text


def test_text_llm_streams_and_refuses_images(llm_app: ServeApp):
    client = llm_app.openai()
    # The grammar runs for a text-only LLM too: the random model's answer still parses.
    ask = {
        "model": "tiny-llm",
        "messages": [{"role": "user", "content": "Answer in JSON."}],
        "max_tokens": 40,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}},
    }
    whole = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens > 0
    assert json.loads(whole.choices[0].message.content)["label"] in ("cat", "dog")
    plain = [{"role": "user", "content": "Say something."}]
    answer = client.chat.completions.create(model="tiny-llm", messages=plain, max_tokens=12, temperature=0)
    assert answer.choices[0].message.content == int8_greedy_answer(plain, max_tokens=12)
    # Plain decoding streams one token per chunk; with the draft's proposals kept, chunks carry several.
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) < whole.usage.completion_tokens / 2, (len(content_chunks), whole.usage)

    url = "data:image/png;base64," + base64.b64encode(png_bytes(draw_sample_image(0, size=32))).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe it."}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny-llm", messages=[{"role": "user", "content": content}], max_tokens=4
        )
    assert "model tiny-llm takes no images" in str(info.value)
