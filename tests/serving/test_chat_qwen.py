"""The chat route serving a Qwen-VL model (tiny-qwen2.5-vl: M-RoPE positions, image grids) through the
official `openai` client: a streamed answer about an image, and a video request (its sampled frames as
Qwen's spatio-temporal video patches), each equal to the engine's own greedy answer to the same request
alone, in this process.

    .venv/bin/python -m pytest tests/serving/test_chat_qwen.py
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import av
import numpy as np
import pytest

from raybooth.samples import draw_sample_image, png_bytes
from tests.serving.conftest import ServeApp

pytestmark = pytest.mark.slow
MODEL = "tiny-qwen2.5-vl"


@pytest.fixture(scope="module")
def qwen_app(serve_app: ServeApp) -> Iterator[ServeApp]:
    with serve_app.redeployed({**serve_app.settings, "chat_model": MODEL}):
        yield serve_app


def mp4_url(frames: int = 4, rate: int = 2) -> str:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(frames):
            image = np.asarray(draw_sample_image(i, size=32))
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    return "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()


def alone(app: ServeApp, content: list[dict], max_tokens: int) -> tuple[str, int]:
    """The engine's greedy answer to the same chat, built the way the route builds it (same limits), and
    its prompt's token count."""
    from raybooth.cluster.config import ServeConfig
    from raybooth.cluster.workdir import default_models_dir
    from raybooth.models.vlm_engine import VLMEngine
    from raybooth.openai.chat import ChatLimits, generation_request_from_chat
    from raybooth.openai.protocol import ChatCompletionRequest

    request = ChatCompletionRequest.model_validate(
        {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
         "temperature": 0}
    )  # fmt: skip
    engine = VLMEngine.from_pretrained(MODEL, device="cpu", models_dir=default_models_dir())
    limits = ChatLimits.for_serving(ServeConfig.model_validate(app.settings))
    [result] = engine.generate([generation_request_from_chat(request, limits)])
    return result.text, result.prompt_tokens


def test_qwen_vl_streams_an_image_answer_and_answers_a_video(qwen_app: ServeApp):
    client = qwen_app.openai()
    photo = "data:image/png;base64," + base64.b64encode(png_bytes(draw_sample_image(0, size=48))).decode()
    image_chat = [
        {"type": "image_url", "image_url": {"url": photo}},
        {"type": "text", "text": "Describe it."},
    ]
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": image_chat}], max_tokens=8, temperature=0,
            stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens >= 1 and chunks[-1].usage.prompt_tokens > 10
    assert (streamed, chunks[-1].usage.prompt_tokens) == alone(qwen_app, image_chat, 8)

    video_chat = [
        {"type": "video_url", "video_url": {"url": mp4_url()}},
        {"type": "text", "text": "What happens?"},
    ]
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": video_chat}], max_tokens=6, temperature=0
    )
    # The video's spatio-temporal patches (<|video_pad|> tokens, Qwen's video processor), as in-process.
    assert (answer.choices[0].message.content, answer.usage.prompt_tokens) == alone(qwen_app, video_chat, 6)
