"""Which device to run on and which precision to train in, decided once and explained.

`pick_device("auto")` gives CUDA when there is one, else the CPU. `resolve_precision("fp16", device)`
turns a config's `mixed_precision` into a `PrecisionPlan` (autocast dtype, grad scaler, dtype of the
frozen modules); when the hardware cannot do what was asked the plan falls back and says why in `note`,
so a job logs one clear line instead of crashing or silently training in another precision.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Literal

import torch

from raybooth.errors import ModelError

MixedPrecision = Literal["no", "fp16", "bf16"]
MIXED_PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def pick_device(preference: str = "auto") -> torch.device:
    """`auto` → `cuda` when a GPU is visible, else `cpu`; `cpu`, `cuda` and `cuda:N` are taken as asked."""
    choice = preference.strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelError(
                f"device {preference!r} was requested but torch sees no CUDA GPU (torch {torch.__version__}); "
                "use device: auto or cpu, or install a CUDA build of torch on a GPU machine"
            )
        device = torch.device(choice)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(
                f"device {preference!r} does not exist: {torch.cuda.device_count()} GPU(s) visible; "
                "use cuda:0 or check CUDA_VISIBLE_DEVICES"
            )
        return device
    raise ModelError(f"unknown device {preference!r}; use auto, cpu, cuda or cuda:N")


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Accept a torch dtype or a config string like "fp16"/"bfloat16"; None stays None (the default)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[dtype.strip().lower()]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPE_NAMES)}") from None


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
    """How one training/inference run uses reduced precision, after the hardware had its say."""

    requested: str  # what the config asked for: "no" | "fp16" | "bf16"
    device_type: str  # "cuda" | "cpu": what torch.autocast needs
    autocast_dtype: torch.dtype | None  # None: no autocast, everything runs in fp32
    use_grad_scaler: bool  # fp16 gradients underflow without loss scaling; bf16 has fp32's range
    frozen_dtype: torch.dtype  # VAE/text encoder only run forward, so they can live in the low dtype
    note: str | None = None  # set when the plan differs from the request, saying why and what to do

    @property
    def effective(self) -> str:
        """What actually runs: "no", "fp16" or "bf16"."""
        return {None: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.autocast_dtype]


def _cuda_supports_bf16() -> bool:
    # A function of its own so tests can pretend to be on a pre-Ampere GPU (V100, T4).
    return torch.cuda.is_bf16_supported()


def resolve_precision(mixed_precision: str, device: torch.device | str) -> PrecisionPlan:
    """Turn `mixed_precision` ("no" | "fp16" | "bf16") into a plan that `device` can actually run."""
    if mixed_precision not in MIXED_PRECISIONS:
        raise ModelError(
            f"unknown mixed_precision {mixed_precision!r}; use one of {', '.join(MIXED_PRECISIONS)}"
        )
    device_type = torch.device(device).type
    if device_type not in ("cuda", "cpu"):
        raise ModelError(f"mixed precision on {device_type!r} is not supported; use a cuda or cpu device")

    fp32 = PrecisionPlan(mixed_precision, device_type, None, False, torch.float32)
    fp16 = PrecisionPlan(mixed_precision, device_type, torch.float16, True, torch.float16)
    bf16 = PrecisionPlan(mixed_precision, device_type, torch.bfloat16, False, torch.bfloat16)

    if mixed_precision == "no":
        return fp32
    if mixed_precision == "fp16":
        if device_type == "cuda":
            return fp16
        # CPU autocast has no fp16 matmul kernels worth using and GradScaler is CUDA-only in practice.
        return dataclasses.replace(
            fp32,
            note="mixed_precision fp16 needs a CUDA GPU; on cpu it falls back to fp32 "
            "(set mixed_precision: bf16 for CPU autocast, or no to silence this)",
        )
    if device_type == "cpu" or _cuda_supports_bf16():
        return bf16
    return dataclasses.replace(
        fp16,
        note="mixed_precision bf16 is not supported by this GPU (needs Ampere or newer); falling back to fp16 "
        "with a gradient scaler (set mixed_precision: fp16 to silence this)",
    )


@contextlib.contextmanager
def autocast(plan: PrecisionPlan) -> Iterator[None]:
    """Run the block under the plan's autocast; a no-op for fp32 plans."""
    if plan.autocast_dtype is None:
        yield
        return
    with torch.autocast(device_type=plan.device_type, dtype=plan.autocast_dtype):
        yield


def make_grad_scaler(plan: PrecisionPlan) -> torch.amp.GradScaler:
    """A GradScaler that is enabled only when the plan needs one (fp16), so the train loop is the same."""
    return torch.amp.GradScaler(plan.device_type, enabled=plan.use_grad_scaler)
