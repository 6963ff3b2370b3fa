"""Personalised text-to-image models for one replica: where a model id points, loading, LoRA sharing.

A model id is what a client sends as `model`: a registered name (`dog`, `dog/3`, `dog@prod`), a path,
or a preset listed in `image_models`. Registry ids without a version float: `ImageDeployment` re-resolves
them every `registry_poll_s` and swaps in the new version when an alias moves. Two kinds of artifact:

- a full fine-tune (a diffusers folder with `model_index.json`): its own pipeline, LRU-evicted;
- a LoRA subject (`pytorch_lora_weights.safetensors`, loadable with `load_lora_weights`): an adapter on a
  base pipeline that every LoRA subject of that base shares; the base comes from `raybooth_lora.json`
  (`{"base_model": ...}`), peft's `adapter_config.json` (`base_model_name_or_path`) or the config.

Blocking (torch, MLflow): the deployment calls these from worker threads.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from raybooth.cluster import tracking
from raybooth.cluster.workdir import default_models_dir
from raybooth.errors import ModelError, TrackingError
from raybooth.models.device import pick_device
from raybooth.models.loaders import load_sd_pipeline
from raybooth.models.presets import resolve_model
from raybooth.models.sampling import sample_images

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_META = "raybooth_lora.json"
# The denoiser's (unet/ or transformer/) fp16 weights: present when the folder has an fp16 variant.
FP16_WEIGHTS = "*/diffusion_pytorch_model.fp16.safetensors"
_PINNED = re.compile(r"/\d+$")  # name/3: a fixed version never moves


@dataclass(frozen=True)
class Located:
    """Where a model id points right now."""

    model_id: str
    path: Path
    version: str  # "dog/3" for registry models, the path for the rest; changes when an alias moves
    floating: bool  # a registry id without a fixed version: re-resolve it from time to time


@dataclass
class SharedBase:
    """A base pipeline that LoRA subjects share; the lock serialises adapter switches and sampling."""

    pipeline: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapters: set[str] = field(default_factory=set)


@dataclass
class LoadedImageModel:
    located: Located
    pipeline: Any
    adapter: str | None = None  # LoRA adapter name on `pipeline` (a SharedBase's)
    base: SharedBase | None = None

    def sample(self, prompts: list[str], negative_prompts: list[str], **kwargs: Any) -> list[Image.Image]:
        if self.base is None:
            return sample_images(self.pipeline, prompts, negative_prompts, **kwargs)
        with self.base.lock:
            self.pipeline.set_adapters([self.adapter])
            return sample_images(self.pipeline, prompts, negative_prompts, **kwargs)


def is_registry_id(model_id: str) -> bool:
    return model_id.startswith("models:/") or not (
        model_id.startswith((".", "/", "~")) or Path(model_id).exists()
    )


class ImageModelStore:
    """Locates and loads model ids; keeps shared LoRA bases alive while any subject uses them."""

    def __init__(self, configured: list[str], lora_base_model: str, device: str | None, dtype: str):
        self.configured = set(configured)
        self.lora_base_model = lora_base_model
        self.device = device
        self.dtype = None if dtype == "auto" else dtype
        self._bases: dict[str, SharedBase] = {}
        self._bases_lock = threading.Lock()

    # ------------------------------------------------------------------ where a model id points

    def locate(self, model_id: str) -> Located:
        """Resolve `model_id` to a local folder: a path, a registry version (downloaded once), a preset."""
        path = Path(model_id).expanduser()
        if path.is_dir():
            return Located(model_id, path, str(path), floating=False)
        if is_registry_id(model_id):
            try:
                ref = tracking.resolve_model_ref(model_id)
            except TrackingError:
                if model_id not in self.configured:
                    raise
            else:
                folder = tracking.download_model(f"{ref.name}/{ref.version}")
                floating = not _PINNED.search(model_id.removeprefix("models:/"))
                return Located(model_id, folder, f"{ref.name}/{ref.version}", floating=floating)
        # A preset or hub id the operator listed in image_models.
        return Located(
            model_id, Path(resolve_model(model_id, models_dir=default_models_dir())), model_id, floating=False
        )

    # ------------------------------------------------------------------ loading

    def load(self, located: Located) -> LoadedImageModel:
        folder = model_folder(located.path)
        if (folder / "model_index.json").is_file():
            dtype, variant = self.weights_for(folder)
            pipeline = load_sd_pipeline(str(folder), device=self.device, dtype=dtype, variant=variant)
            return LoadedImageModel(located, pipeline)
        if (folder / LORA_WEIGHTS).is_file():
            return self._load_lora(located, folder)
        raise ModelError(
            f"model {located.model_id!r} ({located.path}) is neither a diffusers folder (model_index.json) nor "
            f"LoRA weights ({LORA_WEIGHTS})"
        )

    def weights_for(self, folder: Path) -> tuple[str | None, str | None]:
        """`(dtype, variant)` to load a diffusers folder with. Exported models are fp32 plus an fp16 variant
        (models/checkpoint.py): a GPU with dtype auto or float16 reads the fp16 files (half the memory and
        the read), a CPU the fp32 ones (CPUs have no fast fp16 kernels)."""
        if not any(folder.glob(FP16_WEIGHTS)):
            return self.dtype, None
        wants_fp16 = self.dtype == "float16" or (
            self.dtype is None and pick_device(self.device or "auto").type == "cuda"
        )
        return ("float16", "fp16") if wants_fp16 else (self.dtype, None)

    def _load_lora(self, located: Located, folder: Path) -> LoadedImageModel:
        base_name = lora_base_model(folder) or self.lora_base_model
        base_path = str(resolve_model(base_name, models_dir=default_models_dir()))
        with self._bases_lock:
            base = self._bases.get(base_path)
            if base is None:
                pipe = load_sd_pipeline(base_path, device=self.device, dtype=self.dtype)
                base = self._bases[base_path] = SharedBase(pipe)
        adapter = re.sub(r"[^A-Za-z0-9_]", "_", located.version)
        with base.lock:
            if adapter not in base.adapters:
                base.pipeline.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS, adapter_name=adapter)
            base.adapters.add(adapter)
        return LoadedImageModel(located, base.pipeline, adapter=adapter, base=base)

    def release(self, model: LoadedImageModel) -> None:
        """Drop a LoRA adapter (and its base once no subject uses it); full models go with their last ref."""
        base, adapter = model.base, model.adapter
        if base is None or adapter is None:
            return
        with base.lock:
            if adapter in base.adapters:
                base.pipeline.delete_adapters(adapter)
                base.adapters.discard(adapter)
            empty = not base.adapters
        if empty:
            with self._bases_lock:
                for key, value in list(self._bases.items()):
                    if value is base and not base.adapters:
                        del self._bases[key]

    def shared_bases(self) -> int:
        return len(self._bases)


def model_folder(path: Path) -> Path:
    """The folder holding the model: `path` itself or its single subfolder (an artifact dir wrapping it)."""
    if (path / "model_index.json").is_file() or (path / LORA_WEIGHTS).is_file():
        return path
    children = [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []
    return children[0] if len(children) == 1 else path


def lora_base_model(folder: Path) -> str | None:
    """The base a LoRA subject was trained on, when its artifact says so."""
    for name, key in ((LORA_META, "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        meta = folder / name
        if meta.is_file():
            value = json.loads(meta.read_text()).get(key)
            if value:
                return str(value)
    return None
