"""What the processor will make of an image: its resize rule read generically, and thin images refused before it.

.venv/bin/python -m pytest tests/models/test_image_budget.py
"""

from __future__ import annotations

import io
import time
import tracemalloc
from types import SimpleNamespace

import pytest
from PIL import Image

from raybooth.models.decoding import SamplingParams
from raybooth.models.image_budget import check_image_budget, resized_size
from raybooth.models.images import ImageError, ImageLimits, decode_image
from raybooth.models.vlm_engine import INVALID_REQUEST, GenerationRequest, VLMEngine, prepare_request

# Only the resized-pixel check stands between this strip and the processor: the aspect limit is lifted.
NO_ASPECT_LIMIT = ImageLimits(max_aspect_ratio=1e9)


@pytest.fixture(scope="module")
def processor(tiny_vlm_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_vlm_path)


@pytest.fixture(scope="module")
def thin_image() -> Image.Image:
    """The 1x400,000 strip of the issue, decoded (1.2 MB of RGB): what the processor would get."""
    buf = io.BytesIO()
    Image.new("1", (1, 400_000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 5_000
    return decode_image(buf.getvalue(), NO_ASPECT_LIMIT)


def image_request(image: Image.Image, limits: ImageLimits | None = None) -> GenerationRequest:
    content = [{"type": "image", "image": image}, {"type": "text", "text": "Describe the image."}]
    options = {"image_limits": limits} if limits is not None else {}
    return GenerationRequest(
        [{"role": "user", "content": content}], SamplingParams(max_tokens=4, temperature=0.0), **options
    )


def test_clip_rule_matches_the_processors_own_resize(processor):
    # tiny-vlm's CLIP-style processor: shortest edge up to 32, then a 32x32 centre crop (left off here).
    assert resized_size(processor, 1, 400_000) == (32, 12_800_000)
    for width, height in [(40, 90), (300, 20), (64, 64)]:
        pixels = processor.image_processor(
            images=Image.new("RGB", (width, height)), do_center_crop=False, return_tensors="np"
        )["pixel_values"]
        assert resized_size(processor, width, height) == (pixels.shape[3], pixels.shape[2])


def test_fixed_and_pixel_count_and_longest_edge_rules_of_real_processors():
    from transformers import PixtralImageProcessorPil, Qwen2VLImageProcessorPil, SiglipImageProcessorPil

    siglip = SiglipImageProcessorPil()  # size height=width=224 whatever comes in
    assert resized_size(siglip, 50, 900) == (224, 224)
    assert siglip(images=Image.new("RGB", (50, 900)), return_tensors="np")["pixel_values"].shape[2:] == (
        224,
        224,
    )

    qwen = Qwen2VLImageProcessorPil()  # v5 keeps min/max pixels as size.shortest_edge/longest_edge
    for width, height in [(4000, 3000), (100, 2000), (640, 480), (30, 40)]:
        _, grid_h, grid_w = qwen(images=Image.new("RGB", (width, height)), return_tensors="np")[
            "image_grid_thw"
        ][0]
        ours, theirs = resized_size(qwen, width, height), (grid_w * qwen.patch_size, grid_h * qwen.patch_size)
        assert ours == theirs
    assert resized_size(qwen, 4000, 3000)[0] * resized_size(qwen, 4000, 3000)[1] <= qwen.size.longest_edge

    pixtral = PixtralImageProcessorPil()  # longest edge 1024 at most: the rule is an upper bound
    assert resized_size(pixtral, 4000, 1000) == (1024, 256)
    sizes = pixtral(images=Image.new("RGB", (4000, 1000)), return_tensors="np")["image_sizes"][0]
    assert tuple(sizes) == (256, 1024)  # (height, width)


@pytest.mark.parametrize(
    ("image_processor", "expected"),
    [
        (SimpleNamespace(size=224), (22_400, 224)),  # an int: the shortest edge (old CLIP configs)
        (SimpleNamespace(size={"shortest_edge": 800, "longest_edge": 1333}), (1333, 13)),  # DETR-style cap
        (SimpleNamespace(size={"longest_edge": 1456}), (1456, 14)),  # Idefics3 / SmolVLM
        (SimpleNamespace(size={"max_height": 512, "max_width": 512}), (512, 5)),
        # older Qwen-VL configs: min/max pixels as attributes, sides left off the grid when it is unknown
        (
            SimpleNamespace(size={"shortest_edge": 56 * 56}, min_pixels=3136, max_pixels=1_000_000),
            (1_000, 10),
        ),
        (SimpleNamespace(size={"shortest_edge": 32}, do_resize=False), (1_000, 10)),
        (SimpleNamespace(size={}), None),  # unknown rule: only aspect and input-pixel limits apply
    ],
)
def test_resize_rules_from_the_size_dict(image_processor, expected):
    assert resized_size(SimpleNamespace(image_processor=image_processor), 1_000, 10) == expected


def test_thin_image_is_refused_before_the_processor_resizes_it(processor, thin_image):
    """Unchecked, this resize takes 3.9 GB for 12 s; refused, it costs nothing measurable."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ImageError) as refused:
            prepare_request(processor, image_request(thin_image, NO_ASPECT_LIMIT))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(refused.value) == (
        "image 0: image 1x400000 would be resized by the model's processor to 32x12800000 = 409600000 pixels "
        "> limit 16777216 (raise max_image_resized_pixels to allow it)"
    )
    assert time.perf_counter() - started < 1.0
    assert peak < 5_000_000, f"refusing the strip allocated {peak} bytes"


def test_requests_get_the_default_limits_unless_given_others(processor, thin_image):
    with pytest.raises(ImageError, match=r"1x400000 is 4e\+05:1 > limit 50:1 \(raise max_image_aspect_ratio"):
        prepare_request(processor, image_request(thin_image))
    with pytest.raises(ImageError, match="max_image_aspect_ratio"):
        check_image_budget((300, 20), processor, ImageLimits(max_aspect_ratio=10), "wide")
    # A small square image passes, and a budget that fits the strip's resize lets it through the check.
    prepare_request(processor, image_request(Image.new("RGB", (40, 30))))
    check_image_budget(
        (1, 400_000), processor, ImageLimits(max_aspect_ratio=1e9, max_resized_pixels=10**9), "x"
    )


def test_a_thin_image_fails_its_own_row_only(tiny_vlm_path, thin_image):
    engine = VLMEngine.from_pretrained(str(tiny_vlm_path), device="cpu")
    good = image_request(Image.new("RGB", (40, 30), (10, 200, 30)))
    [alone] = engine.generate([good])
    thin, with_thin = engine.generate([image_request(thin_image, NO_ASPECT_LIMIT), good])
    assert thin.finish_reason == "error" and thin.error_type == INVALID_REQUEST
    assert "max_image_resized_pixels" in thin.error
    assert with_thin.error is None and with_thin.text == alone.text
