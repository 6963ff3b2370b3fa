"""`/healthz` says when the app is ready: on a live app whose model deployments cannot be placed, it answers
503 with the OpenAI error body naming them (it answered 200 while the models were not up).

    .venv/bin/python -m pytest tests/serving/test_serve_startup.py

`raybooth serve` starting from `configs/serve.yaml` on a 2-core laptop, and refusing an app that cannot fit,
are tests/test_serve_command.py (their own process and Ray, so outside this folder's shared app).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

pytestmark = pytest.mark.slow
STARTUP_TIMEOUT_S = 300  # the ingress replica starting on a busy 2-core box


@pytest.fixture
def app_with_unplaceable_models(serve_app, tiny_sd_path, tiny_vlm_path) -> Iterator[str]:
    """A second app next to the session's, deployed without waiting, its chat and image deployments asking
    more CPUs than the cluster has (only the ingress comes up); its URL (the app's route prefix)."""
    from ray import serve
    from ray.serve.api import _run  # serve.run without waiting for RUNNING (it never would here)

    from raybooth.cluster.config import ServeConfig
    from raybooth.serving.app import build_app

    cfg = ServeConfig.model_validate(
        {
            "image_models": ["tiny-sd"],
            "serve_registry": False,
            "chat": {"num_cpus": 1000},  # never placed: the ingress replica comes up alone
            "image": {"num_cpus": 1000, "default_size": "64x64"},
            "ingress": {"num_cpus": 0.1},
        }
    )
    _run(build_app(cfg), _blocking=False, name="unplaceable", route_prefix="/unplaceable")
    try:
        yield f"{serve_app.base_url}/unplaceable"
    finally:
        # Not waited for: its pending replicas are stopped in the background (waiting took ~20 s).
        serve.delete("unplaceable", _blocking=False)


def test_healthz_is_503_naming_the_deployments_that_are_not_up(app_with_unplaceable_models):
    base = app_with_unplaceable_models
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    resp = None
    while time.monotonic() < deadline:  # until the ingress replica answers
        try:
            resp = httpx.get(f"{base}/healthz", timeout=5)
        except httpx.HTTPError:  # the proxy or the ingress replica is still starting
            resp = None
        if resp is not None and resp.status_code == 200:
            break
        # The ingress's own answer (not the proxy's text while the route or replica is not up yet, nor
        # its "controller did not answer" on a busy box).
        if resp is not None and "no running replica" in resp.text:
            break
        time.sleep(0.5)
    assert resp is not None and resp.status_code == 503, resp and resp.text  # never 200 without models
    body = resp.json()
    assert body["error"] == {
        "message": "not ready: no running replica of ChatDeployment, ImageDeployment yet",
        "type": body["error"]["type"],
        "param": None,
        "code": "not_ready",
    }
    assert body["error"]["type"]  # an OpenAI error type, as every other error here
