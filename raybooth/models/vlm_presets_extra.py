"""Tiny presets of the families issue 12 added last: `tiny-qwen3-vl`, `tiny-idefics2`,
`tiny-llava-onevision`, `tiny-paligemma` and `tiny-mistral3`.

    write_qwen3_vl_folder(Path("/tmp/tiny-qwen3-vl"), seed=0)
    AutoModelForImageTextToText.from_pretrained("/tmp/tiny-qwen3-vl")

As in `vlm_presets_more.py`: each is the library's own model class built from its config with tiny sizes
and a fixed seed, saved with its processor (PIL image processors, no video processor: torchvision is not
a dependency), so `from_pretrained` loads it like a real checkpoint. Sizes are picked so two images of
different sizes give different pixel shapes or token counts, which the batching rules must get right.

- tiny-qwen3-vl: Qwen3-VL's ViT (learned position embeddings, deepstack features added to the first
  decoder layer's image tokens) and interleaved M-RoPE decoder; ChatML; 32x32..64x64 pixel bounds.
- tiny-idefics2: SigLIP-style tower + perceiver resampler (4 latents per image whatever its size); images
  keep their own size (16..64 pixels a side) and the batch pads them, with a pixel mask.
- tiny-llava-onevision: SigLIP + Qwen2 decoder; one image per request is AnyRes-cropped (its crop count
  follows its size), several per request are base images only (`batch_num_images` says which).
- tiny-paligemma: SigLIP + Gemma with a bidirectional prefix (`token_type_ids`); no chat template: a
  prefix prompt with one image, as PaliGemma's processor builds it (`<image>...<bos>prompt\\n`).
- tiny-mistral3: a Pixtral tower (2-D rotary patches, images keep their aspect ratio up to 64 pixels a
  side) with Mistral3's 2x2 patch merger and a Mistral decoder; an image is a grid of `[IMG]` tokens with
  `[IMG_BREAK]` after each row and `[IMG_END]` last, so 64x48 and 32x32 images give 15 and 6 tokens.
  Its processor is saved as `PixtralProcessor` (`pixtral_processor.py` loads it without torchvision).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    Idefics2ImageProcessorPil,
    Idefics2Processor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PixtralImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    SiglipImageProcessorPil,
)

from raybooth.models.pixtral_processor import PilPixtralProcessor
from raybooth.models.vlm_family import image_only_processor_class
from raybooth.models.vlm_presets import (
    CHATML_SPECIALS,
    CHATML_TEMPLATE,
    _save,
    _text_config_args,
    build_chatml_tokenizer,
    build_image_token_tokenizer,
    build_qwen_processor,
    qwen_vision,
    qwen_vl_token_ids,
    tiny_vision,
)
from raybooth.models.vlm_presets_more import SMOL_TEMPLATE


def _siglip_vision(image_size: int, patch_size: int) -> dict[str, object]:
    return tiny_vision(image_size, patch_size, model_type="siglip_vision_model")


# --------------------------------------------------------------------------------------------------
# tiny-qwen3-vl
# --------------------------------------------------------------------------------------------------


def write_qwen3_vl_folder(dest: Path, seed: int) -> None:
    """`tiny-qwen3-vl`: a `Qwen3VLForConditionalGeneration` (deepstack ViT, interleaved M-RoPE decoder)."""
    processor = build_qwen_processor(Qwen3VLProcessor)
    tokenizer = processor.tokenizer
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in CHATML_SPECIALS}
    text = _text_config_args(tokenizer)
    text.update(
        head_dim=16,  # 8 rotary frequency pairs, interleaved over (time, height, width)
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
    )
    vision = qwen_vision(
        text["hidden_size"],
        num_position_embeddings=64,  # an 8x8 grid of learned positions, interpolated to each image's grid
        deepstack_visual_indexes=[0],  # layer 0's features also join the decoder's first layer
    )
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        **qwen_vl_token_ids(ids),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    _save(Qwen3VLForConditionalGeneration(config), processor, tokenizer, dest)


# --------------------------------------------------------------------------------------------------
# tiny-idefics2
# --------------------------------------------------------------------------------------------------

IDEFICS2_LATENTS = 4  # image tokens per image: the perceiver's latents, whatever the image's size
IDEFICS2_PATCH = 8
IDEFICS2_MAX_EDGE = 64  # images keep their size within 16..64 pixels a side
IDEFICS2_SPECIALS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>")
# Idefics2's template is SmolVLM's ("User:<image>text<end_of_utterance>\nAssistant:") without its BOS.
IDEFICS2_TEMPLATE = SMOL_TEMPLATE.removeprefix("<|im_start|>")


def write_idefics2_folder(dest: Path, seed: int) -> None:
    """`tiny-idefics2`: an `Idefics2ForConditionalGeneration` (SigLIP-style tower, perceiver, Mistral)."""
    tokenizer = build_chatml_tokenizer(extra_specials=IDEFICS2_SPECIALS, chat_template=IDEFICS2_TEMPLATE)
    tokenizer.eos_token = "<end_of_utterance>"  # a turn ends the answer
    image_processor = Idefics2ImageProcessorPil(
        size={"shortest_edge": 16, "longest_edge": IDEFICS2_MAX_EDGE}, do_image_splitting=False
    )
    processor = Idefics2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=IDEFICS2_LATENTS,
        chat_template=IDEFICS2_TEMPLATE,
    )
    text = {"model_type": "mistral", **_text_config_args(tokenizer)}
    vision = tiny_vision(IDEFICS2_MAX_EDGE, IDEFICS2_PATCH)
    perceiver = dict(
        hidden_size=text["hidden_size"],
        resampler_n_latents=IDEFICS2_LATENTS,
        resampler_depth=1,
        resampler_n_heads=2,
        resampler_head_dim=16,
        num_key_value_heads=1,
    )
    config = Idefics2Config(
        text_config=text,
        vision_config=vision,
        perceiver_config=perceiver,
        image_token_id=processor.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    _save(Idefics2ForConditionalGeneration(config), processor, tokenizer, dest)


# --------------------------------------------------------------------------------------------------
# tiny-llava-onevision
# --------------------------------------------------------------------------------------------------

ONEVISION_TILE = 16  # the SigLIP tower's image size: the base image and every crop, 2x2 patches each
ONEVISION_PATCH = 8
# (h, w) an image is fitted to before it is cut into 16x16 crops: a 40x40 image fits 32x32 (4 crops + the
# base), a 64x48 one 48x64 (12 + 1).
ONEVISION_PINPOINTS = [[32, 32], [32, 48], [48, 32], [48, 48], [48, 64], [64, 48]]
ONEVISION_SPECIALS = ("<image>", "<video>")
# LLaVA-OneVision's Qwen2 ChatML: an image part is `<image>` (the processor expands it).
ONEVISION_TEMPLATE = CHATML_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")


def write_llava_onevision_folder(dest: Path, seed: int) -> None:
    """`tiny-llava-onevision`: a `LlavaOnevisionForConditionalGeneration` (SigLIP, AnyRes crops, Qwen2)."""
    tokenizer = build_chatml_tokenizer(extra_specials=ONEVISION_SPECIALS, chat_template=ONEVISION_TEMPLATE)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": ONEVISION_TILE, "width": ONEVISION_TILE}, image_grid_pinpoints=ONEVISION_PINPOINTS
    )
    processor = image_only_processor_class(LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(ONEVISION_TILE // ONEVISION_PATCH) ** 2,
        vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
        chat_template=ONEVISION_TEMPLATE,
    )
    config = LlavaOnevisionConfig(
        vision_config=_siglip_vision(ONEVISION_TILE, ONEVISION_PATCH),
        text_config={"model_type": "qwen2", **_text_config_args(tokenizer)},
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    _save(LlavaOnevisionForConditionalGeneration(config), processor, tokenizer, dest)


# --------------------------------------------------------------------------------------------------
# tiny-paligemma
# --------------------------------------------------------------------------------------------------

PALIGEMMA_IMAGE = 32  # every image is resized to 32x32: (32 / 8)^2 = 16 image tokens
PALIGEMMA_PATCH = 8


def write_paligemma_folder(dest: Path, seed: int) -> None:
    """`tiny-paligemma`: a `PaliGemmaForConditionalGeneration` (SigLIP + Gemma, bidirectional prefix).
    No chat template: PaliGemma reads a prefix prompt (`caption en`, a question) after its image."""
    tokenizer = build_image_token_tokenizer(chat_template=None)
    image_processor = SiglipImageProcessorPil(
        size={"height": PALIGEMMA_IMAGE, "width": PALIGEMMA_IMAGE},
        image_seq_length=(PALIGEMMA_IMAGE // PALIGEMMA_PATCH) ** 2,
    )
    # The processor adds PaliGemma's <loc....>/<seg...> tokens to the tokenizer: size the model after it.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = _text_config_args(tokenizer)
    text.update(model_type="gemma", head_dim=16, bos_token_id=tokenizer.bos_token_id)
    config = PaliGemmaConfig(
        vision_config={
            **_siglip_vision(PALIGEMMA_IMAGE, PALIGEMMA_PATCH),
            "projection_dim": text["hidden_size"],
        },
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        vocab_size=len(tokenizer),
        projection_dim=text["hidden_size"],
        hidden_size=text["hidden_size"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    _save(PaliGemmaForConditionalGeneration(config), processor, tokenizer, dest)


# --------------------------------------------------------------------------------------------------
# tiny-mistral3
# --------------------------------------------------------------------------------------------------

PIXTRAL_PATCH = 8  # pixels per vision patch side; the projector merges 2x2 patches into one image token
PIXTRAL_MERGE = 2
PIXTRAL_MAX_EDGE = 64
PIXTRAL_SPECIALS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")
# ChatML with Pixtral's image placeholder (the processor expands it to the image's token grid).
PIXTRAL_TEMPLATE = CHATML_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "[IMG]")


def write_mistral3_folder(dest: Path, seed: int) -> None:
    """`tiny-mistral3`: a `Mistral3ForConditionalGeneration` (Pixtral tower, patch merger, Mistral)."""
    tokenizer = build_chatml_tokenizer(extra_specials=PIXTRAL_SPECIALS, chat_template=PIXTRAL_TEMPLATE)
    image_processor = PixtralImageProcessorPil(
        size={"longest_edge": PIXTRAL_MAX_EDGE},
        patch_size={"height": PIXTRAL_PATCH, "width": PIXTRAL_PATCH},
    )
    processor = PilPixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PIXTRAL_PATCH,
        spatial_merge_size=PIXTRAL_MERGE,
        chat_template=PIXTRAL_TEMPLATE,
    )
    vision = tiny_vision(PIXTRAL_MAX_EDGE, PIXTRAL_PATCH, model_type="pixtral", head_dim=16)
    config = Mistral3Config(
        vision_config=vision,
        text_config={"model_type": "mistral", **_text_config_args(tokenizer)},
        image_token_index=processor.image_token_id,
        spatial_merge_size=PIXTRAL_MERGE,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    _save(Mistral3ForConditionalGeneration(config), processor, tokenizer, dest)


# Preset name → the function that writes its folder (presets.build_preset looks it up here).
WRITERS = {
    "tiny-qwen3-vl": write_qwen3_vl_folder,
    "tiny-idefics2": write_idefics2_folder,
    "tiny-llava-onevision": write_llava_onevision_folder,
    "tiny-paligemma": write_paligemma_folder,
    "tiny-mistral3": write_mistral3_folder,
}
