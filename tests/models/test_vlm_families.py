"""The engine on each family preset, against HF: tiny-qwen2.5-vl and tiny-qwen3-vl (M-RoPE, per-image
patch grids; Qwen3's deepstack), tiny-smolvlm (per-request tile counts), tiny-idefics2 (images of their
own pixel size), tiny-llava-next and tiny-llava-onevision (per-image crop counts; OneVision's base-only
multi-image rows), tiny-mllama (cross-attention to each row's own images), tiny-florence2
(encoder-decoder, task prompts), tiny-paligemma (prefix prompt, bidirectional prefix), tiny-mistral3
(Pixtral's token grids, images at their own size), tiny-llm.

.venv/bin/python -m pytest tests/models/test_vlm_families.py

The oracle is Hugging Face itself: `model.generate` and `model(...)` on each request alone, with the
inputs the family's processor returns. A mixed batch (text only, one image, two images of different sizes;
one row ending early) must give every row the tokens it gets alone, so batching, padding, positions, the
image inputs and dropping finished rows all have to be right per row.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import Blip2Config

from raybooth.cluster.workdir import default_models_dir
from raybooth.errors import ModelError
from raybooth.models import loaders
from raybooth.models.decoding import SamplingParams
from raybooth.models.loaders import load_vlm
from raybooth.models.presets import resolve_model
from raybooth.models.vlm_engine import GenerationRequest, VLMEngine
from raybooth.models.vlm_family import (
    LLAVA,
    PALIGEMMA,
    InputRule,
    collate_inputs,
    detect_family,
    replace_rule,
)
from raybooth.models.vlm_requests import takes_task_prompts
from raybooth.pipelines.inference import prepared_columns, prepared_from_row
from raybooth.samples import draw_sample_image

MAX_TOKENS = 8
# float32 on CPU: the batched prefill and the lone forward differ only by summation order over pads.
LOGITS_ATOL = 1e-5


VISION_PRESETS = [
    "tiny-qwen2.5-vl",
    "tiny-qwen3-vl",
    "tiny-smolvlm",
    "tiny-idefics2",
    "tiny-llava-next",
    "tiny-llava-onevision",
    "tiny-mllama",
    "tiny-florence2",
    "tiny-paligemma",
    "tiny-mistral3",
]


@functools.cache
def load_engine(name: str) -> VLMEngine:
    """Each preset loads once for the module, whichever fixture asks for it."""
    path = resolve_model(name, kind="vlm", models_dir=default_models_dir())
    return VLMEngine.from_pretrained(path, device="cpu")


@pytest.fixture(scope="module", params=[*VISION_PRESETS, "tiny-llm"])
def engine(request) -> VLMEngine:
    return load_engine(request.param)


@pytest.fixture(scope="module", params=VISION_PRESETS)
def vision_engine(request) -> VLMEngine:
    return load_engine(request.param)


def chat(*parts, **params) -> GenerationRequest:
    params = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "logprobs": 0, **params}
    return GenerationRequest(
        messages=[{"role": "user", "content": list(parts)}], params=SamplingParams(**params)
    )


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(i: int, size: tuple[int, int]) -> dict:
    return {"type": "image", "image": draw_sample_image(i).resize(size)}


def images_request(engine: VLMEngine) -> tuple[GenerationRequest, int]:
    """Two images of different sizes (so different token counts); one, with a task prompt, for a model
    that reads task prompts (Florence-2)."""
    if takes_task_prompts(engine.processor):
        return chat(image(1, (64, 48)), text("<DETAILED_CAPTION>")), 1
    return chat(image(1, (64, 48)), text("What color is the cat?"), image(2, (32, 32))), 2


def text_row(engine: VLMEngine, prompt: str, **params) -> GenerationRequest:
    """A text-only row; PaliGemma reads every prompt after an image (its processor refuses none), so its
    "text" rows carry one."""
    if engine.family is PALIGEMMA:
        return chat(image(3, (48, 40)), text(prompt), **params)
    return chat(text(prompt), **params)


def mixed_batch(engine: VLMEngine) -> list[GenerationRequest]:
    """Text only (short and long), one image, and `images_request`."""
    # The first row's budget ends it early: it leaves the batch (and the KV cache) while the others run on.
    rows = [
        text_row(engine, "hi", max_tokens=3),
        text_row(engine, "What is in the image? Describe the dog and the cat. " * 3),
    ]
    if engine.family.takes_images:
        task = takes_task_prompts(engine.processor)
        rows += [
            chat(image(0, (40, 40)), text("<CAPTION>" if task else "Describe the image.")),
            images_request(engine)[0],
        ]
    if (
        getattr(engine.processor, "video_processor", None) is not None
    ):  # Qwen2-VL / 2.5-VL without torchvision too
        frames = [draw_sample_image(i).resize((48, 32)) for i in (4, 5, 6)]  # 3 frames: padded to 4
        rows.append(chat({"type": "video", "video": frames, "fps": 2.0}, text("What happens?")))
    return rows


def hf_alone(engine: VLMEngine, request: GenerationRequest) -> tuple[list[int], list[float], torch.Tensor]:
    """HF `generate`'s greedy tokens and their log-probabilities (every decode step's positions and cache
    count in them), and its forward's last-position logits, for the request alone."""
    prepared = engine.prepare(request)
    ids = torch.tensor([prepared.input_ids])
    # What the family drops is no model input (a text LLM's token_type_ids, PaliGemma's training labels).
    rules = engine.family.rules
    inputs = {k: v for k, v in prepared.inputs.items() if k not in rules or rules[k].batching != "drop"}
    if engine.family.encoder_decoder:  # the decoder's first input: its start token
        inputs["decoder_input_ids"] = torch.tensor([[engine.model.generation_config.decoder_start_token_id]])
    with torch.inference_mode():
        logits = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs).logits[0, -1]
        inputs.pop("decoder_input_ids", None)
        out = engine.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **inputs,
            max_new_tokens=request.params.max_tokens,
            do_sample=False,
            pad_token_id=engine.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    # A decoder-only model's sequences continue the prompt; an encoder-decoder's start from the start token.
    tokens = out.sequences[0, 1 if engine.family.encoder_decoder else ids.shape[1] :].tolist()
    eos = [i for i, t in enumerate(tokens) if t in engine.eos_token_ids]
    tokens = tokens[: eos[0] + 1] if eos else tokens
    logprobs = [
        torch.log_softmax(step[0].float(), dim=-1)[t].item()
        for step, t in zip(out.logits, tokens, strict=False)
        if t not in engine.eos_token_ids
    ]
    return tokens, logprobs, logits.float()


def test_mixed_batch_gives_each_row_hf_generate_tokens_alone(engine):
    requests = mixed_batch(engine)
    results = engine.generate(requests)
    for request, result in zip(requests, results, strict=True):
        assert result.error is None
        tokens, logprobs, _ = hf_alone(engine, request)
        assert result.token_ids == tokens
        # Each decode step's log-probability too: wrong positions after the prompt would shift them.
        assert [e.logprob for e in result.logprobs] == pytest.approx(logprobs, abs=LOGITS_ATOL)


def test_last_prefill_logits_match_hf_forward(engine):
    requests = mixed_batch(engine)
    logits, _ = engine._prefill([engine.prepare(r) for r in requests])
    for b, request in enumerate(requests):
        _, _, expected = hf_alone(engine, request)
        torch.testing.assert_close(logits[b], expected, atol=LOGITS_ATOL, rtol=0)


def test_seeded_sampling_gives_a_row_the_same_tokens_whatever_its_batch(engine):
    sampled = text_row(
        engine, "Write a short caption for this photo.", temperature=0.9, seed=7, max_tokens=12
    )
    alone = engine.generate([sampled])[0].token_ids
    in_batch = engine.generate([*mixed_batch(engine), sampled])[-1].token_ids
    assert in_batch == alone and len(alone) > 1


def test_qwen_rows_count_images_not_patches_and_survive_the_prepared_row_format():
    path = resolve_model("tiny-qwen2.5-vl", kind="vlm", models_dir=default_models_dir())
    engine = VLMEngine.from_pretrained(path, device="cpu")
    two = engine.prepare(chat(image(1, (64, 48)), text("hi"), image(2, (32, 32))))
    assert two.num_images == 2 and two.inputs["pixel_values"].shape[0] > 2  # Qwen: one row per patch
    assert two.inputs["image_grid_thw"].tolist() == [[1, 6, 8], [1, 4, 4]]  # (t, h, w) patches per image
    back = prepared_from_row(prepared_columns(two, None, 0.0))
    assert back.num_images == 2 and back.input_ids == two.input_ids
    for name, tensor in two.inputs.items():
        assert back.inputs[name].dtype == tensor.dtype and torch.equal(back.inputs[name], tensor)


def test_rows_count_images_not_tiles_and_survive_the_prepared_row_format(vision_engine):
    request, count = images_request(vision_engine)
    two = vision_engine.prepare(request)
    assert two.num_images == count and two.inputs  # what packing and limits count, whatever the tile count
    back = prepared_from_row(prepared_columns(two, None, 0.0))
    assert (
        back.num_images == count and back.input_ids == two.input_ids and set(back.inputs) == set(two.inputs)
    )
    for name, tensor in two.inputs.items():
        assert back.inputs[name].dtype == tensor.dtype and torch.equal(back.inputs[name], tensor)


def test_text_only_model_refuses_an_image_part():
    path = resolve_model("tiny-llm", kind="vlm", models_dir=default_models_dir())
    engine = VLMEngine.from_pretrained(path, device="cpu")
    fine, refused = engine.generate([chat(text("hi")), chat(image(0, (32, 32)), text("hi"))])
    assert fine.error is None and fine.completion_tokens > 0
    assert refused.error_type == "invalid_request_error"
    assert refused.error.startswith("model tiny-llm takes no images")


def test_unsupported_family_is_refused_at_load_in_one_line(tmp_path):
    Blip2Config().save_pretrained(tmp_path)  # a config, no weights: refused before any weight is read
    with pytest.raises(ModelError) as info:
        load_vlm(str(tmp_path), device="cpu")
    message = str(info.value)
    assert "\n" not in message and "'blip-2'" in message
    assert "supported families" in message and "qwen2_5_vl" in message and "llava" in message
    with pytest.raises(ModelError, match="not supported"):
        detect_family(Blip2Config())


def test_pixtral_processor_without_torchvision_lays_each_image_out_as_its_token_grid():
    # transformers' PixtralProcessor cannot be imported without torchvision; the PIL one must give the
    # layout the model reads: per row of merged patches, one [IMG] each, then [IMG_BREAK]; [IMG_END] last.
    engine = load_engine("tiny-mistral3")
    processor, tokenizer = engine.processor, engine.processor.tokenizer
    if importlib.util.find_spec("torchvision") is None:
        assert type(processor).__name__ == "PilPixtralProcessor"
    path = resolve_model("tiny-mistral3", kind="vlm", models_dir=default_models_dir())
    saved = json.loads((Path(path) / "processor_config.json").read_text())
    assert saved["processor_class"] == "PixtralProcessor"  # what a checkpoint names; loads it elsewhere
    prepared = engine.prepare(chat(image(1, (64, 48)), text("hi"), image(2, (32, 32))))
    pieces = tokenizer.convert_ids_to_tokens(prepared.input_ids)
    grid = "".join(p for p in pieces if p.startswith("[IMG"))
    wide = ("[IMG]" * 4 + "[IMG_BREAK]") * 2 + "[IMG]" * 4 + "[IMG_END]"  # 64x48: 3 rows of 4 tokens
    small = "[IMG]" * 2 + "[IMG_BREAK]" + "[IMG]" * 2 + "[IMG_END]"  # 32x32: 2 rows of 2
    assert grid == wide + small
    assert prepared.inputs["image_sizes"].tolist() == [[48, 64], [32, 32]]
    assert tuple(prepared.inputs["pixel_values"].shape) == (2, 3, 48, 64)  # padded to the row's largest


def test_collate_rules_left_pad_token_outputs_concat_images_and_pad_per_request_axes():
    rows = [
        {"token_type_ids": torch.tensor([[0, 1]]), "pixel_values": torch.ones(1, 2, 3)},
        {"token_type_ids": torch.tensor([[1, 1, 0]]), "pixel_values": torch.ones(2, 4, 1)},
        {},  # a text-only row has none of them
    ]
    family = replace_rule(LLAVA, "pixel_values", InputRule("pad"))
    prefill, decode = collate_inputs(family, rows, lengths=[2, 3, 1], longest=3)
    assert prefill["token_type_ids"].tolist() == [[0, 0, 1], [1, 1, 0], [0, 0, 0]]
    assert prefill["pixel_values"].shape == (3, 4, 3)  # rows' images in order, padded to the largest
    assert (
        prefill["pixel_values"][0, 2:].abs().sum() == 0 and prefill["pixel_values"][1, :, 1:].abs().sum() == 0
    )
    assert decode == {}  # prefill only, as HF generate passes them
    stepwise = replace_rule(family, "token_type_ids", InputRule("token", decode=True))
    _, decode = collate_inputs(stepwise, rows, lengths=[2, 3, 1], longest=3)
    assert list(decode) == ["token_type_ids"]


def test_collate_stacks_one_slot_per_row_and_left_pads_per_token_masks_with_their_trailing_axes():
    rows = [
        {
            "pixel_values": torch.ones(1, 1, 2),
            "cross_attention_mask": torch.ones(1, 2, 1, 4, dtype=torch.long),
        },
        {},  # text only: an all-zero slot, so the batch's rows and the vision rows stay aligned
        {
            "pixel_values": torch.ones(1, 2, 2),
            "cross_attention_mask": torch.ones(1, 3, 2, 4, dtype=torch.long),
        },
    ]
    family = replace_rule(
        replace_rule(LLAVA, "pixel_values", InputRule("stack")), "cross_attention_mask", InputRule("token")
    )
    prefill, _ = collate_inputs(family, rows, lengths=[2, 1, 3], longest=3)
    assert prefill["pixel_values"].shape == (3, 2, 2)
    assert prefill["pixel_values"].sum(dim=(1, 2)).tolist() == [2, 0, 4]
    masks = prefill["cross_attention_mask"]  # (B, T, N_img, N_tiles)
    assert masks.shape == (3, 3, 2, 4)
    assert masks[0, 1:, 0].all() and not masks[0, 0].any() and not masks[0, :, 1].any()  # left pad, pad image
    assert not masks[1].any() and masks[2].all()


def test_task_prompt_model_refuses_two_images_and_a_conversation_per_row():
    engine = load_engine("tiny-florence2")
    conversation = chat(text("<CAPTION>"))
    conversation.messages.insert(0, {"role": "system", "content": "be brief"})
    fine, two, talk, bad_task = engine.generate(
        [
            chat(image(0, (40, 40)), text("<CAPTION>")),
            chat(image(0, (40, 40)), text("<CAPTION>"), image(1, (32, 32))),
            conversation,
            chat(image(0, (40, 40)), text("<CAPTION> and more")),  # Florence-2's processor refuses it
        ]
    )
    assert fine.error is None and fine.completion_tokens > 0
    assert two.error_type == "invalid_request_error" and "one image per request, got 2" in two.error
    assert talk.error_type == "invalid_request_error" and "single user message" in talk.error
    assert bad_task.error_type == "invalid_request_error" and "<CAPTION>" in bad_task.error


def test_prefix_prompt_model_reads_one_image_then_its_prompt_and_refuses_the_rest():
    engine = load_engine("tiny-paligemma")
    conversation = chat(image(0, (40, 40)), text("caption en"))
    conversation.messages.append({"role": "assistant", "content": "a cat"})
    fine = engine.prepare(chat(image(0, (40, 40)), text("caption en")))
    tokenizer = engine.tokenizer
    # PaliGemma's layout: the image tokens, BOS, the prefix and a newline, all in the bidirectional prefix.
    assert fine.input_ids[:17] == [engine.model.config.image_token_index] * 16 + [tokenizer.bos_token_id]
    assert tokenizer.decode(fine.input_ids[17:]) == "caption en\n"
    assert fine.inputs["token_type_ids"].tolist() == [[0] * fine.prompt_tokens] and "labels" in fine.inputs
    text_only, two, talk = engine.generate(
        [chat(text("caption en")), chat(image(0, (40, 40)), text("hi"), image(1, (32, 32))), conversation]
    )
    assert text_only.error_type == "invalid_request_error" and "images" in text_only.error
    assert two.error_type == "invalid_request_error" and "one image per request, got 2" in two.error
    assert talk.error_type == "invalid_request_error" and "single user message" in talk.error


def test_processor_built_without_its_video_part_keeps_its_own_settings():
    # The fallback for processors whose video part needs torchvision (SmolVLM2, Qwen-VL) must keep what
    # processor_config.json sets, e.g. image tokens per tile; the default (169) would break every prompt.
    path = resolve_model("tiny-smolvlm", kind="vlm", models_dir=default_models_dir())
    processor = loaders._image_only_processor(path, {})
    assert processor.image_seq_len == 4 and type(processor).__name__ == "Idefics3Processor"
    # A processor written without its video part saves its own settings too (LLaVA-OneVision's image
    # tokens per crop, without which it cannot count an image's tokens).
    path = resolve_model("tiny-llava-onevision", kind="vlm", models_dir=default_models_dir())
    processor = loaders._image_only_processor(path, {})
    assert processor.num_image_tokens == 4 and processor.vision_feature_select_strategy == "full"
