"""Tiny presets of the families whose images become tiles, crops or patch grids of their own size:
`tiny-smolvlm` (Idefics3), `tiny-llava-next`, `tiny-mllama`, and the encoder-decoder `tiny-florence2`.

    write_smolvlm_folder(Path("/tmp/tiny-smolvlm"), seed=0)
    AutoModelForImageTextToText.from_pretrained("/tmp/tiny-smolvlm")

Each is the library's own model class built from its config with tiny sizes and a fixed seed, saved with
its processor (the PIL image processors: torchvision is not a dependency), so `from_pretrained` loads it
like a real checkpoint of its family. The sizes are picked so two images of different sizes give
different tile or patch counts: that is what the engine's per-family batching rules must get right.

tiny-smolvlm: SmolVLM-Instruct's architecture (`Idefics3ForConditionalGeneration`; SmolVLM2's `smolvlm`
model type needs the `num2words` package for its processor). Images are resized to a longest edge of
64 pixels and split into 32x32 tiles plus one global tile, 4 image tokens each, so a 64x48 image is 5
tiles and a 32x32 one is 1.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BartConfig,
    CLIPImageProcessorPil,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    Florence2VisionConfig,
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessorPil,
    MllamaProcessor,
    PreTrainedTokenizerFast,
)

from raybooth.models.bpe import VLM_BOS, VLM_EOS, VLM_IMAGE, VLM_PAD, build_chat_tokenizer
from raybooth.models.vlm_presets import (
    CHAT_TEMPLATE,
    CHATML_TEMPLATE,
    MAX_CONTEXT,
    _save,
    _text_config_args,
    build_chatml_tokenizer,
    tiny_vision,
)
from raybooth.models.vlm_presets import build_processor as build_llava_processor

# --------------------------------------------------------------------------------------------------
# tiny-smolvlm (Idefics3)
# --------------------------------------------------------------------------------------------------

SMOL_TILE = 32  # pixels per tile side (the vision tower's image size)
SMOL_PATCH = 8  # → 4x4 patches per tile, pixel-shuffled by 2 → 4 image tokens per tile
SMOL_SCALE = 2
SMOL_LONGEST_EDGE = 64  # images resize to this longest edge first: at most 2x2 tiles + the global one
# Idefics3's row/column markers; the processor looks up every <row_i_col_j> up to 6x6.
SMOL_SPECIALS = (
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)

# SmolVLM's template: "User:<image>text<end_of_utterance>\nAssistant:"; tools as a first system turn.
SMOL_TEMPLATE = (
    "<|im_start|>"
    "{% if tools %}System: Functions you may call:{{ '\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}<end_of_utterance>{{ '\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<image>"
    "{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{% for call in message['tool_calls'] %}<tool_call>{{ call['function'] | tojson }}</tool_call>{% endfor %}"
    "{% endif %}"
    "<end_of_utterance>{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_smolvlm_processor() -> Idefics3Processor:
    tokenizer = build_chatml_tokenizer(extra_specials=SMOL_SPECIALS, chat_template=SMOL_TEMPLATE)
    tokenizer.eos_token = "<end_of_utterance>"  # a turn ends the answer
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": SMOL_LONGEST_EDGE},
        max_image_size={"longest_edge": SMOL_TILE},
        do_image_splitting=True,
    )
    tokens_per_tile = (SMOL_TILE // SMOL_PATCH) ** 2 // SMOL_SCALE**2
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=tokens_per_tile,
        chat_template=SMOL_TEMPLATE,
    )


def write_smolvlm_folder(dest: Path, seed: int) -> None:
    """`tiny-smolvlm`: an `Idefics3ForConditionalGeneration` (SigLIP-style tower, pixel shuffle, Llama)."""
    processor = build_smolvlm_processor()
    tokenizer = processor.tokenizer
    text = _text_config_args(tokenizer)
    vision = tiny_vision(SMOL_TILE, SMOL_PATCH)
    config = Idefics3Config(
        text_config={"model_type": "llama", **text},
        vision_config=vision,
        scale_factor=SMOL_SCALE,
        image_token_id=processor.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    _save(Idefics3ForConditionalGeneration(config), processor, tokenizer, dest)


# --------------------------------------------------------------------------------------------------
# tiny-llava-next
# --------------------------------------------------------------------------------------------------

NEXT_TILE = 16  # the CLIP tower's image size: the base image and every crop are 16x16, 2x2 patches each
NEXT_PATCH = 8
# The resolutions (h, w) an image is fitted to before it is cut into 16x16 crops: a 40x40 image fits
# 48x48 (9 crops + the base image), a 64x48 one 48x64 (12 + 1), so rows differ in their patch count.
NEXT_PINPOINTS = [[48, 48], [48, 64], [64, 48], [64, 64]]


def _clip_vision(**overrides: int) -> dict[str, object]:
    return tiny_vision(NEXT_TILE, NEXT_PATCH, model_type="clip_vision_model", projection_dim=32, **overrides)


def write_llava_next_folder(dest: Path, seed: int) -> None:
    """`tiny-llava-next`: a `LlavaNextForConditionalGeneration` (AnyRes crops, `image_sizes`), tiny-vlm's
    tokenizer and LLaVA template."""
    tokenizer = build_llava_processor().tokenizer
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": NEXT_TILE},
        crop_size={"height": NEXT_TILE, "width": NEXT_TILE},
        image_grid_pinpoints=NEXT_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=NEXT_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, which "default" drops
        chat_template=CHAT_TEMPLATE,
    )
    text = {"model_type": "llama", **_text_config_args(tokenizer), "bos_token_id": tokenizer.bos_token_id}
    config = LlavaNextConfig(
        vision_config=_clip_vision(),
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        image_grid_pinpoints=NEXT_PINPOINTS,
        image_seq_length=(NEXT_TILE // NEXT_PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    _save(LlavaNextForConditionalGeneration(config), processor, tokenizer, dest)


# --------------------------------------------------------------------------------------------------
# tiny-mllama
# --------------------------------------------------------------------------------------------------

MLLAMA_TILE = 16  # pixels per tile side; an image becomes up to 4 tiles (its aspect ratio picks how many)
MLLAMA_PATCH = 8  # → 2x2 patches per tile (+ a CLS token): 5 vision tokens per tile
MLLAMA_SPECIALS = ("<|image|>", "<|python_tag|>")

# ChatML with Llama 3.2 Vision's image marker: the image token sits where the image part is, and every
# text token after it cross-attends to that image (the processor's cross_attention_mask).
# The processor insists on a BOS (Llama's <|begin_of_text|>), so the template writes one.
MLLAMA_TEMPLATE = "{{ bos_token }}" + CHATML_TEMPLATE.replace(
    "<|vision_start|><|image_pad|><|vision_end|>", "<|image|>"
)


def write_mllama_folder(dest: Path, seed: int) -> None:
    """`tiny-mllama`: a `MllamaForConditionalGeneration` (tiled vision encoder, cross-attention layers in
    a Llama decoder), ChatML tokenizer with `<|image|>`."""
    tokenizer = build_chatml_tokenizer(extra_specials=MLLAMA_SPECIALS, chat_template=MLLAMA_TEMPLATE)
    tokenizer.bos_token = VLM_BOS
    image_processor = MllamaImageProcessorPil(
        size={"height": MLLAMA_TILE, "width": MLLAMA_TILE}, max_image_tiles=4
    )
    processor = MllamaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=MLLAMA_TEMPLATE
    )
    text = _text_config_args(tokenizer)
    text.update(
        num_hidden_layers=3, cross_attention_layers=[1], bos_token_id=tokenizer.bos_token_id
    )  # self, cross, self
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        image_size=MLLAMA_TILE,
        patch_size=MLLAMA_PATCH,
        max_num_tiles=4,
        intermediate_layers_indices=[0],
        vision_output_dim=64,  # hidden_size x (1 + len(intermediate_layers_indices))
    )
    config = MllamaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config)
    # The cross-attention gates start at 0 (tanh(0) = 0: images would change nothing); open them so the
    # tiny model's answers depend on its images, as a trained one's do.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(1.0)
    _save(model, processor, tokenizer, dest)


# --------------------------------------------------------------------------------------------------
# tiny-florence2 (encoder-decoder)
# --------------------------------------------------------------------------------------------------

FLORENCE_IMAGE = 32  # every image is resized to 32x32; DaViT strides 4 then 2 → a 4x4 feature map
FLORENCE_IMAGE_TOKENS = 4 * 4 + 1  # the map's 16 positions + their mean (Florence-2's projector)


def write_florence2_folder(dest: Path, seed: int) -> None:
    """`tiny-florence2`: a `Florence2ForConditionalGeneration` (DaViT vision tower, BART encoder-decoder).
    No chat template: the prompt is a task token such as `<CAPTION>`, which the processor expands."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_chat_tokenizer(),
        bos_token=VLM_BOS,
        eos_token=VLM_EOS,
        pad_token=VLM_PAD,
        extra_special_tokens={"image_token": VLM_IMAGE},
        model_max_length=MAX_CONTEXT,
    )
    image_processor = CLIPImageProcessorPil(
        size={"height": FLORENCE_IMAGE, "width": FLORENCE_IMAGE},
        do_center_crop=False,
        image_seq_length=FLORENCE_IMAGE_TOKENS,
    )
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    vision = Florence2VisionConfig(
        depths=(1, 1),
        patch_size=(7, 3),
        patch_stride=(4, 2),
        patch_padding=(3, 1),
        patch_prenorm=(False, True),
        embed_dim=(16, 32),
        num_heads=(1, 2),
        num_groups=(1, 2),
        window_size=2,
        drop_path_rate=0.0,
        projection_dim=64,
    )
    text = BartConfig(
        vocab_size=len(tokenizer),
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=MAX_CONTEXT,
        dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,  # BART starts decoding from EOS
        forced_eos_token_id=None,
        # Untied: with the LM head equal to the embeddings a random model repeats its input token, and
        # from the decoder's start token (EOS) that would end every answer at once.
        tie_word_embeddings=False,
    )
    config = Florence2Config(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.image_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(dest)
    processor.save_pretrained(dest)


# Preset name → the function that writes its folder (presets.build_preset looks it up here).
WRITERS = {
    "tiny-smolvlm": write_smolvlm_folder,
    "tiny-llava-next": write_llava_next_folder,
    "tiny-mllama": write_mllama_folder,
    "tiny-florence2": write_florence2_folder,
}
