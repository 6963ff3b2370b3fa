"""The `tiny-vlm` preset: a LLaVA-1.5-shaped vision-language model small enough for CPU tests.

A CLIP vision tower → a 2-layer MLP projector → a Llama decoder (`LlavaForConditionalGeneration`),
with a byte-level BPE tokenizer, a chat template and a `LlavaProcessor`, all written with
`save_pretrained` so `AutoProcessor` / `AutoModelForImageTextToText.from_pretrained` load it like any
LLaVA checkpoint. Its weights are random: it answers with random text, never canned text.

One image becomes (32 / 8)^2 = 16 `<image>` tokens: the processor expands each `<image>` in the prompt
to 16 copies and the model puts the 16 projected patch embeddings there.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from raybooth.models.bpe import VLM_BOS, VLM_EOS, VLM_IMAGE, VLM_PAD, build_chat_tokenizer

IMAGE_SIZE = 32  # pixels per side after the processor's resize + center crop
PATCH_SIZE = 8  # → (32 / 8)^2 = 16 patches, so 16 image tokens per image
MAX_CONTEXT = 1024  # positions in the text model: prompt + image tokens + answer

# LLaVA-1.5's "USER: <image>\n... ASSISTANT:" format. Content may be a string or an OpenAI-style list
# of parts ({"type": "text", "text": ...} and {"type": "image" | "image_url", ...}); each image part
# becomes one `<image>` placeholder, in order. `{{ '\n' }}` because templates render with trim_blocks,
# which would swallow a literal newline after a tag. Tools (Hugging Face's `tools=` argument) are listed
# as JSON in a first SYSTEM turn; an assistant's tool calls follow its text as `<tool_call>{...}</tool_call>`,
# and a tool's result is a TOOL turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}SYSTEM: Functions you may call:{{ '\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}{% endif %}"
    "{% for message in messages %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{% for call in message['tool_calls'] %}<tool_call>{{ call['function'] | tojson }}</tool_call>{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_processor() -> LlavaProcessor:
    """Tokenizer + image processor + chat template, configured like llava-hf's processors."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_chat_tokenizer(),
        bos_token=VLM_BOS,
        eos_token=VLM_EOS,
        pad_token=VLM_PAD,
        extra_special_tokens={"image_token": VLM_IMAGE},
        # Decoder-only batches are padded on the left so every row's last token is its real last token.
        padding_side="left",
        model_max_length=MAX_CONTEXT,
        chat_template=CHAT_TEMPLATE,
    )
    # The PIL backend: torchvision is not a dependency. It saves as "CLIPImageProcessor", so a machine
    # with torchvision loads the torchvision twin of the same config.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",  # drop CLS, keep the patch features
        num_additional_image_tokens=1,  # the CLS token the vision tower adds (and "default" drops)
        chat_template=CHAT_TEMPLATE,
    )


def model_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as modern chat models use
        max_position_embeddings=MAX_CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,  # LLaVA reads the penultimate vision layer
        pad_token_id=tokenizer.pad_token_id,
    )


def write_vlm_folder(dest: Path, seed: int) -> None:
    """Write the processor and a seeded random model into `dest`."""
    processor = build_processor()
    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(model_config(tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(dest)  # safetensors: the only format transformers 5 writes
    processor.save_pretrained(dest)
