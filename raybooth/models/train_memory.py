"""What lets the big families train on one GPU: frozen text encoders freed after encoding, the precision a
family trains in by default, and the optimizer (AdamW or bitsandbytes' 8-bit AdamW).

    models = prepare_for_training(load_sd_components("tiny-flux", device="cpu", models_dir=d), train_mode="lora",
                                  train_text_encoder=False, plan=resolve_precision("no", "cpu"))
    freed = free_frozen_text_encoders(models, ["a photo of sks dog", ""])  # ["text_encoder", "text_encoder_2"]
    plan = training_precision(None, models.family, "cuda")                  # bf16 for SD3/Flux on Ampere+
    problem = optimizer_problem("adamw_8bit", cuda=False)                   # one line naming the fix

Freeing (`cache_text_embeddings`): every prompt a run will ever encode (instance, class, validation, the
empty negative prompt) is known before the first step, so each text encoder that never trains (T5
always; the CLIPs when text-encoder training is off) is run once on all of them and replaced by a
`RecordedTextEncoder` that returns those outputs row by row. The family's own `encode_prompts` then runs
unchanged in the train step and in validation sampling, and the encoder's weights (T5-XXL: ~9 GB in
bf16) leave the device. A prompt that was not recorded is an error, never a silent zero.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from raybooth.errors import ModelError
from raybooth.models.device import PrecisionPlan, autocast, resolve_precision

OPTIMIZERS = ("adamw", "adamw_8bit")

RowKey = tuple[tuple[int, ...], tuple[tuple[str, Any], ...]]  # (token ids of one row, call flags)


def _call_flags(kwargs: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
        raise ModelError(
            "a recorded text encoder replays calls with token ids only (no tensor keyword arguments)"
        )
    return tuple(sorted(kwargs.items()))


class _Recorder(nn.Module):
    """Calls the real encoder and keeps each row's output (detached), keyed by that row's token ids."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.rows: dict[RowKey, dict[str, Any]] = {}
        self.output_class: type | None = None

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        out = self.encoder(input_ids, **kwargs)
        self.output_class = type(out)
        flags = _call_flags(kwargs)
        for i, ids in enumerate(input_ids.tolist()):
            row = {}
            for name, value in out.items():  # ModelOutput: only the fields that are set
                if isinstance(value, tuple):  # hidden_states: one tensor per layer
                    row[name] = tuple(v[i].detach() for v in value)
                else:
                    row[name] = value[i].detach()
            self.rows[(tuple(ids), flags)] = row
        return out


class RecordedTextEncoder(nn.Module):
    """A frozen text encoder's outputs for the run's prompts, returned as the encoder returned them.

    It holds no weights: `anchor` is an empty parameter so callers asking where the encoder lives (the
    device prompts' ids go to, the dtype) get the original's answer."""

    def __init__(
        self, name: str, rows: dict[RowKey, dict[str, Any]], output_class: type, anchor: torch.Tensor
    ):
        super().__init__()
        self.name = name
        self.rows = rows
        self.output_class = output_class
        self.anchor = nn.Parameter(
            torch.empty(0, device=anchor.device, dtype=anchor.dtype), requires_grad=False
        )

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        flags = _call_flags(kwargs)
        try:
            rows = [self.rows[(tuple(ids), flags)] for ids in input_ids.tolist()]
        except KeyError:
            raise ModelError(
                f"{self.name} was freed after encoding the run's prompts, and this prompt was not one of them; "
                "list it in validation_prompts, or set cache_text_embeddings: false"
            ) from None
        merged: dict[str, Any] = {}
        for name, first in rows[0].items():
            if isinstance(first, tuple):
                merged[name] = tuple(torch.stack([r[name][k] for r in rows]) for k in range(len(first)))
            else:
                merged[name] = torch.stack([r[name] for r in rows])
        return self.output_class(**merged)


def frozen_text_encoder_names(models: Any) -> list[str]:
    """The text encoders of `models` (a TrainModels) whose weights never change in this run."""
    family = models.family
    trained = set(family.trainable_text_encoder_names) if models.train_text_encoder else set()
    return [
        n
        for n in family.text_encoder_names
        if n not in trained
        and getattr(models, n) is not None
        and not isinstance(getattr(models, n), RecordedTextEncoder)
    ]


@torch.no_grad()
def free_frozen_text_encoders(
    models: Any, prompts: Sequence[str], plan: PrecisionPlan | None = None, batch: int = 8
) -> list[str]:
    """Encode every prompt once, swap each frozen encoder for its `RecordedTextEncoder`, free its weights.

    `prompts`: all the run will encode (duplicates are fine). Encoded under `plan`'s autocast, as the
    train step encodes, so replayed embeddings equal the live ones. Returns the names of the freed encoders;
    the caller must drop its own references (e.g. the loaded components) for the memory to go."""
    family = models.family
    names = frozen_text_encoder_names(models)
    if not names:
        return []
    recorders = {n: _Recorder(getattr(models, n)) for n in names}
    encoders = [recorders.get(n, getattr(models, n)) for n in family.text_encoder_names]
    unique = list(dict.fromkeys(prompts))
    with autocast(plan) if plan is not None else contextlib.nullcontext():
        for i in range(0, len(unique), batch):
            family.encode_prompts(encoders, models.tokenizers, unique[i : i + batch])
    for name, recorder in recorders.items():
        anchor = next(recorder.encoder.parameters())
        setattr(models, name, RecordedTextEncoder(name, recorder.rows, recorder.output_class, anchor))
        recorder.encoder = None
    del recorders, encoders
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the freed blocks back, so peak-memory readings show the saving
    return names


def reload_freed_text_encoders(parts: Any, path: str) -> list[str]:
    """Load again, from the base pipeline at `path` (on the CPU, fp32), each text encoder of `parts` that
    was freed: what a full-pipeline export saves. Returns their names."""
    import transformers

    reloaded = []
    for name, _, class_name in parts.family.text_encoder_slots:
        if isinstance(getattr(parts, name, None), RecordedTextEncoder):
            setattr(parts, name, getattr(transformers, class_name).from_pretrained(path, subfolder=name))
            reloaded.append(name)
    return reloaded


def wants_text_cache(setting: bool | None, family: Any) -> bool:
    """`cache_text_embeddings`: null means on for the flow families (SD3's and Flux's T5 is the big one)."""
    return bool(family.flow_matching) if setting is None else setting


# --------------------------------------------------------------------------------------------------
# Precision and optimizer
# --------------------------------------------------------------------------------------------------


def training_precision(mixed_precision: str | None, family: Any, device: torch.device | str) -> PrecisionPlan:
    """The run's `PrecisionPlan`: an explicit `no`/`fp16`/`bf16` as asked; null/`auto` is bf16 for SD3/Flux
    on a CUDA GPU (fp16 with a scaler before Ampere), fp32 for them on a CPU (with a note), and fp32 for
    the DDPM families (whose diffusers scripts default to no mixed precision too)."""
    if mixed_precision not in (None, "auto"):
        return resolve_precision(mixed_precision, device)
    device_type = torch.device(device).type
    if not family.flow_matching:
        return dataclasses.replace(resolve_precision("no", device), requested="auto")
    if device_type == "cuda":
        return dataclasses.replace(resolve_precision("bf16", device), requested="auto")
    return dataclasses.replace(
        resolve_precision("no", device),
        requested="auto",
        note=f"mixed_precision auto: {family.pipeline_class_name} trains in bf16 on CUDA GPUs; on {device_type} "
        "it trains in fp32 (set mixed_precision: bf16 for CPU autocast, or no to silence this)",
    )


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def optimizer_problem(optimizer: str, cuda: bool) -> str | None:
    """Why `optimizer` cannot run here (one line with the fix), or None when it can."""
    if optimizer not in OPTIMIZERS:
        return f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}"
    if optimizer == "adamw":
        return None
    if not cuda:
        return (
            "optimizer adamw_8bit needs CUDA GPUs (bitsandbytes' 8-bit states live on the GPU) and this run "
            "trains on CPUs; set optimizer: adamw, or gpus_per_worker: 1"
        )
    if not _installed("bitsandbytes"):
        return "optimizer adamw_8bit needs bitsandbytes, which is not installed: pip install bitsandbytes, or set optimizer: adamw"
    return None


def build_optimizer(
    groups: list[dict[str, Any]], optimizer: str, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW (fp32 states: 8 bytes per trained weight) or bitsandbytes' AdamW8bit (~2 bytes)."""
    if optimizer == "adamw":
        # foreach=False: the per-parameter loop is the same kernel sequence on every run (determinism on CPU).
        return torch.optim.AdamW(groups, weight_decay=weight_decay, foreach=False)
    problem = optimizer_problem(optimizer, cuda=torch.cuda.is_available())
    if problem:
        raise ModelError(problem)
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(groups, weight_decay=weight_decay)
