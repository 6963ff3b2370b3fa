"""Model families of the generation engine: what a checkpoint is, and how its processor outputs batch.

    family = detect_family(AutoConfig.from_pretrained(path))    # FamilyError if not supported
    family.takes_images, family.positions                       # False for a text-only LLM; "mrope" for Qwen-VL
    batched = collate_inputs(family, [row.inputs for row in rows], lengths, longest)

A processor returns more than `input_ids`: pixel values, image grids (Qwen-VL), token type ids (Gemma 3,
PaliGemma), image sizes and images per request (LLaVA-OneVision), masks. Every output a row's processor call returned travels with the row
(`PreparedRequest.inputs`), and one rule per output says how the rows' tensors become one batch:

- `token`:  aligned with the prompt, `(1, T, ...)`: left-padded with the prompt to `(B, T_max, ...)`, any
            trailing dims padded to the batch's largest (Mllama's per-token, per-image, per-tile mask);
- `concat`: one entry per image along dim 0 (pixel values, `image_grid_thw`): the rows' entries concatenate,
            in row order, which is the order the model fills image tokens in;
- `pad`:    like `concat`, but every other dim is padded to the batch's largest first (per-request patch
            or tile counts), so rows of different shapes still stack;
- `stack`:  one entry per row, `(1, ...)`: padded to the batch's largest and stacked to `(B, ...)`, zeros
            for a row without it (Mllama, whose cross-attention reads each row's own images);
- `row`:    kept per row, as a list (the model takes one entry per row);
- `drop`:   not a model input (a text LLM's tokenizer may return `token_type_ids` its model never reads).

The generic rule (`token` when the tensor is `(1, T)` for a T-token prompt, else `concat`) covers most
families; a family names its exceptions. `decode=True` marks what the model also needs at every decode
step (the rest is prefill only, as Hugging Face `generate` passes it). A family whose model call needs
more than batching (Mllama's cross-attention masks) adds a `prepare` step on the batched inputs and its
own `forward` (see `vlm_cross_attention.py`). Plain PyTorch: no Ray.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from raybooth.errors import ModelError
from raybooth.models.vlm_cross_attention import mllama_forward, mllama_prepare

Batching = Literal["token", "concat", "pad", "stack", "row", "drop"]

# Outputs the engine builds itself for the whole batch (padding, mask), never taken from the processor.
ENGINE_INPUTS = ("input_ids", "attention_mask")


class FamilyError(ModelError):
    """A checkpoint of a model family the engine cannot run."""


@dataclass(frozen=True)
class InputRule:
    batching: Batching
    decode: bool = False  # also fed at every decode step (batch-first, rows dropped as they finish)
    pad_value: float = 0


# (model, batched prefill inputs on the device, (B, T) attention mask) -> (prefill inputs, decode-step inputs)
PrepareBatch = Callable[[Any, dict[str, Any], torch.Tensor], tuple[dict[str, Any], dict[str, Any]]]
# (model, inputs) -> (B, V) last-position logits
ForwardBatch = Callable[[Any, dict[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class Family:
    name: str  # what users and errors read: "Qwen2.5-VL", "text-only LLM"
    model_types: tuple[str, ...]  # config.json `model_type`s of this family
    takes_images: bool = True
    positions: Literal["1d", "mrope"] = "1d"  # mrope: 3-D (time, height, width) rotary positions
    encoder_decoder: bool = False  # the prompt is encoded once and the decoder steps (vlm_seq2seq)
    rules: dict[str, InputRule] = field(default_factory=dict)  # overrides of the generic rule
    prepare: PrepareBatch | None = None  # for what batching alone cannot express (Mllama); None for most
    forward: ForwardBatch | None = None  # in place of `model(**inputs)` (Mllama); None for most families

    def rule(self, name: str, tensor: torch.Tensor, prompt_tokens: int) -> InputRule:
        if name in self.rules:
            return self.rules[name]
        if tensor.ndim == 2 and tuple(tensor.shape) == (1, prompt_tokens):
            return InputRule("token")
        return InputRule("concat")


# LLaVA-style: image features replace image tokens in order, 1-D positions; token type ids (Gemma 3's
# bidirectional image attention) take the generic `token` rule.
LLAVA = Family(
    "LLaVA-1.5 / Gemma 3 / InternVL / Aya Vision / Llama 4",
    ("llava", "gemma3", "internvl", "aya_vision", "llama4"),
)
# Qwen3-VL batches the same way; its deepstack features are placed by the image tokens of the padded batch
# itself, and its `get_rope_index` reads the same inputs (videos carry timestamps in the text instead).
QWEN_VL = Family(
    "Qwen2-VL / Qwen2.5-VL / Qwen3-VL",
    ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
    positions="mrope",
    rules={
        # Qwen flattens all patches of all images into one (N_patches, C) tensor; the grid says whose.
        "pixel_values": InputRule("concat"),
        "image_grid_thw": InputRule("concat"),
        # Videos the same way: all their spatio-temporal patches, a (t, h, w) grid per video, and (2.5-VL)
        # the seconds between temporal patches, which M-RoPE's time axis reads.
        "pixel_values_videos": InputRule("concat"),
        "video_grid_thw": InputRule("concat"),
        "second_per_grid_ts": InputRule("concat"),
        "mm_token_type_ids": InputRule("token"),  # what get_rope_index reads: 0 text, 1 image, 2 video
    },
)
# Idefics3 / SmolVLM: each row's images arrive as (1, N_img, C, H, W) tiles (a global tile plus the crops),
# N_img differing per request; the batch is (B, N_max, C, H, W) with all-zero tiles as padding (which the
# model drops) and the pixel mask padded with 0 alongside. Rows without images are simply absent.
# (SmolVLM2's `smolvlm` processor also needs the `num2words` package.)
# Idefics2 batches the same way (its images keep their own size, so H and W pad too).
IDEFICS3 = Family(
    "SmolVLM / Idefics3 / Idefics2",
    ("idefics3", "smolvlm", "idefics2"),
    rules={"pixel_values": InputRule("pad"), "pixel_attention_mask": InputRule("pad")},
)
# LLaVA-NeXT (AnyRes): each image is (N_patches, C, H, W) crops, N_patches following its size; the processor
# pads a row's images to the row's largest count, the batch pads them to the batch's largest, and the model
# cuts each image back to the count its `image_sizes` entry gives.
LLAVA_NEXT = Family(
    "LLaVA-NeXT",
    ("llava_next",),
    rules={"pixel_values": InputRule("pad"), "image_sizes": InputRule("concat")},
)
# LLaVA-OneVision: LLaVA-NeXT's crops, but only for a request with one image; a request with several sends
# each as its base image only. `batch_num_images` (one entry per request with images) says which, so it
# concatenates in the same row order as the images.
LLAVA_ONEVISION = Family(
    "LLaVA-OneVision",
    ("llava_onevision",),
    rules={
        "pixel_values": InputRule("pad"),
        "image_sizes": InputRule("concat"),
        "batch_num_images": InputRule("concat"),
    },
)
# Mistral3 (Pixtral vision): each image keeps its aspect ratio, so a row's images are (N_img, C, H, W)
# padded to the row's largest; the batch pads H and W to its largest, and the tower cuts each image back
# to its `image_sizes` entry. (Without torchvision its processor is `pixtral_processor.py`'s.)
MISTRAL3 = Family(
    "Mistral3 / Pixtral",
    ("mistral3",),
    rules={"pixel_values": InputRule("pad"), "image_sizes": InputRule("concat")},
)


# PaliGemma: a prefix prompt after one image (no chat template: the task-prompt path), attended
# bidirectionally in the prefill (`token_type_ids` 0, left-padded with the prompt; the pads stay masked;
# decode steps are causal, so they need none). Its processor also returns training `labels`, no model
# input here. HF counts its positions from 1, the engine from 0: rotary attention reads only position
# differences, so both give the same logits (the oracle tests check it to 1e-5).
PALIGEMMA = Family(
    "PaliGemma",
    ("paligemma",),
    rules={"token_type_ids": InputRule("token"), "labels": InputRule("drop")},
)
# Mllama: images reach the text through cross-attention, per row: pixel values, aspect ratios and their
# masks stack to one slot per row (a text-only row's slot is zeros), and the per-token mask is left-padded
# with the prompt; `mllama_prepare` turns them into the masks a row would get alone (see its module).
MLLAMA = Family(
    "Mllama (Llama 3.2 Vision)",
    ("mllama",),
    rules={
        "pixel_values": InputRule("stack"),
        "aspect_ratio_ids": InputRule("stack"),
        "aspect_ratio_mask": InputRule("stack"),
        "cross_attention_mask": InputRule("token"),
    },
    prepare=mllama_prepare,
    forward=mllama_forward,
)
# Florence-2: an encoder-decoder reading a task prompt (`<CAPTION>`) and at most one image, resized to one
# fixed size, so its pixel values always concatenate.
FLORENCE2 = Family("Florence-2", ("florence2",), encoder_decoder=True)
TEXT = Family(
    "text-only LLM",
    ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"),
    takes_images=False,
    rules={"token_type_ids": InputRule("drop")},
)
FAMILIES: tuple[Family, ...] = (
    LLAVA,
    QWEN_VL,
    IDEFICS3,
    LLAVA_NEXT,
    LLAVA_ONEVISION,
    MISTRAL3,
    PALIGEMMA,
    MLLAMA,
    FLORENCE2,
    TEXT,
)


def replace_rule(family: Family, name: str, rule: InputRule) -> Family:
    """`family` with `rule` for output `name` (a checkpoint whose processor differs from its family's)."""
    return dataclasses.replace(family, rules={**family.rules, name: rule})


def supported_families() -> str:
    return "; ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)


def detect_family(config: Any) -> Family:
    """The family of a loaded `PretrainedConfig` (`model_type`, else its `architectures`)."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and all(a.endswith("ForCausalLM") for a in architectures):
        return TEXT  # a decoder-only LM of a type not listed still runs the plain causal-LM path
    raise FamilyError(
        f"model type {model_type!r} ({', '.join(architectures) or 'no architectures'}) is not supported by "
        f"the generation engine; supported families: {supported_families()}"
    )


def collate_inputs(
    family: Family, rows: Sequence[dict[str, torch.Tensor]], lengths: Sequence[int], longest: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rows' processor outputs as one batch: `(prefill inputs, decode-step inputs)`.

    `lengths` are the rows' prompt lengths and `longest` the padded length (the prompts are left-padded)."""
    names = sorted({name for row in rows for name in row})
    prefill: dict[str, Any] = {}
    decode: dict[str, Any] = {}
    for name in names:
        present = [(b, row[name]) for b, row in enumerate(rows) if name in row]
        rule = family.rule(name, present[0][1], lengths[present[0][0]])
        if rule.batching == "token":
            value: Any = _left_pad(rows, name, lengths, longest, rule.pad_value, present[0][1].dtype)
        elif rule.batching == "concat":
            value = torch.cat([t for _, t in present])
        elif rule.batching == "pad":
            value = _pad_and_concat([t for _, t in present], rule.pad_value)
        elif rule.batching == "stack":
            value = _pad_and_stack(present, len(rows), rule.pad_value)
        elif rule.batching == "drop":
            continue
        else:  # "row": one entry per row, None where a row has none
            by_row = dict(present)
            value = [by_row.get(b) for b in range(len(rows))]
        prefill[name] = value
        if rule.decode:
            decode[name] = value
    return prefill, decode


def _left_pad(
    rows: Sequence[dict[str, torch.Tensor]],
    name: str,
    lengths: Sequence[int],
    longest: int,
    pad_value: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    present = [row[name] for row in rows if name in row]
    trailing = [max(t.shape[d] for t in present) for d in range(2, present[0].ndim)]
    out = torch.full((len(rows), longest, *trailing), pad_value, dtype=dtype)  # (B, T_max, ...)
    for b, row in enumerate(rows):
        if name in row:
            tensor = row[name][0]  # (T, ...)
            if tensor.shape[0] != lengths[b]:
                raise ValueError(
                    f"processor output {name!r} has {tensor.shape[0]} entries for {lengths[b]} tokens"
                )
            out[(b, slice(longest - lengths[b], None), *(slice(0, n) for n in tensor.shape[1:]))] = tensor
    return out


def _pad_and_concat(tensors: Sequence[torch.Tensor], pad_value: float) -> torch.Tensor:
    """Pad every dim but the first to the largest among `tensors` (at the end), then concatenate."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].ndim)]
    padded = []
    for t in tensors:
        out = t.new_full((t.shape[0], *shape), pad_value)
        out[(slice(None), *(slice(0, n) for n in t.shape[1:]))] = t
        padded.append(out)
    return torch.cat(padded)


def _pad_and_stack(present: Sequence[tuple[int, torch.Tensor]], batch: int, pad_value: float) -> torch.Tensor:
    """`(B, ...)` from the rows' `(1, ...)` entries, padded at the end; rows without one are all padding."""
    first = present[0][1]
    shape = [max(t.shape[d] for _, t in present) for d in range(1, first.ndim)]
    out = first.new_full((batch, *shape), pad_value)
    for b, t in present:
        out[(b, *(slice(0, n) for n in t.shape[1:]))] = t[0]
    return out


def image_only_processor_class(cls: type) -> type:
    """`cls` without its video processor. `ProcessorMixin` reads its parts off `__init__`'s signature, so a
    subclass whose `__init__` takes no `video_processor` needs none; it keeps `cls`'s name, so what it
    saves loads as `cls` where torchvision is installed."""

    # By keyword: the third positional parameter is not the video processor everywhere (Idefics3's is
    # image_seq_len), and a processor without a video part gets nothing extra.
    takes_video = "video_processor" in inspect.signature(cls.__init__).parameters

    def __init__(
        self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kw: Any
    ):
        if takes_video:
            kw["video_processor"] = None
        cls.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kw)

    # `save_pretrained` writes the attributes `__init__`'s signature names (LLaVA-OneVision's
    # num_image_tokens, ...): advertise `cls`'s, less the video processor, so they are saved and reloaded.
    parameters = inspect.signature(cls.__init__).parameters
    __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p for name, p in parameters.items() if name != "video_processor"]
    )
    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})


# --------------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------------


def mrope_positions(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, inputs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-VL's prefill positions `(4, B, T)` (1-D text positions, then the model's own 3-D M-RoPE ones
    from `get_rope_index`, which skips the left pads via `mask`) and each row's `rope_deltas` `(B, 1)`: how
    far its M-RoPE position runs ahead of (or behind) its token count, constant for the decode steps."""
    text = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T): real tokens before each one
    token_types = inputs.get("mm_token_type_ids")
    if token_types is None:
        token_types = torch.zeros_like(ids)
    vision, deltas = model.model.get_rope_index(
        ids,
        mm_token_type_ids=token_types,
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=inputs.get("second_per_grid_ts"),
        attention_mask=mask,
    )  # (3, B, T), (B, 1)
    return torch.cat([text.unsqueeze(0), vision]), deltas


def mrope_step_positions(last: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """A decode step's `(4, B, 1)` positions from each row's 1-D position `last` `(B, 1)`: after the prompt
    every M-RoPE axis advances with the text, offset by the row's delta (what Hugging Face computes)."""
    vision = (last + deltas).unsqueeze(0).expand(3, -1, -1)
    return torch.cat([last.unsqueeze(0), vision])
