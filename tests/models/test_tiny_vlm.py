"""tiny-vlm: a LLaVA checkpoint the Auto classes load, with a chat template and batched greedy decoding."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from raybooth.cluster.workdir import default_models_dir
from raybooth.errors import ModelError
from raybooth.models import load_vlm

IMAGE_TOKENS = 16  # (32 px / 8 px patches)^2


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def images(n: int) -> list[Image.Image]:
    # Different sizes and colours: the processor resizes and crops every one to 32x32.
    return [Image.new("RGB", (40 + 7 * i, 30 + 3 * i), (30 * i % 256, 90, 200 - 20 * i)) for i in range(n)]


def test_loads_through_the_auto_classes(tiny_vlm_path):
    processor = AutoProcessor.from_pretrained(tiny_vlm_path)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_path)
    assert isinstance(processor, LlavaProcessor) and isinstance(model, LlavaForConditionalGeneration)
    tokenizer = processor.tokenizer
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.image_token_id == model.config.image_token_id == 3
    assert tokenizer.padding_side == "left"
    assert model.config.text_config.vocab_size == len(tokenizer)


def test_chat_template_renders_openai_content_parts(tiny_vlm_path):
    _, processor = load_vlm("tiny-vlm", device="cpu", models_dir=default_models_dir())
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
        {"role": "user", "content": "And the colour?"},
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        "<s>SYSTEM: Be brief.\nUSER: <image>\nWhat is it?\nASSISTANT: A dog.</s>\nUSER: And the colour?\nASSISTANT:"
    )
    assert not processor.apply_chat_template(messages).endswith("ASSISTANT:")


def test_processor_expands_each_image_to_its_tokens(tiny_vlm_path):
    _, processor = load_vlm(str(tiny_vlm_path), device="cpu")
    prompt = processor.apply_chat_template(ask("Describe the image."), add_generation_prompt=True)
    batch = processor(images=images(2), text=[prompt, prompt], return_tensors="pt", padding=True)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    per_row = (batch["input_ids"] == processor.tokenizer.image_token_id).sum(dim=1)
    assert per_row.tolist() == [IMAGE_TOKENS, IMAGE_TOKENS]
    assert (batch["input_ids"][:, 0] == processor.tokenizer.bos_token_id).all()  # one BOS, from the template


def test_batched_greedy_generate_is_deterministic_with_left_padding(tiny_vlm_path):
    model, processor = load_vlm("tiny-vlm", device="cpu", models_dir=default_models_dir())
    questions = [
        "Describe the image.",
        "What color is the cat in this photo?",
        "How many dogs are there? " * 3,
    ]
    prompts = [processor.apply_chat_template(ask(q), add_generation_prompt=True) for q in questions]
    batch = processor(images=images(3), text=prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()  # padded on the left

    def generate(inputs) -> torch.Tensor:
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        return out[:, inputs["input_ids"].shape[1] :]  # (B, 8): only the new tokens

    first = generate(batch)
    assert first.shape == (3, 8)
    assert torch.equal(first, generate(batch))
    # Padding must not change an answer: each row matches the same request run alone.
    for i, prompt in enumerate(prompts):
        alone = processor(images=images(3)[i : i + 1], text=[prompt], return_tensors="pt")
        assert torch.equal(generate(alone)[0], first[i])
    assert processor.batch_decode(first, skip_special_tokens=True)[0]  # random text, but text


def test_vlm_load_errors_name_the_fix(tiny_sd_path, monkeypatch):
    with pytest.raises(ModelError, match="preset 'tiny-sd' is a Stable Diffusion pipeline"):
        load_vlm("tiny-sd", models_dir=default_models_dir())
    from raybooth.models import loaders

    monkeypatch.setattr(loaders, "hub_reachable", lambda: False)
    with pytest.raises(ModelError, match="'raybooth-tests/not-a-vlm'.*cannot be reached"):
        load_vlm("raybooth-tests/not-a-vlm", device="cpu")
