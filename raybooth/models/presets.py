"""Model presets, and how a model name becomes a folder that `from_pretrained` can load.

A preset is a model built here from configs with a fixed seed (no download), saved in the standard
diffusers/transformers folder format under the work dir (`raybooth build-models` or first use):

    tiny-sd     Stable Diffusion shaped, tiny: CPU tests, the demo, DreamBooth on a laptop
    tiny-sdxl   SDXL shaped, tiny: SDXL DreamBooth, sampling and serving on a CPU
    tiny-vlm    LLaVA shaped, tiny: captioning, batch chat requests and the chat route on a CPU
    tiny-qwen2.5-vl  Qwen2.5-VL shaped, tiny: M-RoPE and per-image patch grids on a CPU
    tiny-llm    a text-only Llama chat model, tiny: the chat route and batch requests without images
    tiny-sd3    SD3 shaped, tiny: flow-matching LoRA DreamBooth, sampling and serving on a CPU
    tiny-flux   Flux.1-dev shaped, tiny: the same for Flux (guidance embedding, packed latents)
    tiny-smolvlm     SmolVLM (Idefics3) shaped, tiny: per-request image tile counts on a CPU
    tiny-llava-next  LLaVA-NeXT shaped, tiny: per-image crop counts (AnyRes) on a CPU
    tiny-mllama      Mllama (Llama 3.2 Vision) shaped, tiny: cross-attention to each row's images on a CPU
    tiny-florence2   Florence-2 shaped, tiny: an encoder-decoder with task prompts (`<CAPTION>`) on a CPU
    tiny-qwen3-vl    Qwen3-VL shaped, tiny: deepstack vision features, interleaved M-RoPE on a CPU
    tiny-idefics2    Idefics2 shaped, tiny: perceiver-resampled images of their own size on a CPU
    tiny-llava-onevision  LLaVA-OneVision shaped, tiny: AnyRes for one image, base images for several
    tiny-paligemma   PaliGemma shaped, tiny: a prefix prompt + one image, bidirectional prefix, on a CPU
    tiny-mistral3    Mistral3 (Pixtral) shaped, tiny: images at their own aspect ratio, token grids, on a CPU
    sd15-arch   SD 1.5's real architecture with random weights: GPU benchmarks only (~4 GB)
    sdxl-arch   SDXL base's real architecture with random weights: GPU benchmarks only (~14 GB)
    flux-arch   FLUX.1-dev's real architecture with random bf16 weights: GPU benchmarks only (~34 GB)

`resolve_model` maps a preset name to its built folder, a local folder to itself, and `org/name` to a
hub id; from there the loaders treat all three the same way. Where presets live is the caller's to say
(`models_dir`; the jobs pass `raybooth.cluster.workdir.default_models_dir()`): models/ reads no work dir.

    folder = resolve_model("tiny-sd", kind="sd", models_dir=Path(".raybooth/models"))
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from raybooth.errors import ModelError

ModelKind = Literal["sd", "vlm"]

MARKER_FILE = "raybooth_preset.json"  # written last: a folder without it is not a finished build
FORMAT_VERSION = 4  # bump when a preset's configs change, so folders built by older code are rebuilt

# The file every folder of a kind has at its root; checked before loading to fail with a clear message.
KIND_ROOT_FILES: dict[str, str] = {"sd": "model_index.json", "vlm": "config.json"}
KIND_NAMES: dict[str, str] = {"sd": "Stable Diffusion pipeline", "vlm": "vision-language model"}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as the Hugging Face Hub spells them


@dataclass(frozen=True)
class Preset:
    name: str
    kind: ModelKind
    description: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny-sd", "sd", "Stable Diffusion shaped, ~1M random weights; samples 64x64 on a CPU"),
        Preset("tiny-vlm", "vlm", "LLaVA shaped (CLIP vision + Llama), ~0.2M random weights; CPU chat"),
        Preset("sd15-arch", "sd", "SD 1.5 architecture (860M UNet) with random weights; GPU benchmarks"),
        Preset("tiny-sdxl", "sd", "SDXL shaped (two CLIP encoders, micro-conditioned UNet); 64x64 on a CPU"),
        Preset("tiny-qwen2.5-vl", "vlm", "Qwen2.5-VL shaped (windowed ViT + M-RoPE decoder), random; CPU"),
        Preset("tiny-llm", "vlm", "text-only Llama chat model (ChatML), random weights; CPU chat"),
        Preset(
            "tiny-sd3", "sd", "SD3 shaped (two CLIPs + T5, MMDiT transformer, flow matching); 64x64 on a CPU"
        ),
        Preset(
            "tiny-flux", "sd", "Flux.1-dev shaped (CLIP + T5, guidance-distilled transformer); 64x64 on a CPU"
        ),
        Preset("tiny-smolvlm", "vlm", "SmolVLM shaped (Idefics3: image tiles, pixel shuffle), random; CPU"),
        Preset("tiny-llava-next", "vlm", "LLaVA-NeXT shaped (AnyRes crops, image_sizes), random; CPU"),
        Preset("tiny-mllama", "vlm", "Mllama shaped (tiled vision, cross-attention decoder), random; CPU"),
        Preset(
            "tiny-florence2", "vlm", "Florence-2 shaped (DaViT + BART encoder-decoder, task prompts); CPU"
        ),
        Preset("tiny-qwen3-vl", "vlm", "Qwen3-VL shaped (deepstack ViT, interleaved M-RoPE), random; CPU"),
        Preset("tiny-idefics2", "vlm", "Idefics2 shaped (SigLIP + perceiver resampler), random; CPU"),
        Preset("tiny-llava-onevision", "vlm", "LLaVA-OneVision shaped (SigLIP, AnyRes, Qwen2), random; CPU"),
        Preset("tiny-paligemma", "vlm", "PaliGemma shaped (SigLIP + Gemma, prefix prompts), random; CPU"),
        Preset("tiny-mistral3", "vlm", "Mistral3 shaped (Pixtral tower, patch merger, Mistral), random; CPU"),
        Preset("sdxl-arch", "sd", "SDXL base architecture (2.6B UNet) with random weights; GPU benchmarks"),
        Preset(
            "flux-arch",
            "sd",
            "FLUX.1-dev architecture (11.9B transformer, T5-XXL), random bf16; GPU benchmarks",
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None


def preset_dir(name: str, models_dir: Path) -> Path:
    """Where `resolve_model` keeps a preset: `<models_dir>/<name>`."""
    return Path(models_dir) / get_preset(name).name


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The build record of a finished preset folder, or None if `folder` is not one."""
    try:
        return json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_current_build(folder: Path, name: str, seed: int | None = None) -> bool:
    marker = read_marker(folder)
    if marker is None or marker.get("preset") != name or marker.get("format") != FORMAT_VERSION:
        return False
    return seed is None or marker.get("seed") == seed


def build_preset(name: str, dest: Path, seed: int = 0) -> Path:
    """Build preset `name` into `dest` (`preset_dir(name, models_dir)` for the one `resolve_model` finds)
    and return the folder.

    It is built in a hidden sibling folder and renamed into place, so `dest` either does not exist or
    is complete: a crash mid-build leaves nothing that looks done. Building again with the same seed
    is a no-op; another seed replaces the old build. Same seed → byte-identical weight files.
    """
    preset = get_preset(name)
    dest = Path(dest).expanduser().resolve()
    if _is_current_build(dest, name, seed):
        return dest
    if dest.exists() and read_marker(dest) is None:
        raise ModelError(f"{dest} exists and is not a raybooth preset build; remove it or pass another dest")

    dest.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=dest.parent))
    try:
        _write_preset(preset, building, seed)
        record = {"preset": name, "kind": preset.kind, "seed": seed, "format": FORMAT_VERSION}
        (building / MARKER_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _move_into_place(building, dest, name, seed)
    finally:
        shutil.rmtree(building, ignore_errors=True)  # gone already after a successful rename
    return dest


def _write_preset(preset: Preset, folder: Path, seed: int) -> None:
    """Write the preset's files into the empty `folder`."""
    # Imported here: diffusers and transformers take seconds to import, and `raybooth doctor` or
    # `resolve_model` on an already built preset need neither.
    import torch

    from raybooth.models import flow_presets, sd_presets, vlm_presets, vlm_presets_extra, vlm_presets_more

    writers = {
        **flow_presets.WRITERS,
        **vlm_presets.WRITERS,
        **vlm_presets_more.WRITERS,
        **vlm_presets_extra.WRITERS,
    }
    # Building reseeds torch before each component; fork_rng keeps the caller's random stream intact.
    with torch.random.fork_rng(devices=[]):
        if preset.name in writers:
            writers[preset.name](folder, seed)
        elif sd_presets.SD_ARCHITECTURES[preset.name].text_encoder_2 is not None:  # SDXL-shaped
            sd_presets.write_sdxl_folder(folder, sd_presets.SD_ARCHITECTURES[preset.name], seed)
        else:
            sd_presets.write_sd_folder(folder, sd_presets.SD_ARCHITECTURES[preset.name], seed)


def _move_into_place(building: Path, dest: Path, name: str, seed: int) -> None:
    if dest.exists():  # an older build (other seed or format): swap it out, then delete it
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dest, old)
        try:
            os.rename(building, dest)
        except OSError:
            os.rename(old, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(building, dest)  # atomic on one filesystem
    except OSError:
        # Another process (a second Ray worker on this node) finished the same build first: keep theirs.
        if not _is_current_build(dest, name, seed):
            raise


def resolve_model(name_or_path: str, kind: str | None = None, *, models_dir: Path | None = None) -> str:
    """A preset name → its built folder under `models_dir` (built on first use); a local folder → itself;
    `org/name` → as is.

    With `kind` ("sd" or "vlm") a preset or folder of the other kind is refused here, before any
    loading. A hub id is returned unchanged: the loaders fetch it, or explain that they cannot offline.
    """
    if kind is not None and kind not in KIND_ROOT_FILES:
        raise ModelError(f"unknown model kind {kind!r}; use one of {', '.join(KIND_ROOT_FILES)}")

    if name_or_path in PRESETS:
        preset = PRESETS[name_or_path]
        if kind is not None and preset.kind != kind:
            same_kind = ", ".join(p.name for p in PRESETS.values() if p.kind == kind)
            raise ModelError(
                f"preset {preset.name!r} is a {KIND_NAMES[preset.kind]}, but a {KIND_NAMES[kind]} is "
                f"needed here; use {same_kind} or a path"
            )
        if models_dir is None:
            raise ModelError(
                f"{preset.name!r} is a preset, and no models_dir says where presets are built; pass "
                "models_dir (e.g. raybooth.cluster.workdir.default_models_dir()) or the preset's folder"
            )
        folder = preset_dir(preset.name, models_dir)
        if not _is_current_build(folder, preset.name):  # any seed will do; an old format will not
            build_preset(preset.name, folder, seed=(read_marker(folder) or {}).get("seed", 0))
        return str(folder)

    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{name_or_path} is a file; pass the model's folder (the one with config files)")
        if kind is not None and not (path / KIND_ROOT_FILES[kind]).is_file():
            raise ModelError(
                f"{name_or_path} is not a {KIND_NAMES[kind]} folder (no {KIND_ROOT_FILES[kind]}); "
                "pass a folder saved with save_pretrained, or a preset"
            )
        return str(path.resolve())

    if _HUB_ID.match(name_or_path):
        return name_or_path
    if os.sep in name_or_path or name_or_path.startswith((".", "~")):
        raise ModelError(f"model folder {name_or_path} does not exist; check the path, or use a preset")
    raise ModelError(
        f"unknown preset {name_or_path!r}; choose from {', '.join(PRESETS)}, "
        "or pass a local model folder or a hub id (org/name)"
    )


def preset_status(models_dir: Path) -> list[dict[str, Any]]:
    """One row per preset (name, kind, description, built, path, seed) for `raybooth doctor`."""
    rows = []
    for preset in PRESETS.values():
        folder = preset_dir(preset.name, models_dir)
        built = _is_current_build(folder, preset.name)
        marker = read_marker(folder) if built else None
        rows.append(
            {
                "name": preset.name,
                "kind": preset.kind,
                "description": preset.description,
                "built": built,
                "path": str(folder),
                "seed": marker["seed"] if marker else None,
            }
        )
    return rows
