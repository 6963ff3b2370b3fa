"""Mllama's cross-attention in a batch: each row attends to its own images, as it would alone.

    prefill, decode = mllama_prepare(model, batched_inputs, attention_mask)   # batched by the MLLAMA rules
    logits = mllama_forward(model, {**prefill, "input_ids": ids, ...})        # (B, V)

Mllama's text tokens read the images through cross-attention layers, masked per token by the processor's
`cross_attention_mask` `(1, T, N_img, N_tiles)`: a token attends to the images placed before it. Batched,
rows are padded to the batch's most images (zero pixels), and two things would then differ from a row
run alone, where Hugging Face's forward

- skips the cross-attention layers altogether for a text-only request, and
- unmasks every vision token of the request for a token that attends to no image (those before the
  first image: Mllama's `_prepare_cross_attention_mask` turns a fully masked row into no mask at all,
  then zeroes that token's cross-attention MLP);

in a batch, both would also see the padding images. So the batch builds the masks itself: a token that
attends to no image attends to all tiles of its own row's images, a text-only row's vision states are
zero (its values are then zero, so cross-attention adds nothing, exactly as a skipped layer), and the
per-token "attends to something" mask that zeroes the MLP is kept from the processor's mask. The layers
are then called with these masks (`MllamaTextModel`'s own `cross_attention_mask` and
`full_text_row_masked_out_mask` arguments), and the vision states are cached by them at prefill.

At every decode step the new token's mask is the last prompt token's (Hugging Face's
`_update_model_kwargs_for_generation` appends a copy of the last row each step and the model reads only
that row), so the decode-step inputs are each row's last mask row, dropped with the row as it finishes.
Plain PyTorch + transformers: no Ray.
"""

from __future__ import annotations

from typing import Any

import torch


def mllama_prepare(
    model: Any, inputs: dict[str, Any], mask: torch.Tensor
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Vision states and per-row cross-attention masks for a batch: `(prefill inputs, decode inputs)`."""
    inputs = dict(inputs)
    pixel_values = inputs.pop("pixel_values", None)  # (B, N_img, N_tiles, C, H, W)
    aspect_ratio_ids = inputs.pop("aspect_ratio_ids", None)  # (B, N_img): 0 for a padding image
    aspect_ratio_mask = inputs.pop("aspect_ratio_mask", None)  # (B, N_img, N_tiles): 1 = a real tile
    token_mask = inputs.pop("cross_attention_mask", None)  # (B, T, N_img, N_tiles): 1 = attends to that tile
    if pixel_values is None:
        return inputs, {}  # a text-only batch: no cross-attention, as each row alone
    inner = model.model
    with torch.inference_mode():
        vision = inner.vision_model(
            pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask
        ).last_hidden_state  # (B, N_img, N_tiles, P, D_vision)
        states = inner.multi_modal_projector(vision).reshape(len(mask), -1, inner.hidden_size)  # (B, V, D)
    real_images = aspect_ratio_mask[:, :, :1].bool().expand_as(aspect_ratio_mask)  # (B, N_img, N_tiles)
    has_images = real_images.flatten(1).any(dim=1)  # (B,)
    states = states * has_images[:, None, None].to(states.dtype)  # text-only rows: zero values

    attends = token_mask.bool()  # (B, T, N_img, N_tiles)
    attends_any = attends.flatten(2).any(dim=2)  # (B, T): the token sees some image
    # A token that sees no image sees every tile of its own row's images (all tiles, for a text-only row,
    # whose states are zero), as the row's own forward pass unmasks it.
    fallback = torch.where(has_images[:, None, None], real_images, torch.ones_like(real_images))
    allowed = torch.where(attends_any[:, :, None, None], attends, fallback[:, None])
    dtype = states.dtype
    additive = (~allowed).to(dtype) * torch.finfo(dtype).min  # (B, T, N_img, N_tiles)
    per_patch = inner.vision_model.num_patches  # vision tokens per tile
    additive = additive.repeat_interleave(per_patch, dim=3).flatten(2).unsqueeze(1)  # (B, 1, T, V)
    sees_image = attends_any.to(dtype)[:, None, :, None]  # (B, 1, T, 1): 0 zeroes the cross-attention MLP
    prefill = {
        **inputs,
        "cross_attention_states": states,
        "cross_attention_mask": additive,
        "full_text_row_masked_out_mask": sees_image,
    }
    # Decode steps: the last prompt token's masks; the states are in the KV cache by then.
    decode = {
        "cross_attention_mask": additive[:, :, -1:],
        "full_text_row_masked_out_mask": sees_image[:, :, -1:],
    }
    return prefill, decode


def mllama_forward(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """The text model with the batch's own masks, then the LM head on the last position: `(B, V)`."""
    inputs = {k: v for k, v in inputs.items() if k != "logits_to_keep"}
    hidden = model.model.language_model(**inputs).last_hidden_state  # (B, T, D)
    return model.lm_head(hidden[:, -1, :])
