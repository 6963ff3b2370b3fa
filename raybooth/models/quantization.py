"""Weight-only int8 quantisation of the generation engine's models, through torchao and transformers.

`quantization: int8` stores every `nn.Linear` weight of the model as int8 with one fp32 scale per output
channel (symmetric, per row: torchao's `Int8WeightOnlyConfig(granularity=PerRow())`); activations stay in
the model's dtype and each matmul dequantises on the fly. The weights are quantised as they load, in the
same `from_pretrained` call that loads an unquantised checkpoint (transformers' `TorchAoConfig`), so
presets, local folders and hub ids all take it.

    from raybooth.models.quantization import quantization_config, weight_bytes
    options = quantization_config("int8", torch.device("cpu"))   # {"quantization_config": TorchAoConfig}
    model = AutoModelForCausalLM.from_pretrained(folder, **options)
    weight_bytes(model).linear_ratio                             # ~0.27: int8 + scales vs 4 bytes a weight

What is quantised, and why:
- Every `nn.Linear` of the language model, and of the vision tower too (its attention and MLP linears
  quantise as well as the decoder's, on every family of `vlm_family.FAMILIES`; a ViT's patch embedding is
  a convolution and stays as it is).
- Not the output projection (`lm_head`) nor the input embeddings: transformers leaves them out by default
  and so do we. `lm_head` writes the logits directly, so its rounding error is the one that flips greedy
  picks most, and where it is tied to the input embeddings quantising it would change both. In a real
  checkpoint the two are a small share of the weights (Llama-3-8B: 1.05 of 8.0 B), in a tiny preset a
  large one, which is why `WeightBytes` reports the quantised linears and the whole model apart.

Devices: torchao's int8 weight-only path is plain PyTorch ops (an int8 → activation-dtype cast and a
matmul), which run on CPU (fp32, fp16, bf16) and CUDA. Other devices (MPS) are refused with one line, as
is an unknown value. bitsandbytes is not a dependency: one library covers CPU and CUDA.

Speed: what this buys is resident weight memory; tokens/s stays about the same. torchao's eager int8
weight-only matmul casts each int8 weight to the activation dtype and then multiplies (two ops; the cast
writes a full-precision copy each call), so it reads a quarter of the weight bytes but does not cut the
traffic to a quarter, and without `torch.compile` to fuse the two (the engine does not compile) it is
no faster kernel. Measured on a shared 2-core CPU (`benchmarks/generation.py`, 8 rows): tiny-llm 1.02x
tokens/s, a ~90M-parameter Llama 1.09x tokens/s and 0.88x TTFT. CUDA runs the same two ops.

Importing torchao prints lines no CPU user can act on (its CUDA extensions failing to load, torch's
pytree deprecation notes about torchao's enums); `quiet_torchao_import_noise` filters exactly those
records and is installed when `raybooth.models` is imported (diffusers imports torchao whenever it is
installed, quantisation on or off). Plain PyTorch + transformers: no Ray.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from raybooth.errors import ModelError

if TYPE_CHECKING:
    import torch

Quantization = Literal["int8"]
QUANTIZATIONS: tuple[str, ...] = ("int8",)
# Devices whose torch backend runs torchao's int8 weight-only ops (checked on CPU here, CUDA on a GPU).
QUANTIZED_DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda")


class QuantizationError(ModelError):
    """A quantisation that cannot run here: an unknown value, a device without the kernels, no torchao."""


def check_quantization(quantization: str | None, device: torch.device) -> None:
    """Refuse, in one line naming the `quantization` key and the fix, what cannot run on `device`."""
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise QuantizationError(
            f"unknown quantization {quantization!r}; set quantization to one of: null, {', '.join(QUANTIZATIONS)}"
        )
    if device.type not in QUANTIZED_DEVICE_TYPES:
        raise QuantizationError(
            f"quantization {quantization!r} is not available on {device.type}: torchao's int8 weight-only "
            f"kernels run on {' and '.join(QUANTIZED_DEVICE_TYPES)}; set quantization: null or device: cpu"
        )


def quantization_config(quantization: str | None, device: torch.device) -> dict[str, Any]:
    """The `from_pretrained` options for `quantization` on `device`: `{}` when it is None, else
    `{"quantization_config": TorchAoConfig(Int8WeightOnlyConfig(per row))}`. QuantizationError when
    it cannot run here (see `check_quantization`)."""
    check_quantization(quantization, device)
    if quantization is None:
        return {}
    try:
        from torchao.quantization import Int8WeightOnlyConfig, PerRow
    except ImportError as e:
        raise QuantizationError(
            f"quantization {quantization!r} needs torchao, which is not installed here "
            "(pip install 'torchao==0.18.0'); or set quantization: null"
        ) from e
    from transformers import TorchAoConfig

    # set_inductor_config=False: the engine does not torch.compile, and the flag would change inductor's
    # global settings for everything else in the process.
    weights = Int8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False)
    return {"quantization_config": TorchAoConfig(quant_type=weights)}


# --------------------------------------------------------------------------------------------------
# Weight memory
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightBytes:
    """A model's weight memory as stored, next to what the same weights take in fp32.

    `linear*`: every `nn.Linear` weight but the output projection's (`lm_head`, never quantised), as
    stored: int8 data plus its per-channel scales and zero points where quantised (`quantized_linears` of
    them), its own dtype where the quantiser left one as it was (counted here too, so the ratio is never
    flattered). `total*`: every parameter and buffer of the model (embeddings, `lm_head`, norms, biases,
    convolutions included), each counted once. `*_fp32`: the same tensors at 4 bytes an element."""

    linear: int
    linear_fp32: int
    total: int
    total_fp32: int
    quantized_linears: int

    @property
    def linear_ratio(self) -> float:
        return self.linear / self.linear_fp32

    @property
    def total_ratio(self) -> float:
        return self.total / self.total_fp32


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds as stored: a torchao tensor subclass (int8 data, scales, zero points) is the
    sum of its inner tensors, a plain tensor its elements times their size."""
    if hasattr(type(tensor), "__tensor_flatten__"):  # a wrapper subclass: the data is in its parts
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def is_quantized(tensor: torch.Tensor) -> bool:
    """A torchao quantised tensor (int8 `qdata` inside a wrapper subclass)."""
    return hasattr(type(tensor), "__tensor_flatten__") and hasattr(tensor, "qdata")


def weight_bytes(model: torch.nn.Module) -> WeightBytes:
    """The weight memory of `model` (see `WeightBytes`), for the benchmark and the tests."""
    import torch

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output]
    tensors = [*model.parameters(), *model.buffers()]  # shared (tied) parameters are listed once
    return WeightBytes(
        linear=sum(tensor_bytes(m.weight) for m in linears),
        linear_fp32=sum(m.weight.numel() * 4 for m in linears),
        total=sum(tensor_bytes(t) for t in tensors),
        total_fp32=sum(t.numel() * 4 for t in tensors),
        quantized_linears=sum(1 for m in linears if is_quantized(m.weight)),
    )


# --------------------------------------------------------------------------------------------------
# Import noise
# --------------------------------------------------------------------------------------------------


class _TorchaoImportNoise(logging.Filter):
    """Drops the records importing torchao writes that say nothing to a user: its optional CUDA/MX
    extensions failing to load (`Failed to load .../torchao/_C_*.so`), torch's note that torchao still
    registers its enums as pytree constants, and diffusers' note that old torchao tensor classes are gone."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if record.name == "torchao":
            return not (message.startswith("Failed to load") and "torchao" in record.getMessage())
        if record.name == "torch.utils._pytree":
            first = record.args[0] if isinstance(record.args, tuple) and record.args else None
            return not getattr(first, "__module__", "").startswith("torchao")
        return "Unable to import `torchao` Tensor objects" not in message


_NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def quiet_torchao_import_noise() -> None:
    """Install the filter on the loggers that write those records (idempotent; stdlib only, so cheap)."""
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _TorchaoImportNoise) for f in logger.filters):
            logger.addFilter(_TorchaoImportNoise())
