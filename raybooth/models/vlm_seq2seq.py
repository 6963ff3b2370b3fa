"""Encoder-decoder models in the generation engine (Florence-2): the encoder runs once per batch, the
decoder then steps with its own KV cache.

    cache = new_seq2seq_cache(model)
    logits, decode_inputs = seq2seq_prefill(model, ids, mask, {"pixel_values": pv}, cache)   # (B, V)
    logits = seq2seq_step(model, next_tokens, cache, decode_inputs)                          # (B, V)

The engine left-pads prompts for decoder-only models; an encoder with learned positions (BART, under
Florence-2) counts positions from the first column, so its prompt is right-aligned here instead, and the
encoder's attention mask hides the pads (the decoder's cross-attention reads the same mask). Every row's
decoder starts from the model's `decoder_start_token_id` at the same step, so decoder positions and the
decoder cache line up across rows with no padding at all. The prefill is one forward call of the model
itself (so it merges image features into the encoder input its own way); its encoder output is kept per
row for the decode steps, which is what Hugging Face `generate` passes each step as `encoder_outputs`.
Plain PyTorch + transformers: no Ray.
"""

from __future__ import annotations

from typing import Any

import torch


def new_seq2seq_cache(model: Any) -> Any:
    """An empty cache for the decoder's self-attention and its cross-attention over the encoder."""
    from transformers import DynamicCache, EncoderDecoderCache

    config = model.config.get_text_config(decoder=True)
    return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))


def right_aligned(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `(B, T)` ids and mask moved to the left edge (pads at the end), row by row."""
    pads = (mask == 0).sum(dim=1)  # (B,)
    columns = torch.arange(ids.shape[1], device=ids.device)
    source = (columns[None, :] + pads[:, None]) % ids.shape[1]  # (B, T): read each row shifted by its pads
    return ids.gather(1, source), mask.gather(1, source)


def decoder_start_id(model: Any) -> int:
    for source in (getattr(model, "generation_config", None), model.config, model.config.get_text_config()):
        value = getattr(source, "decoder_start_token_id", None)
        if isinstance(value, int):
            return value
    raise ValueError("the encoder-decoder model names no decoder_start_token_id in its configs")


def seq2seq_prefill(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, inputs: dict[str, Any], cache: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Encode the batch and run the decoder's first step: `(B, V)` logits and the per-row decode inputs."""
    encoder_ids, encoder_mask = right_aligned(ids, mask)
    start = torch.full((len(ids), 1), decoder_start_id(model), dtype=torch.long, device=ids.device)
    out = model(
        input_ids=encoder_ids,
        attention_mask=encoder_mask,
        decoder_input_ids=start,
        past_key_values=cache,
        use_cache=True,
        **inputs,
    )
    decode = {"encoder_hidden_states": out.encoder_last_hidden_state, "encoder_attention_mask": encoder_mask}
    return out.logits[:, -1, :], decode


def seq2seq_step(
    model: Any, tokens: torch.Tensor, cache: Any, decode: dict[str, torch.Tensor]
) -> torch.Tensor:
    """One decoder step for `(B, 1)` new tokens over the cached encoder output: `(B, V)` logits."""
    from transformers.modeling_outputs import BaseModelOutput

    out = model(
        decoder_input_ids=tokens,
        encoder_outputs=BaseModelOutput(last_hidden_state=decode["encoder_hidden_states"]),
        attention_mask=decode["encoder_attention_mask"],
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits[:, -1, :]
