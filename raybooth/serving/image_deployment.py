"""`ImageDeployment`: personalised text-to-image models behind dynamic batching and multiplexing.

    handle.options(multiplexed_model_id="dog@prod").generate.remote(ImageJob(...))  # -> list of PNG bytes

Requests for one model that arrive within `batch_wait_timeout_s` are batched by `@serve.batch` (Serve
splits a batch by multiplexed model id first); inside a batch, jobs with the same size, steps and
guidance on/off run as ONE `sample_images` call, i.e. one UNet pass per denoising step for all their
images with classifier-free guidance. Each image's noise comes from its own seed and, with
`batch_invariant` (the default), its kernels are called per row, so a request's bytes do not depend on
what it was batched with. Loaded models sit in slots (`@serve.multiplexed`, LRU); a background task
re-resolves floating registry ids (`dog`, `dog@prod`) every `registry_poll_s` and swaps the slot to the
new version: batches already running keep the old one until they finish. A UNet batch whose callers
have all gone (client disconnected, ingress timeout) stops at its next denoising step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ray import serve
from ray.serve import metrics

from raybooth.cluster import tracking
from raybooth.cluster.config import ImageServeSection, TrackingSection
from raybooth.models.sampling import SamplingStopped, guidance_on
from raybooth.samples import png_bytes
from raybooth.serving.callers import Caller, attending
from raybooth.serving.image_job import ImageJob
from raybooth.serving.image_models import ImageModelStore, LoadedImageModel

logger = logging.getLogger("ray.serve")


def group_key(job: ImageJob) -> tuple[int, int, int, bool]:
    """Jobs with equal keys can share one UNet pass per step."""
    return (job.width, job.height, job.steps, guidance_on(job.guidance_scale))


def images_in(callers: list[Caller[ImageJob]]) -> int:
    """Batch size in images, so `max_batch_size` bounds the UNet batch rather than the request count."""
    return sum(caller.item.n for caller in callers)


class ModelSlot:
    """What `@serve.multiplexed` caches for one model id; `current` is swapped when its alias moves.

    A model that is swapped out (or evicted) while batches still run on it is released when the last of
    those batches ends, so in-flight requests finish on the version they started with.
    """

    def __init__(self, model: LoadedImageModel, on_release: Callable[[LoadedImageModel], None]):
        self.current = model
        self.evicted = False
        self._users: Counter[int] = Counter()  # id(model) -> batches running on it
        self._retired: dict[int, LoadedImageModel] = {}  # swapped out, still in use
        self._lock = threading.Lock()
        self._on_release = on_release

    @contextmanager
    def use(self) -> Iterator[LoadedImageModel]:
        with self._lock:
            model = self.current
            self._users[id(model)] += 1
        try:
            yield model
        finally:
            with self._lock:
                self._users[id(model)] -= 1
                idle = self._users[id(model)] == 0 and self._retired.pop(id(model), None) is not None
            if idle:
                self._on_release(model)

    def swap(self, model: LoadedImageModel) -> None:
        with self._lock:
            old, self.current = self.current, model
        self._retire(old)

    def evict(self) -> None:
        if not self.evicted:
            self.evicted = True
            self._retire(self.current)

    def _retire(self, model: LoadedImageModel) -> None:
        with self._lock:
            busy = self._users[id(model)] > 0
            if busy:
                self._retired[id(model)] = model
        if not busy:
            self._on_release(model)

    def __del__(self) -> None:
        # Serve's multiplexer calls __del__ when it evicts the slot (LRU); the GC may call it again later.
        try:
            self.evict()
        except Exception:  # interpreter shutdown: nothing left to release into
            pass


# Resources, replicas and queue limits come from the serve config, set once in serving/app.py's
# deployment_options (and a Serve config file may override them); nothing here repeats them.
@serve.deployment(name="ImageDeployment", health_check_period_s=10)
class ImageDeployment:
    def __init__(self, image: dict[str, Any], tracking_section: dict[str, Any], image_models: list[str]):
        self.cfg = ImageServeSection.model_validate(image)
        tracking.configure(TrackingSection.model_validate(tracking_section))
        self.store = ImageModelStore(image_models, self.cfg.lora_base_model, self.cfg.device, self.cfg.dtype)
        self.slots: dict[str, ModelSlot] = {}
        # Batching and multiplexing are wired per instance so their sizes come from the config.
        self.generate_batch = serve.batch(
            max_batch_size=self.cfg.max_batch_size,
            batch_wait_timeout_s=self.cfg.batch_wait_timeout_s,
            max_concurrent_batches=self.cfg.max_concurrent_batches,
            batch_size_fn=images_in,
        )(self._generate_batch)

        async def load_slot(model_id: str) -> ModelSlot:
            return await self._load_slot(model_id)

        self.get_model = serve.multiplexed(max_num_models_per_replica=self.cfg.max_models_per_replica)(
            load_slot
        )
        self._poll_task: asyncio.Task | None = None
        self._refresh_now = asyncio.Event()
        # Observability: what the batcher actually did (also exported as Ray Serve metrics).
        self.unet_batches: deque[int] = deque(
            maxlen=10_000
        )  # images per sample_images call (= per UNet pass)
        self.requests_per_batch: deque[int] = deque(maxlen=10_000)
        self.swaps: deque[tuple[str, str, str]] = deque(maxlen=1_000)
        self.running: list[tuple[str, str]] = []  # (model id, version) of each batch sampling right now
        self.abandoned: deque[tuple[int, int]] = deque(maxlen=1_000)  # (steps done, steps): callers all left
        self._batch_images = metrics.Histogram(
            "raybooth_image_batch_images",
            description="Images per UNet batch (one sample_images call).",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
            tag_keys=("model",),
        )
        self._images_total = metrics.Counter("raybooth_images_generated", description="Images generated.")

    # ------------------------------------------------------------------ request path

    async def generate(self, job: ImageJob) -> list[bytes]:
        """PNG bytes for one job; the job waits a moment in `generate_batch` for company."""
        self._ensure_poller()
        # A client that disconnects (or an ingress timeout) cancels this call; a UNet batch whose callers
        # have all gone stops at its next step instead of finishing images for nobody.
        with attending(job) as caller:
            return await self.generate_batch(caller)

    async def _generate_batch(self, callers: list[Caller[ImageJob]]) -> list[list[bytes]]:
        model_id = serve.get_multiplexed_model_id()  # Serve splits batches by model id
        slot: ModelSlot = await self.get_model(model_id)
        results: list[list[bytes]] = [[] for _ in callers]  # stays empty for a caller that left
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, caller in enumerate(callers):
            groups[group_key(caller.item)].append(i)
        self.requests_per_batch.append(len(callers))
        with slot.use() as model:
            running = (model_id, model.located.version)
            self.running.append(running)
            try:
                for (width, height, steps, _), members in groups.items():
                    try:
                        images = await asyncio.to_thread(
                            self._sample_group, model, [callers[i] for i in members], width, height, steps
                        )
                    except SamplingStopped as stopped:
                        self.abandoned.append((stopped.steps_done, stopped.steps))
                        continue
                    for i in members:
                        n = callers[i].item.n
                        results[i], images = images[:n], images[n:]
            finally:
                self.running.remove(running)
        return results

    def _sample_group(
        self, model: LoadedImageModel, callers: list[Caller[ImageJob]], width: int, height: int, steps: int
    ) -> list[bytes]:
        jobs = [caller.item for caller in callers]
        prompts, negatives, scales, seeds = [], [], [], []
        for job in jobs:
            for k in range(job.n):
                prompts.append(job.prompt)
                negatives.append(job.negative_prompt)
                scales.append(job.guidance_scale)
                seeds.append(job.seed + k)
        images = model.sample(
            prompts,
            negatives,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=scales,
            seeds=seeds,
            batch_invariant=self.cfg.batch_invariant,
            should_stop=lambda: all(caller.gone for caller in callers),
        )
        self.unet_batches.append(len(prompts))
        self._batch_images.observe(len(prompts), tags={"model": model.located.model_id})
        self._images_total.inc(len(prompts))
        return [png_bytes(im) for im in images]

    # ------------------------------------------------------------------ models

    async def _load_slot(self, model_id: str) -> ModelSlot:
        located = await asyncio.to_thread(self.store.locate, model_id)
        model = await asyncio.to_thread(self.store.load, located)
        slot = ModelSlot(model, on_release=self._release)
        self.slots[model_id] = slot
        return slot

    def _release(self, model: LoadedImageModel) -> None:
        slot = self.slots.get(model.located.model_id)
        if slot is not None and slot.evicted:
            self.slots.pop(model.located.model_id, None)
        self.store.release(model)

    def _ensure_poller(self) -> None:
        if self._poll_task is None or self._poll_task.done():
            self._poll_task = asyncio.get_running_loop().create_task(self._poll_registry())

    async def _poll_registry(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._refresh_now.wait(), timeout=self.cfg.registry_poll_s)
            except TimeoutError:
                pass
            self._refresh_now.clear()
            await self.refresh_models()

    async def refresh_models(self) -> dict[str, str]:
        """Re-resolve every floating model id; swap slots whose version moved. Returns id -> version."""
        for model_id, slot in list(self.slots.items()):
            if slot.evicted or not slot.current.located.floating:
                continue
            try:
                located = await asyncio.to_thread(self.store.locate, model_id)
                if located.version == slot.current.located.version:
                    continue
                model = await asyncio.to_thread(self.store.load, located)
            except Exception as e:  # keep serving the old version; the registry may be back next poll
                logger.warning(
                    "refreshing image model %s failed, keeping %s: %s",
                    model_id,
                    slot.current.located.version,
                    e,
                )
                continue
            old = slot.current.located.version
            slot.swap(model)
            self.swaps.append((model_id, old, located.version))
            logger.info("image model %s: %s -> %s", model_id, old, located.version)
        return {mid: s.current.located.version for mid, s in self.slots.items() if not s.evicted}

    # ------------------------------------------------------------------ control

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """`user_config` in the Serve YAML: batching knobs, `batch_invariant` and `refresh` (any new value
        re-resolves the models now)."""
        if "max_batch_size" in user_config:
            self.generate_batch.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self.generate_batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
        if "registry_poll_s" in user_config:
            self.cfg.registry_poll_s = float(user_config["registry_poll_s"])
        if "batch_invariant" in user_config:
            self.cfg.batch_invariant = bool(user_config["batch_invariant"])
        self._refresh_now.set()

    def stats(self) -> dict[str, Any]:
        return {
            "time": time.time(),
            "pid": os.getpid(),  # the replica's process (tests kill it to check failure handling)
            "max_batch_size": self.generate_batch._get_max_batch_size(),
            "unet_batches": list(self.unet_batches),
            "requests_per_batch": list(self.requests_per_batch),
            "models": {mid: s.current.located.version for mid, s in self.slots.items() if not s.evicted},
            "shared_lora_bases": self.store.shared_bases(),
            "swaps": list(self.swaps),
            "running": list(self.running),
            "abandoned": list(self.abandoned),
        }
