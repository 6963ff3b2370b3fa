"""Training checkpoints and the final export, Ray-free: one folder per checkpoint.

    save_checkpoint(folder, models.trainable(), optimizer, lr_scheduler, scaler, step=10, meta={...})
    state = load_checkpoint(folder, models.trainable(), optimizer, lr_scheduler, scaler)   # -> step 10
    save_full_pipeline(out_dir, components, scheduler)   # fp32 diffusers folder plus its fp16 variant
    save_lora_weights(out_dir, unet, text_encoder, base_model="tiny-sd", dtype=torch.float16)

A checkpoint folder holds:
    unet.safetensors, text_encoder.safetensors   the trainable weights only (fp32; LoRA: the adapters)
    training_state.pt                            optimizer, LR schedule, grad scaler, RNG states, step
    meta.json                                    step, MLflow run id, what was trained (human-readable)

Weights are safetensors (never pickle). The training state is tensors and plain Python values saved
with torch.save and read back with `weights_only=True`, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

TRAINING_STATE = "training_state.pt"
META = "meta.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
LORA_META = "raybooth_lora.json"  # names the base model, so a loader knows what to put the LoRA on


@dataclass
class LoadedCheckpoint:
    step: int
    meta: dict[str, Any]


def weights_file(name: str) -> str:
    return f"{name}.safetensors"


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The weights that train (full: all of them; LoRA: the adapters), detached, on the CPU, contiguous."""
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    """Every global RNG as tensors and plain values (so weights_only loading accepts it)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    folder: str | Path,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: torch.amp.GradScaler,
    step: int,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint of `modules`' trainable weights and the training state after `step` steps."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        save_file(trainable_state_dict(module), str(folder / weights_file(name)))
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
        },
        folder / TRAINING_STATE,
    )
    # meta.json last: a folder with it is complete (readers of a half-copied folder can tell).
    record = {"step": step, "modules": sorted(modules), **(meta or {})}
    (folder / META).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return folder


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a raybooth checkpoint (no {META})")
    return json.loads(path.read_text())


def load_trainable_weights(folder: str | Path, modules: dict[str, nn.Module]) -> None:
    """Copy a checkpoint's weights into `modules`; every trainable weight must be in the file."""
    folder = Path(folder)
    for name, module in modules.items():
        path = folder / weights_file(name)
        if not path.is_file():
            raise FileNotFoundError(
                f"checkpoint {folder} has no {path.name}; was it trained with the same settings?"
            )
        saved = load_file(str(path))
        expected = {n for n, p in module.named_parameters() if p.requires_grad}
        if set(saved) != expected:
            missing, extra = sorted(expected - set(saved))[:3], sorted(set(saved) - expected)[:3]
            raise ValueError(
                f"checkpoint {path} does not match the model being trained (missing {missing}, unexpected "
                f"{extra}); resume with the same train_mode, lora_rank and text_encoder_lr"
            )
        params = dict(module.named_parameters())
        with torch.no_grad():
            for n, tensor in saved.items():
                params[n].copy_(tensor)


def load_checkpoint(
    folder: str | Path,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: torch.amp.GradScaler,
) -> LoadedCheckpoint:
    """Restore weights, optimizer, LR schedule, scaler and RNGs from `folder`; returns the step reached."""
    folder = Path(folder)
    meta = read_meta(folder)
    load_trainable_weights(folder, modules)
    state = torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return LoadedCheckpoint(step=int(state["step"]), meta=meta)


# --------------------------------------------------------------------------------------------------
# Final export
# --------------------------------------------------------------------------------------------------


def save_lora_weights(
    folder: str | Path,
    denoiser: nn.Module,
    text_encoder: nn.Module | None,
    base_model: str,
    dtype: torch.dtype = torch.float32,
    *,
    text_encoder_2: nn.Module | None = None,
    family: Any = None,
) -> Path:
    """Write the adapters where `pipeline.load_lora_weights(folder)` finds them, plus which base they go on.

    Saved with the family's pipeline class (`unet_lora_layers=` for SD/SDXL, `transformer_lora_layers=`
    for SD3/Flux; SDXL and SD3 also take `text_encoder_2`'s adapters), so that class's
    `load_lora_weights` reads the file."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layers(module: nn.Module) -> dict[str, torch.Tensor]:
        state = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(module, save_embedding_layers=False)
        )
        return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}

    from raybooth.models.diffusion_family import SDFamily

    family = family or SDFamily()
    folder = Path(folder)
    encoders = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    text_layers = {
        f"{name}_lora_layers": layers(encoders[name]) if encoders.get(name) is not None else None
        for name in family.lora_text_encoders
    }
    family.pipeline_class().save_lora_weights(
        folder,
        **{f"{family.denoiser_name}_lora_layers": layers(denoiser)},
        **text_layers,
        weight_name=LORA_WEIGHTS,
        safe_serialization=True,
    )
    (folder / LORA_META).write_text(json.dumps({"base_model": base_model}, indent=2) + "\n")
    return folder


FP16_VARIANT = "fp16"  # diffusers' variant name: files `*.fp16.safetensors` beside the fp32 ones


def save_full_pipeline(
    folder: str | Path, components: Any, inference_scheduler: Any, fp16_variant: bool = True
) -> Path:
    """A complete diffusers folder (model_index.json + parts), laid out as diffusers publishes checkpoints.

    `components` has the family's parts (denoiser, vae, text encoders, tokenizers) and `family`; the folder is
    saved by that family's pipeline class, so `DiffusionPipeline.from_pretrained(folder)` builds it again.
    The main weights are fp32, so a plain `DiffusionPipeline.from_pretrained(folder)` gets one dtype
    everywhere and runs on a CPU. With `fp16_variant`, each part also gets an fp16 copy
    (`diffusion_pytorch_model.fp16.safetensors`, `model.fp16.safetensors`) that a GPU loads with
    `from_pretrained(folder, variant="fp16", dtype=torch.float16)`: half the download, half the memory.
    """
    import copy

    from raybooth.models.diffusion_family import family_of

    family = family_of(components)
    tokenizers = {n: getattr(components, n) for n in family.tokenizer_names}
    options = dict(family.export_kwargs)
    if family.name == "sdxl":  # keep the base's choices: empty negative = zeros, no watermark dependency
        options.update(force_zeros_for_empty_prompt=family.empty_negative_is_zero(), add_watermarker=False)

    def pipeline_of(parts: dict[str, Any]) -> Any:
        return family.pipeline_class()(**parts, **tokenizers, scheduler=inference_scheduler, **options)

    folder = Path(folder)
    modules = {"vae": components.vae, family.denoiser_name: getattr(components, family.denoiser_name)}
    modules.update({n: getattr(components, n) for n in family.text_encoder_names})
    if fp16_variant:
        # The fp16 copies first: transformers writes the weights' dtype into text_encoder/config.json and
        # loads that dtype by default, so the fp32 save that follows must be the one that writes the config.
        halves = {name: copy.deepcopy(m).to(torch.float16) for name, m in modules.items()}
        pipeline_of(halves).save_pretrained(folder, safe_serialization=True, variant=FP16_VARIANT)
        del halves
    full = {name: m.to(torch.float32) for name, m in modules.items()}
    pipeline_of(full).save_pretrained(folder, safe_serialization=True)
    return folder
