"""POST /v1/images/generations: validate at the edge, then one `ImageJob` to `ImageDeployment`.

Everything a client can get wrong is checked here, before any model work: the model id (configured,
or in the MLflow registry), `n`, `size`, steps, prompt length and the safety policy on the prompt.
Each failure is a 4xx `APIError` that names the field and the limit. The deployment only ever sees
jobs it can run.
"""

from __future__ import annotations

import asyncio
import base64
import random
import re
import time

from ray.serve.handle import DeploymentHandle

from raybooth.cluster import tracking
from raybooth.cluster.config import ServeConfig
from raybooth.errors import TrackingError
from raybooth.models.safety import SafetyPolicy
from raybooth.openai.errors import APIError, bad_request, limit_exceeded
from raybooth.openai.protocol import ImageData, ImageGenerationRequest, ImageGenerationResponse
from raybooth.serving.image_job import ImageJob
from raybooth.serving.upstream import call_deployment

# ASCII digits, at most 5 each: bounded before int() (a 5,000-digit side would hit Python's int-string
# limit, a server error) and far above any side limit anyway.
_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
_SHOWN_CHARS = 40  # how much of a bad value an error message echoes
SIZE_MULTIPLE = 8  # Stable Diffusion's VAE downsamples 8x: other sizes cannot be decoded
_CATALOG_TTL_S = 5.0  # registry answers are reused this long, so a burst costs one MLflow call


class ImageModelCatalog:
    """Which image model ids the server accepts: `image_models`, plus the MLflow registry if enabled."""

    def __init__(self, configured: list[str], serve_registry: bool):
        self.configured = list(configured)
        self.serve_registry = serve_registry
        self._known: dict[str, float] = {}  # model id -> when the registry last confirmed it
        self._listing: tuple[float, list[str]] = (0.0, [])

    async def check(self, model_id: str) -> None:
        if model_id in self.configured:
            return
        if self.serve_registry and not model_id.startswith((".", "/", "~", "file:")):
            if time.monotonic() - self._known.get(model_id, -1e9) < _CATALOG_TTL_S:
                return
            try:
                await asyncio.to_thread(tracking.resolve_model_ref, model_id)
            except TrackingError:
                pass
            else:
                self._known[model_id] = time.monotonic()
                return
        raise APIError(
            404,
            f"model {model_id!r} does not exist or is not served here; GET /v1/models lists the served models "
            "(registered models may be named name, name/VERSION or name@ALIAS)",
            param="model",
            code="model_not_found",
        )

    async def list(self) -> list[str]:
        names = list(self.configured)
        if self.serve_registry:
            fetched_at, cached = self._listing
            if time.monotonic() - fetched_at > _CATALOG_TTL_S:
                try:
                    cached = await asyncio.to_thread(tracking.list_registered_models)
                except TrackingError:
                    cached = []  # the registry is down: still list the configured models
                self._listing = (time.monotonic(), cached)
            names += [n for n in cached if n not in names]
        return names


def parse_size(size: str, max_side: int) -> tuple[int, int]:
    match = _SIZE.match(size.strip())
    if not match:
        shown = size if len(size) <= _SHOWN_CHARS else f"{size[:_SHOWN_CHARS]}... ({len(size)} characters)"
        raise bad_request(
            f"size {shown!r} must be WIDTHxHEIGHT with up to 5 digits each, e.g. 512x512", param="size"
        )
    width, height = int(match[1]), int(match[2])
    if max(width, height) > max_side:
        raise limit_exceeded("limits.max_image_side", size, f"{max_side}x{max_side}", "size")
    if width < SIZE_MULTIPLE or height < SIZE_MULTIPLE or width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise bad_request(
            f"size {size!r}: width and height must be multiples of {SIZE_MULTIPLE}", param="size"
        )
    return width, height


class ImageService:
    def __init__(self, handle: DeploymentHandle, cfg: ServeConfig, policy: SafetyPolicy):
        self.handle = handle
        self.cfg = cfg
        self.policy = policy
        self.catalog = ImageModelCatalog(cfg.image_models, cfg.serve_registry)

    def job_from_request(self, req: ImageGenerationRequest) -> ImageJob:
        limits, defaults = self.cfg.limits, self.cfg.image
        if req.n > limits.max_n:
            raise limit_exceeded("limits.max_n", req.n, limits.max_n, "n")
        width, height = parse_size(req.size or defaults.default_size, limits.max_image_side)
        steps = req.num_inference_steps or defaults.default_steps
        if steps > limits.max_steps:
            raise limit_exceeded("limits.max_steps", steps, limits.max_steps, "num_inference_steps")
        for field in ("prompt", "negative_prompt"):
            text = getattr(req, field) or ""
            if len(text) > limits.max_prompt_chars:
                raise limit_exceeded(
                    "limits.max_prompt_chars", f"<{len(text)} characters>", limits.max_prompt_chars, field
                )
        verdict = self.policy.check(req.prompt)
        if verdict is not None:
            raise APIError(400, verdict.explanation(), param="prompt", code="content_filter")
        return ImageJob(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt or "",
            n=req.n,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=req.guidance_scale
            if req.guidance_scale is not None
            else defaults.default_guidance_scale,
            seed=req.seed if req.seed is not None else random.randrange(2**31),
        )

    async def generate(self, req: ImageGenerationRequest, timeout_s: float) -> ImageGenerationResponse:
        job = self.job_from_request(req)
        await self.catalog.check(req.model)
        handle = self.handle.options(multiplexed_model_id=req.model)
        pngs: list[bytes] = await call_deployment(
            handle.generate.remote(job), timeout_s, what="image generation"
        )
        encoded = [base64.b64encode(png).decode() for png in pngs]
        if req.response_format == "url":
            return ImageGenerationResponse(
                data=[ImageData(url=f"data:image/png;base64,{b}") for b in encoded]
            )
        return ImageGenerationResponse(data=[ImageData(b64_json=b) for b in encoded])
