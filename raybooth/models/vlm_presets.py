"""The tiny chat-model presets: `tiny-vlm` (LLaVA-1.5 shaped), `tiny-qwen2.5-vl` and `tiny-llm` (text only).

    write_vlm_folder(Path("/tmp/tiny-vlm"), seed=0)            # or write_qwen_vl_folder / write_llm_folder
    AutoModelForImageTextToText.from_pretrained("/tmp/tiny-vlm")

tiny-vlm:

A CLIP vision tower → a 2-layer MLP projector → a Llama decoder (`LlavaForConditionalGeneration`),
with a byte-level BPE tokenizer, a chat template and a `LlavaProcessor`, all written with
`save_pretrained` so `AutoProcessor` / `AutoModelForImageTextToText.from_pretrained` load it like any
LLaVA checkpoint. Its weights are random: it answers with random text, never canned text.

One image becomes (32 / 8)^2 = 16 `<image>` tokens: the processor expands each `<image>` in the prompt
to 16 copies and the model puts the 16 projected patch embeddings there.

tiny-qwen2.5-vl: Qwen2.5-VL's windowed ViT and M-RoPE decoder, ChatML template, the PIL Qwen2-VL image
processor and no video processor (torchvision is not a dependency). Images resize to multiples of 16
pixels within 32x32..64x64, so their token counts differ with their size (4 to 16 tokens).
tiny-llm: the same ChatML tokenizer and a Llama decoder, loaded with `AutoModelForCausalLM`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
)

from raybooth.models.bpe import VLM_BOS, VLM_EOS, VLM_IMAGE, VLM_PAD, build_chat_tokenizer
from raybooth.models.qwen_video_processor import PIL_VIDEO_PROCESSORS, with_pil_video
from raybooth.models.vlm_family import image_only_processor_class

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


def build_image_token_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer with an `<image>` token (tiny-vlm's; tiny-paligemma's, no template)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=build_chat_tokenizer(),
        bos_token=VLM_BOS,
        eos_token=VLM_EOS,
        pad_token=VLM_PAD,
        extra_special_tokens={"image_token": VLM_IMAGE},
        # Decoder-only batches are padded on the left so every row's last token is its real last token.
        padding_side="left",
        model_max_length=MAX_CONTEXT,
        # None would be saved as `"chat_template": null`: leave the key out instead, as checkpoints do
        **({"chat_template": chat_template} if chat_template else {}),
    )


def build_processor() -> LlavaProcessor:
    """Tokenizer + image processor + chat template, configured like llava-hf's processors."""
    tokenizer = build_image_token_tokenizer(CHAT_TEMPLATE)
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


def tiny_vision(image_size: int, patch_size: int, **extra: object) -> dict[str, object]:
    """The vision tower settings the VLM presets share: 2 layers of width 32 with 2 heads."""
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        **extra,
    )


def qwen_vision(out_hidden_size: int, **extra: object) -> dict[str, object]:
    """The Qwen-VL vision tower settings the Qwen presets share: 2 blocks of width 32, QWEN_PATCH patches
    merged QWEN_MERGE x QWEN_MERGE into tokens of the decoder's width."""
    return dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=out_hidden_size,
        patch_size=QWEN_PATCH,
        spatial_merge_size=QWEN_MERGE,
        temporal_patch_size=2,
        **extra,
    )


def qwen_vl_token_ids(ids: dict[str, int]) -> dict[str, int]:
    """The Qwen-VL configs' special token ids (image and video pads, vision start and end)."""
    return dict(
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
    )


def model_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(**tiny_vision(IMAGE_SIZE, PATCH_SIZE, projection_dim=32))
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


# --------------------------------------------------------------------------------------------------
# tiny-qwen2.5-vl and tiny-llm: ChatML-formatted models sharing one tokenizer layout
# --------------------------------------------------------------------------------------------------

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
CHATML_SPECIALS = (IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
QWEN_PATCH = 8  # pixels per vision patch side; 2x2 patches merge into one image token
QWEN_MERGE = 2
# Pixel bounds of the resize (multiples of PATCH * MERGE = 16 per side): 32x32 → 4 tokens, 64x64 → 16.
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 32 * 32, 64 * 64

# Qwen's ChatML: `<|im_start|>role\n...<|im_end|>\n`, an image part as `<|vision_start|><|image_pad|>
# <|vision_end|>` (the processor expands the pad to the image's token count). Tools are listed as JSON in
# a first system turn; an assistant's calls follow its text as `<tool_call>{...}</tool_call>`.
CHATML_TEMPLATE = (
    "{% if tools %}<|im_start|>system{{ '\n' }}Functions you may call:{{ '\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}<|im_end|>{{ '\n' }}{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}{{ '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] in ('video', 'video_url') %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{% for call in message['tool_calls'] %}<tool_call>{{ call['function'] | tojson }}</tool_call>{% endfor %}"
    "{% endif %}"
    "<|im_end|>{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\n' }}{% endif %}"
)


def build_chatml_tokenizer(
    extra_specials: tuple[str, ...] = (), chat_template: str = CHATML_TEMPLATE
) -> PreTrainedTokenizerFast:
    """The byte-level BPE with ChatML's markers; `<|im_end|>` ends a turn, so it is the EOS. Other
    families add their own markers (`extra_specials`, after ChatML's) and template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=build_chat_tokenizer(extra_specials=CHATML_SPECIALS + tuple(extra_specials)),
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids: a decoder reads none
        eos_token=IM_END,
        pad_token=VLM_PAD,
        padding_side="left",
        model_max_length=MAX_CONTEXT,
        # None would be saved as `"chat_template": null`: leave the key out instead, as checkpoints do
        **({"chat_template": chat_template} if chat_template else {}),
    )


def _text_config_args(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """The decoder every tiny chat model shares: 2 layers, 64 wide, grouped-query attention."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_CONTEXT,
        bos_token_id=None,  # ChatML writes no BOS
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _save(model: torch.nn.Module, processor: Any, tokenizer: PreTrainedTokenizerFast, dest: Path) -> None:
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(dest)
    processor.save_pretrained(dest)


def write_llm_folder(dest: Path, seed: int) -> None:
    """`tiny-llm`: a text-only `LlamaForCausalLM` + tokenizer with a chat template (no processor)."""
    tokenizer = build_chatml_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**_text_config_args(tokenizer)))
    _save(model, tokenizer, tokenizer, dest)


def build_qwen_processor(processor: type[ProcessorMixin] = Qwen2_5_VLProcessor) -> ProcessorMixin:
    """Tokenizer + the PIL Qwen2-VL image processor (Qwen2.5-VL's and Qwen3-VL's too) in the Qwen
    `processor` class, with the same settings' PIL video processor (saved under transformers' name for
    it, `Qwen2VLVideoProcessor` or `Qwen3VLVideoProcessor`)."""
    tokenizer = build_chatml_tokenizer()
    settings = dict(patch_size=QWEN_PATCH, merge_size=QWEN_MERGE, temporal_patch_size=2)
    image_processor = Qwen2VLImageProcessorPil(
        **settings, min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS
    )
    if processor.__name__ in PIL_VIDEO_PROCESSORS:
        video_processor = PIL_VIDEO_PROCESSORS[processor.__name__](
            **settings,
            size={"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
            image_mean=image_processor.image_mean,
            image_std=image_processor.image_std,
        )
        return with_pil_video(processor)(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=CHATML_TEMPLATE,
        )
    return image_only_processor_class(processor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHATML_TEMPLATE
    )


def write_qwen_vl_folder(dest: Path, seed: int) -> None:
    """`tiny-qwen2.5-vl`: a `Qwen2_5_VLForConditionalGeneration` (windowed ViT, M-RoPE decoder)."""
    processor = build_qwen_processor()
    tokenizer = processor.tokenizer
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in CHATML_SPECIALS}
    text = _text_config_args(tokenizer)
    # M-RoPE splits each head's 8 rotary frequency pairs over (time, height, width).
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    vision = qwen_vision(
        text["hidden_size"],
        window_size=QWEN_PATCH * QWEN_MERGE * 2,  # 2x2 merged tokens per attention window
        fullatt_block_indexes=[1],
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        **qwen_vl_token_ids(ids),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    _save(model, processor, tokenizer, dest)


# Preset name → the function that writes its folder (presets.build_preset looks it up here).
WRITERS = {
    "tiny-vlm": write_vlm_folder,
    "tiny-qwen2.5-vl": write_qwen_vl_folder,
    "tiny-llm": write_llm_folder,
}
