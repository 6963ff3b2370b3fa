"""`raybooth serve` starts on a 2-core laptop, refuses what cannot fit, and `/healthz` says when it is ready.

    .venv/bin/python -m pytest tests/serving/test_serve_startup.py

- `configs/serve.yaml` exactly as committed, on an embedded Ray of 2 CPUs (`raybooth serve` as a
  subprocess, as a user runs it): `/healthz` 200, then a chat answer. Before the defaults fit, Serve
  waited forever for the ingress replica and `/healthz` never answered.
- an app asking more CPUs than that Ray has: exit 2 with one line naming the keys, before Serve starts;
- on a live app whose model deployments cannot be placed, `/healthz` answers 503 with the OpenAI error
  body naming them (it answered 200 while the models were not up).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 300  # an embedded Ray plus three replicas loading tiny models on a busy 2-core box


def serve_cli(*overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "raybooth.cli",
        "serve",
        "--config",
        str(REPO / "configs/serve.yaml"),
        *overrides,
    ]


def child_env() -> dict[str, str]:
    """The session env (RAYBOOTH_HOME, built presets) without anything that points elsewhere or adds keys."""
    dropped = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAYBOOTH_API_KEYS", "RAY_ADDRESS")
    return {k: v for k, v in os.environ.items() if k not in dropped}


def wait_for_health(base: str, proc: subprocess.Popen | None, log: Path | None = None) -> list[int]:
    """Poll `/healthz` until it says 200; the statuses seen on the way."""
    seen: list[int] = []
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(
                f"raybooth serve exited with {proc.returncode}:\n{log.read_text()[-3000:] if log else ''}"
            )
        try:
            status = httpx.get(f"{base}/healthz", timeout=5).status_code
            seen.append(status)
            if status == 200:
                return seen
        except httpx.HTTPError:  # not listening yet, or the ingress replica is still starting
            pass
        time.sleep(0.5)
    pytest.fail(f"/healthz never answered 200 in {STARTUP_TIMEOUT_S}s (saw {sorted(set(seen))})")


@pytest.fixture(scope="module")
def free_port(port_picker: Callable[[], int]) -> Callable[[], int]:
    return port_picker


def test_committed_serve_yaml_comes_up_on_a_two_cpu_embedded_ray_and_answers(
    tiny_sd_path, tiny_vlm_path, free_port, tmp_path, stop_process_group
):
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            serve_cli("cluster.num_cpus=2", "cluster.num_gpus=0", f"port={port}"),
            stdout=out, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        seen = wait_for_health(base, proc, log)
        # Serve's proxy answers 404 until the controller hands it the app's route (the moment of submitting
        # it); from the app's first answer on, only 503 (starting) and then 200.
        from_app = seen[next(i for i, status in enumerate(seen) if status != 404) :]
        assert set(from_app) <= {200, 503} and from_app[-1] == 200, seen
        body = httpx.get(f"{base}/healthz", timeout=10).json()
        assert body == {"status": "ok"}
        answer = httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": "tiny-vlm", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        assert choice["message"]["role"] == "assistant" and answer.json()["usage"]["completion_tokens"] >= 1
        # The replicas may answer a moment before `serve.run` returns in the CLI, which then prints where
        # it serves: wait for that line rather than stop the server before it was written.
        deadline = time.monotonic() + 120
        while "Ctrl-C stops the server." not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        stop_process_group(proc, grace_s=60)  # SIGTERM shuts Serve and its Ray down: give it time
    assert "raybooth is serving at" in log.read_text()


def test_an_app_that_cannot_fit_exits_2_naming_the_keys_before_serve_starts(free_port):
    port = free_port()
    result = subprocess.run(
        serve_cli("cluster.num_cpus=2", "cluster.num_gpus=0", "chat.num_cpus=2", f"port={port}"),
        capture_output=True, text=True, env=child_env(), timeout=240,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert "2.6 CPUs" in message and "the cluster has 2" in message
    assert "lower chat.num_cpus, image.num_cpus, ingress.num_cpus" in message
    assert "starting Serve" not in result.stdout  # nothing was deployed


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
        serve.delete("unplaceable")


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
