"""Fixtures for the serving tests: personalised models in the MLflow registry, and the real Serve app.

    .venv/bin/python -m pytest tests/serving

`subjects` registers what the DreamBooth job would: `sks-dog` (a full fine-tune; version 2 has perturbed
UNet weights, alias `prod` -> version 1) and two LoRA subjects in diffusers' LoRA format on tiny-sd.
`serve_app` is `raybooth.serving.app` on the session's embedded Ray, HTTP on 127.0.0.1, API keys on: one
app for the whole session (`SharedServe`); a module that needs other settings redeploys it for its tests
with `serve_app.redeployed(...)`. The shared settings come back lazily, before the next test that wants
them, so variants that follow each other (tests/conftest.py runs the variant modules last) cost one deploy
each and the last one none.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

API_KEY = "test-key-1"


@dataclass(frozen=True)
class Subjects:
    dog: str  # full fine-tune: version 1 (= tiny-sd weights) and 2 (perturbed UNet); alias prod -> 1
    cat: str  # LoRA subject on tiny-sd
    toy: str  # another LoRA subject on tiny-sd (shares the base with cat)


def _perturbed_copy(src: Path, dest: Path, seed: int) -> Path:
    """A copy of an SD folder whose UNet weights moved a little: a stand-in for a second fine-tune."""
    from diffusers import UNet2DConditionModel

    shutil.copytree(src, dest)
    unet = UNet2DConditionModel.from_pretrained(dest / "unet")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    unet.save_pretrained(dest / "unet")
    return dest


def _lora_folder(base: Path, dest: Path, seed: int) -> Path:
    """A LoRA on the tiny UNet saved in diffusers' format (loadable with `load_lora_weights`)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed)
    for name, p in unet.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (a no-op adapter); training would have moved it
            p.data = torch.randn(p.shape, generator=generator) * 0.5
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    dest.mkdir(parents=True)
    StableDiffusionPipeline.save_lora_weights(
        save_directory=dest, unet_lora_layers=layers, safe_serialization=True
    )
    (dest / "raybooth_lora.json").write_text(json.dumps({"base_model": "tiny-sd"}))
    return dest


def _register(folder: Path, name: str, alias: str | None = None) -> int:
    from raybooth.cluster import tracking

    with tracking.start_run("serve-tests", run_name=name) as run:
        tracking.log_artifacts(folder, "model")
    return tracking.register_model(run.info.run_id, "model", name, alias=alias)


@pytest.fixture(scope="session")
def subjects(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Subjects:
    from raybooth.cluster import tracking
    from raybooth.cluster.config import TrackingSection

    tracking.configure(TrackingSection())  # the session's sqlite store, which the replicas open too
    tmp = tmp_path_factory.mktemp("subjects")
    assert _register(tiny_sd_path, "sks-dog", alias="prod") == 1
    assert _register(_perturbed_copy(tiny_sd_path, tmp / "dog-v2", seed=1), "sks-dog") == 2
    _register(_lora_folder(tiny_sd_path, tmp / "cat-lora", seed=2), "sks-cat")
    _register(_lora_folder(tiny_sd_path, tmp / "toy-lora", seed=3), "sks-toy")
    return Subjects(dog="sks-dog", cat="sks-cat", toy="sks-toy")


def app_settings(leak_pattern: str) -> dict[str, Any]:
    """Small queues and short waits so batching, backpressure and alias polling show in seconds."""
    return {
        "chat_model": "tiny-vlm",
        "image_models": ["tiny-sd"],
        "serve_registry": True,
        "ingress": {"num_cpus": 0.1, "request_timeout_s": 120},
        "image": {
            "num_cpus": 0.1,
            "max_batch_size": 8,
            "batch_wait_timeout_s": 1.0,  # long enough for 8 requests through the ingress on 2 busy cores
            # Room for the 8-request batching burst even while the router's view of the replica lags
            # (a busy CI box), yet a 40-request burst still overflows 16 ongoing + 8 queued into 503s.
            "max_ongoing_requests": 16,
            "max_queued_requests": 8,
            "registry_poll_s": 1,
            "max_models_per_replica": 4,
            "default_size": "64x64",
            "default_steps": 2,
        },
        "chat": {
            "num_cpus": 0.1,
            "max_batch_size": 4,
            "max_concurrent_batches": 2,
            "batch_wait_timeout_s": 0.5,
            "max_ongoing_requests": 8,
            "max_queued_requests": 16,
            "default_max_tokens": 8,
        },
        "limits": {
            "max_n": 4,
            "max_tokens": 900,  # room for a long stream that a test cancels part-way
            "max_steps": 100,  # a request slow enough to still run while an alias moves
            "max_image_side": 128,
            "max_body_bytes": 1_000_000,
        },
        "safety": {
            "categories": [
                {"name": "violence", "phrases": ["kill", "build a bomb"]},
                {"name": "secret-leak", "patterns": [leak_pattern], "applies_to": ["output"]},
            ]
        },
    }


LEAK_PROMPT = "Describe the image in one sentence."


@pytest.fixture(scope="session")
def greedy_answer(tiny_vlm_path: Path) -> str:
    """What tiny-vlm answers LEAK_PROMPT greedily: the output-safety test blocks a piece of it."""
    from raybooth.models.decoding import SamplingParams
    from raybooth.models.vlm_engine import GenerationRequest, VLMEngine

    engine = VLMEngine.from_pretrained(str(tiny_vlm_path), device="cpu")
    request = GenerationRequest(
        [{"role": "user", "content": LEAK_PROMPT}], SamplingParams(max_tokens=16, temperature=0)
    )
    [result] = engine.generate([request])
    assert len(result.text) >= 12, result.text
    return result.text


@pytest.fixture(scope="session")
def leak_pattern(greedy_answer: str) -> str:
    import re

    return re.escape(greedy_answer[2:12])


@dataclass
class ServeApp:
    base_url: str  # http://127.0.0.1:PORT
    settings: dict[str, Any]
    shared: SharedServe | None = None  # who deploys variants of it
    api_key: str = API_KEY
    leak_prompt: str = LEAK_PROMPT  # whose greedy answer the output safety category blocks

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    @staticmethod
    def log_errors() -> list[str]:
        return serve_log_errors()

    @staticmethod
    def log_lines(fragment: str) -> list[str]:
        return serve_log_lines(fragment)

    def openai(self, api_key: str = API_KEY, **kwargs: Any):
        import openai

        return openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=120, **kwargs
        )

    def async_openai(self, api_key: str = API_KEY):
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def stats(self) -> dict[str, Any]:
        resp = httpx.get(f"{self.base_url}/v1/internal/stats", headers={"Authorization": f"Bearer {API_KEY}"})
        resp.raise_for_status()
        return resp.json()

    @contextmanager
    def redeployed(self, settings: dict[str, Any], api_keys: bool = True) -> Iterator[None]:
        """Run the app with other settings (or without API keys) for the block: Serve restarts only the
        deployments whose arguments changed. The shared settings come back before the next test that
        wants them (`_shared_settings_back`), not on leaving, so a variant that follows costs one deploy."""
        assert self.shared is not None, "redeployed needs the session's SharedServe"
        with self.shared.variant(settings, api_keys):
            yield


def deploy_app(settings: dict[str, Any], api_keys: bool = True) -> None:
    from ray import serve

    from raybooth.serving.app import build_app

    with pytest.MonkeyPatch.context() as mp:
        if api_keys:
            mp.setenv("RAYBOOTH_API_KEYS", f"{API_KEY}, test-key-2")
        else:
            mp.delenv("RAYBOOTH_API_KEYS", raising=False)
        application = build_app({"settings": settings})
    serve.run(application, name="raybooth", route_prefix="/")


def serve_log_lines(fragment: str) -> list[str]:
    """Lines holding `fragment` in this Ray session's Serve logs (replicas, proxy, controller)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return [
        line
        for f in sorted(logs.glob("*.log"))
        for line in f.read_text(errors="replace").splitlines()
        if fragment in line
    ]


def serve_log_errors() -> list[str]:
    """Lines logged at ERROR or CRITICAL (Serve's text format starts each line with the level)."""
    return [line for line in serve_log_lines("") if line.startswith(("ERROR", "CRITICAL"))]


@contextmanager
def running_app(settings: dict[str, Any], port: int) -> Iterator[ServeApp]:
    """A fresh Serve instance on `port` with the app deployed from `settings`; shut down on exit."""
    from ray import serve

    serve.shutdown()  # a Serve instance of an earlier module would keep its own HTTP port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    started = time.monotonic()
    deploy_app(settings)
    print(f"serve app up in {time.monotonic() - started:.1f}s")
    try:
        yield ServeApp(f"http://127.0.0.1:{port}", settings)
    finally:
        serve.shutdown()


class SharedServe:
    """The one Serve instance (and app) the serving modules share for the whole session: started on first
    use, and started again only if something took it down (a module that shut Ray down to run its own
    cluster, or replicas that did not come back). Modules that need other settings use
    `ServeApp.redeployed`, which puts these back."""

    def __init__(self, settings: dict[str, Any], port_picker: Callable[[], int]):
        self.settings, self._port_picker = settings, port_picker
        self._app: ServeApp | None = None
        self._stack = ExitStack()
        self._deployed: tuple[dict[str, Any], bool] | None = None  # settings and api_keys now running
        self._in_variant = False

    def app(self) -> ServeApp:
        if self._app is None or not self._answers(self._app):
            self.close()
            self._app = self._stack.enter_context(running_app(self.settings, self._port_picker()))
            self._app.shared = self
            self._deployed = (self.settings, True)
        return self._app

    def _deploy(self, settings: dict[str, Any], api_keys: bool) -> None:
        if self._deployed != (settings, api_keys):
            deploy_app(settings, api_keys)
            self._deployed = (settings, api_keys)

    @contextmanager
    def variant(self, settings: dict[str, Any], api_keys: bool) -> Iterator[None]:
        assert not self._in_variant, "one variant at a time"
        self._deploy(settings, api_keys)
        self._in_variant = True
        try:
            yield
        finally:
            self._in_variant = False

    def shared_settings_back(self) -> None:
        """Deploy the shared settings again if a variant left others running (no-op inside a variant)."""
        if self._app is not None and not self._in_variant:
            self._deploy(self.settings, True)

    @staticmethod
    def _answers(app: ServeApp, timeout_s: float = 60) -> bool:
        """Whether the running app says ready within `timeout_s` (replicas a module killed restart)."""
        import ray

        if not ray.is_initialized():
            return False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{app.base_url}/healthz", timeout=10).status_code == 200:
                    return True
            except httpx.ConnectError:
                return False  # nothing listens: that Serve instance is gone
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return False

    def close(self) -> None:
        self._stack.close()
        self._stack, self._app = ExitStack(), None


@pytest.fixture(scope="session")
def shared_serve(
    ray_cluster,
    subjects: Subjects,
    tiny_sd_path: Path,
    tiny_vlm_path: Path,
    leak_pattern: str,
    port_picker: Callable[[], int],
) -> Iterator[SharedServe]:
    shared = SharedServe(app_settings(leak_pattern), port_picker)
    try:
        yield shared
    finally:
        shared.close()


@pytest.fixture(scope="module")
def serve_app(shared_serve: SharedServe) -> ServeApp:
    """The session's app (see `SharedServe`), checked ready for this module."""
    return shared_serve.app()


@pytest.fixture(autouse=True)
def _shared_settings_back(request: pytest.FixtureRequest) -> None:
    """A test on the shared app gets the shared settings, whatever variant ran before it. Module-scoped
    variant fixtures are set up before this one, so their tests keep the variant; a test marked
    `own_settings` redeploys its own variant first thing, so a variant before it is not undone for it."""
    if "serve_app" in request.fixturenames and request.node.get_closest_marker("own_settings") is None:
        request.getfixturevalue("shared_serve").shared_settings_back()
