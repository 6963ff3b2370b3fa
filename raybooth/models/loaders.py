"""Load a Stable Diffusion pipeline, its training components, or a VLM, from any model reference.

Presets, local folders and hub ids all end in the same `from_pretrained(path)` calls: a tiny preset
is loaded exactly as a real checkpoint is. Loading errors a user can cause (a folder missing files,
a hub id with no network) become one-line `ModelError`s; the original error is chained.

    pipe = load_sd_pipeline("tiny-sd", models_dir=Path(".raybooth/models"))   # a preset, folder or hub id
    image = pipe("a photo of sks dog", height=64, width=64, num_inference_steps=10).images[0]
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import huggingface_hub
import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from raybooth.errors import ModelError
from raybooth.models.device import as_dtype, pick_device
from raybooth.models.diffusion_family import SDFamily
from raybooth.models.diffusion_family import detect_family as detect_diffusion_family
from raybooth.models.pixtral_processor import PilPixtralProcessor
from raybooth.models.presets import KIND_NAMES, PRESETS, resolve_model
from raybooth.models.quantization import quantization_config
from raybooth.models.qwen_video_processor import PIL_VIDEO_PROCESSORS, with_pil_video
from raybooth.models.vlm_family import TEXT, Family, image_only_processor_class
from raybooth.models.vlm_family import detect_family as detect_vlm_family

if TYPE_CHECKING:  # the families import diffusers when they load: a VLM process never pays for it
    from diffusers import AutoencoderKL, DiffusionPipeline

DeviceLike = str | torch.device | None
DtypeLike = str | torch.dtype | None


@dataclass
class SDComponents:
    """What DreamBooth training needs, each part loaded on its own (the denoiser trains, the rest is frozen).
    `denoiser` is the family's UNet or transformer; SDXL, SD3 and Flux add `text_encoder_2`/`tokenizer_2`
    (SD3: `text_encoder_3`/`tokenizer_3`, its T5); `family` says how the parts fit together."""

    denoiser: torch.nn.Module
    vae: AutoencoderKL
    text_encoder: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    noise_scheduler: Any  # the training schedule (DDPM's for SD/SDXL, FlowMatch's for SD3/Flux)
    path: str  # the resolved folder or hub id, to save a fine-tuned pipeline next to its parts
    family: SDFamily = field(default_factory=SDFamily)
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: PreTrainedTokenizerBase | None = None
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3: PreTrainedTokenizerBase | None = None

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser under SD's name (kept for SD/SDXL callers)."""
        return self.denoiser

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [getattr(self, n) for n in self.family.text_encoder_names]

    @property
    def tokenizers(self) -> list[Any]:
        return [getattr(self, n) for n in self.family.tokenizer_names]


def load_sd_pipeline(
    name_or_path: str,
    device: DeviceLike = None,
    dtype: DtypeLike = None,
    variant: str | None = None,
    *,
    models_dir: Path | None = None,
) -> DiffusionPipeline:
    """The pipeline of the folder's family (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`,
    `StableDiffusion3Pipeline`, `FluxPipeline`) on
    `device` (default: cuda if there is one) in `dtype` (default fp32); `variant="fp16"` reads the
    checkpoint's `*.fp16.safetensors` files instead of the fp32 ones.
    `models_dir`: where presets are built (needed only when `name_or_path` is a preset name)."""
    path = resolve_model(name_or_path, kind="sd", models_dir=models_dir)
    with _explain_load_errors(name_or_path, path, "sd") as options:
        family = detect_diffusion_family(path, options)
        if variant:
            options = {**options, "variant": variant}
        pipeline = family.pipeline_class().from_pretrained(
            path, **options, **_dtype_option(dtype), **family.pipeline_load_kwargs()
        )
    pipeline.set_progress_bar_config(disable=True)  # jobs and servers report progress their own way
    return pipeline.to(_device(device))


def sd_family(name_or_path: str, *, models_dir: Path | None = None) -> SDFamily:
    """The family of a diffusion pipeline (preset, folder or hub id), its folder checked for every
    component that family needs: the preflight a job runs before it starts Ray. ModelError otherwise."""
    path = resolve_model(name_or_path, kind="sd", models_dir=models_dir)
    with _explain_load_errors(name_or_path, path, "sd") as options:
        return detect_diffusion_family(path, options)


def load_sd_components(
    name_or_path: str, device: DeviceLike = None, dtype: DtypeLike = None, *, models_dir: Path | None = None
) -> SDComponents:
    """The family's denoiser (UNet or transformer), VAE, text encoder(s), tokenizer(s) and training noise
    scheduler, from the pipeline's subfolders."""
    path = resolve_model(name_or_path, kind="sd", models_dir=models_dir)
    target = _device(device)
    with _explain_load_errors(name_or_path, path, "sd") as options:
        family = detect_diffusion_family(path, options)
        parts = family.load_components(path, {**options, **_dtype_option(dtype)}, options)
    components = SDComponents(**parts, path=path, family=family)
    for module in (components.denoiser, components.vae, *components.text_encoders):
        module.to(target)
    return components


def load_vlm(
    name_or_path: str,
    device: DeviceLike = None,
    dtype: DtypeLike = None,
    *,
    models_dir: Path | None = None,
    quantization: str | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin | PreTrainedTokenizerBase]:
    """`(model, processor)` in eval mode: a vision-language model with its processor, or a text-only LLM
    (`AutoModelForCausalLM`) with its tokenizer as the processor. A family the engine cannot run is
    refused from its config, before any weights load (`FamilyError`, naming the supported families).
    `quantization="int8"`: linear weights quantised as they load (`quantization.py`)."""
    path = resolve_model(name_or_path, kind="vlm", models_dir=models_dir)
    target = _device(device)
    quantized = quantization_config(quantization, target)  # refused here, before anything loads
    with _explain_load_errors(name_or_path, path, "vlm") as options:
        family = detect_vlm_family(AutoConfig.from_pretrained(path, **options))
        processor = _load_processor(path, family, options)
        auto_model = AutoModelForCausalLM if family is TEXT else AutoModelForImageTextToText
        model = auto_model.from_pretrained(path, **options, **_dtype_option(dtype), **quantized)
    return model.to(target).eval(), processor


def load_vlm_processor(
    name_or_path: str, *, models_dir: Path | None = None
) -> ProcessorMixin | PreTrainedTokenizerBase:
    """The processor alone (no weights), for CPU workers that prepare rows: the same one `load_vlm` gives."""
    path = resolve_model(name_or_path, kind="vlm", models_dir=models_dir)
    with _explain_load_errors(name_or_path, path, "vlm") as options:
        return _load_processor(path, detect_vlm_family(AutoConfig.from_pretrained(path, **options)), options)


def _load_processor(path: str, family: Family, options: dict[str, Any]) -> Any:
    if family is TEXT:
        return AutoTokenizer.from_pretrained(path, **options)
    try:
        return AutoProcessor.from_pretrained(path, **options)
    except (ImportError, OSError) as e:
        # Processors that also handle video (Qwen-VL, ...) load a video processor, which needs torchvision
        # (or, in a folder saved without one, is missing), and transformers' Pixtral processor cannot be
        # imported without it. Build the processor from its image processor (the PIL one without
        # torchvision) and tokenizer, with a PIL video processor where raybooth has one (Qwen-VL), else
        # without video (a video then reaches the model as its frames).
        try:
            return _image_only_processor(path, options)
        except Exception:
            raise e from None


# Processors whose transformers class cannot load without torchvision even for images, and the class that
# does the same on the PIL image processor.
PIL_PROCESSORS: dict[str, type[ProcessorMixin]] = {"PixtralProcessor": PilPixtralProcessor}
# What the PIL video processor reads from a checkpoint's video (or, failing that, image) processor config.
VIDEO_SETTINGS = (
    "size",
    "patch_size",
    "merge_size",
    "temporal_patch_size",
    "image_mean",
    "image_std",
    "rescale_factor",
    "cap_pixels_per_frame",
    "max_video_tokens",
)


def _image_only_processor(path: str, options: dict[str, Any]) -> ProcessorMixin:
    import json

    import transformers
    from huggingface_hub import hf_hub_download

    config_file = Path(path) / "processor_config.json"
    if not config_file.is_file():
        config_file = Path(hf_hub_download(path, "processor_config.json", **options))
    saved = json.loads(config_file.read_text(encoding="utf-8"))
    name = saved["processor_class"]
    tokenizer = AutoTokenizer.from_pretrained(path, **options)
    image_processor = AutoImageProcessor.from_pretrained(path, **options)
    parts: dict[str, Any] = {}
    if name in PIL_PROCESSORS:
        cls = PIL_PROCESSORS[name]
    elif name in PIL_VIDEO_PROCESSORS:
        cls = with_pil_video(getattr(transformers, name))
        video = _video_settings(path, saved, image_processor, options)
        parts["video_processor"] = PIL_VIDEO_PROCESSORS[name](**video)
    else:
        cls = image_only_processor_class(getattr(transformers, name))
    # The processor's own settings (SmolVLM's image_seq_len: image tokens per tile) travel with it; the
    # sub-processors' configs (dicts) are loaded above.
    settings = {
        k: v for k, v in saved.items() if k not in ("processor_class", "auto_map") and not isinstance(v, dict)
    }
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        **parts,
        **settings,
    )


def _video_settings(
    path: str, saved: dict[str, Any], image_processor: Any, options: dict[str, Any]
) -> dict[str, Any]:
    """A checkpoint's video processor settings: `processor_config.json`'s `video_processor` entry, else
    `video_preprocessor_config.json`, else (as transformers falls back) its image processor's."""
    import json

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    config = saved.get("video_processor")
    if not isinstance(config, dict):
        file = Path(path) / "video_preprocessor_config.json"
        if not file.is_file() and not Path(path).is_dir():
            try:
                file = Path(hf_hub_download(path, file.name, **options))
            except EntryNotFoundError:
                pass
        config = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else image_processor.to_dict()
    config = dict(config)
    size = dict(config.get("size") or {})
    for old, new in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if config.get(old) is not None:  # the older spelling of the pixel bounds
            size[new] = config[old]
    if size:
        config["size"] = size
    return {k: config[k] for k in VIDEO_SETTINGS if config.get(k) is not None}


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connect to the Hub: False in offline mode or without a route (DNS, firewall)."""
    if huggingface_hub.is_offline_mode():
        return False
    host = urlparse(huggingface_hub.constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _explain_load_errors(name_or_path: str, path: str, kind: str) -> Iterator[dict[str, Any]]:
    """Yield the from_pretrained options for `path`; turn the errors a user can cause into ModelError."""
    is_local = Path(path).is_dir()
    # Offline, the hub clients retry each file for minutes before giving up; local_files_only makes a
    # cached model load at once and a missing one fail at once.
    offline = not is_local and not hub_reachable()
    try:
        yield {"local_files_only": True} if offline else {}
    except (OSError, ValueError) as e:  # what from_pretrained raises for missing files and bad repos
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if is_local:
            raise ModelError(f"cannot load the {KIND_NAMES[kind]} in {path}: {reason}") from e
        presets = ", ".join(p.name for p in PRESETS.values() if p.kind == kind)
        if offline:
            raise ModelError(
                f"cannot load {name_or_path!r}: it is not a preset or a local folder, the Hugging Face Hub "
                "cannot be reached from here and it is not in the local hub cache; download it where there "
                f"is network (hf download {name_or_path} --local-dir DIR) and pass DIR, or use {presets}"
            ) from e
        raise ModelError(f"cannot load {name_or_path!r} from the Hugging Face Hub: {reason}") from e


def _dtype_option(dtype: DtypeLike) -> dict[str, torch.dtype]:
    # Only passed when set: transformers 5 treats a missing dtype as "the checkpoint's own dtype".
    resolved = as_dtype(dtype)
    return {} if resolved is None else {"dtype": resolved}


def _device(device: DeviceLike) -> torch.device:
    if isinstance(device, torch.device):
        return device
    return pick_device(device or "auto")
