"""A 1 KB PNG of 1x400,000 px against the real Serve app: a 400 naming the limit, the chat replica's memory flat.

.venv/bin/python -m pytest tests/serving/test_thin_images.py

Unchecked, tiny-vlm's processor scales the strip's short side up to 32 before cropping: 3.9 GB in the chat
replica for 12 s. Refused from the header at the ingress (the aspect ratio) or, with that limit lifted, in
the chat replica before the processor resizes (the size after the resize), it costs the replica nothing.
"""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import psutil
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

# What the replica may grow by while it refuses the strip: a resize of it would be 3.9 GB; Python's
# allocator and the request's own bytes are a few MB.
RSS_GROWTH_BOUND = 150 * 1024 * 1024


def thin_png_url() -> str:
    buf = io.BytesIO()
    Image.new("1", (1, 400_000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 5_000
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_replica() -> psutil.Process:
    """The chat replica's process (after a redeploy, once the replaced one is gone). Read from the GCS
    actor table: the test cluster runs without the dashboard that `ray.util.state` asks."""
    from ray._private import state

    deadline = time.monotonic() + 60
    while True:
        alive = [
            a["Pid"]
            for a in state.actors(actor_state_name="ALIVE").values()
            if a["ActorClassName"].endswith("ChatDeployment")
        ]
        if len(alive) == 1 or time.monotonic() > deadline:
            [pid] = alive
            return psutil.Process(pid)
        time.sleep(0.5)


class PeakRSS:
    """The highest RSS of a process while the block runs, sampled every 5 ms."""

    def __init__(self, process: psutil.Process):
        self.process, self.peak, self._stop = process, 0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.005)

    def __enter__(self) -> PeakRSS:
        self.before = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.before


def ask_with_thin_image(serve_app) -> httpx.Response:
    body = {
        "model": "tiny-vlm",
        "max_tokens": 4,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": thin_png_url()}},
                ],
            }
        ],
    }
    return httpx.post(
        f"{serve_app.base_url}/v1/chat/completions", json=body, headers=serve_app.auth, timeout=120
    )


def test_thin_png_is_a_400_naming_the_aspect_limit_and_the_replica_stays_flat(serve_app):
    replica = chat_replica()
    with PeakRSS(replica) as rss:
        resp = ask_with_thin_image(serve_app)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages[0].content[1].image_url"
    assert "1x400000 is 4e+05:1 > limit 50:1 (raise max_image_aspect_ratio" in error["message"]
    assert rss.growth < RSS_GROWTH_BOUND, f"chat replica grew {rss.growth >> 20} MiB"


def test_with_the_aspect_limit_lifted_the_replica_refuses_before_resizing(serve_app):
    """The serve YAML's `limits.max_image_resized_pixels` travels with the request to the chat replica,
    which checks it against its processor's resize rule before the processor runs."""
    settings = {
        **serve_app.settings,
        "limits": {**serve_app.settings["limits"], "max_image_aspect_ratio": 1e9},
    }
    with serve_app.redeployed(settings):
        with PeakRSS(chat_replica()) as rss:
            resp = ask_with_thin_image(serve_app)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["message"].endswith(
            "image 0: image 1x400000 would be resized by the model's processor to 32x12800000 = 409600000 "
            "pixels > limit 16777216 (raise max_image_resized_pixels to allow it)"
        )
        assert rss.growth < RSS_GROWTH_BOUND, f"chat replica grew {rss.growth >> 20} MiB"
        good = serve_app.openai().chat.completions.create(
            model="tiny-vlm", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )
        assert good.choices[0].finish_reason in ("stop", "length")
