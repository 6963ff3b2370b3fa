"""What a model's processor will make of an image, known from its width and height before any resize.

    from raybooth.models.image_budget import check_image_budget, resized_size
    from raybooth.models.images import ImageLimits
    resized_size(processor, 1, 400_000)       # (32, 12_800_000) for tiny-vlm: shortest edge up to 32
    check_image_budget(image.size, processor, ImageLimits(), "message 0 part 1")   # ImageError if over

A 1x400,000 PNG is 1 KB and 0.4 MP, inside every input limit, yet a CLIP-style processor scales its
short side up to 32 (or 224, 336) before cropping: 12.8 G subpixels, 3.9 GB for 12 s. The cost of an
image is therefore what the processor's resize produces, and that follows from the processor's own
`size` rule and the input's width and height alone, so it is checked before the processor runs.

The rules read, generic over Hugging Face image processors (slow, fast and PIL backends alike):

- pixel-count rules (Qwen2-VL and successors, `image_grid_thw` models): the area is clamped into
  [min_pixels, max_pixels], in v5 written as `size.shortest_edge`/`size.longest_edge`;
- `height` + `width`: a fixed size (SigLIP, Mllama tiles, Florence-2);
- `shortest_edge` (+ optional `longest_edge` cap): CLIP, LLaVA, LLaVA-NeXT's base image, DETR-style;
- `longest_edge` alone: Idefics3/SmolVLM, Pixtral (an upper bound: they never grow past it);
- `max_height` + `max_width`: fit inside the box keeping the aspect ratio;
- `do_resize=False`: the input size itself.

Anything else returns None: only the aspect-ratio and input-pixel limits then apply. Plain Python: no Ray.
"""

from __future__ import annotations

import math
from typing import Any

from raybooth.models.images import ImageError, ImageLimits, check_aspect_ratio

SIZE_KEYS = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")


def _size_rule(image_processor: Any) -> dict[str, int]:
    """The processor's `size` as a plain dict of the keys set (a dict, a v5 `SizeDict`, or an int)."""
    size = getattr(image_processor, "size", None)
    if isinstance(size, int):  # old CLIP configs: an int is the shortest edge
        return {"shortest_edge": size}
    if size is None:
        return {}
    get = size.get if hasattr(size, "get") else lambda key: getattr(size, key, None)
    rule = {key: get(key) for key in (*SIZE_KEYS, "min_pixels", "max_pixels")}
    return {key: int(value) for key, value in rule.items() if isinstance(value, int | float) and value}


def _pixel_range(image_processor: Any, rule: dict[str, int]) -> tuple[int, int] | None:
    """(min_pixels, max_pixels) of a processor whose rule bounds the area (Qwen-VL style), else None."""
    low = getattr(image_processor, "min_pixels", None) or rule.get("min_pixels")
    high = getattr(image_processor, "max_pixels", None) or rule.get("max_pixels")
    if high:
        return int(low or 0), int(high)
    # transformers v5 keeps Qwen's bounds in size.shortest_edge/longest_edge, which there are areas.
    if "image_grid_thw" in getattr(image_processor, "model_input_names", ()) and "longest_edge" in rule:
        return rule.get("shortest_edge", 0), rule["longest_edge"]
    return None


def _grid(image_processor: Any) -> int:
    """The side multiple an area-clamping processor rounds to: its patch times its token merge."""
    patch = getattr(image_processor, "patch_size", None)
    merge = getattr(image_processor, "merge_size", None) or 1
    return int(patch * merge) if isinstance(patch, int) and isinstance(merge, int) else 1


def _area_clamped(width: int, height: int, low: int, high: int, grid: int) -> tuple[int, int]:
    """Qwen-VL's rule: sides on the grid, the area scaled into [low, high] keeping the aspect ratio."""
    w, h = max(grid, round(width / grid) * grid), max(grid, round(height / grid) * grid)
    if w * h > high:
        beta = math.sqrt(width * height / high)
        w, h = (max(grid, math.floor(side / beta / grid) * grid) for side in (width, height))
    elif w * h < low:
        beta = math.sqrt(low / (width * height))
        w, h = (math.ceil(side * beta / grid) * grid for side in (width, height))
    return w, h


def resized_size(processor: Any, width: int, height: int) -> tuple[int, int] | None:
    """(width, height) of the image the processor's resize produces, or None for an unknown rule."""
    image_processor = getattr(processor, "image_processor", processor)
    if not getattr(image_processor, "do_resize", True):
        return width, height
    rule = _size_rule(image_processor)
    pixels = _pixel_range(image_processor, rule)
    if pixels is not None:
        return _area_clamped(width, height, *pixels, _grid(image_processor))
    if "height" in rule and "width" in rule:
        return rule["width"], rule["height"]
    short, long = min(width, height), max(width, height)
    if "shortest_edge" in rule:
        scale = rule["shortest_edge"] / short
        if "longest_edge" in rule:
            scale = min(scale, rule["longest_edge"] / long)
    elif "longest_edge" in rule:
        scale = rule["longest_edge"] / long
    elif "max_height" in rule and "max_width" in rule:
        scale = min(rule["max_height"] / height, rule["max_width"] / width)
    else:
        return None
    return max(1, int(width * scale)), max(1, int(height * scale))


def check_image_budget(size: tuple[int, int], processor: Any, limits: ImageLimits, name: str) -> None:
    """Refuse an image whose aspect ratio, or whose size after the processor's resize, is over the limits.

    `size` is (width, height): the header's or the decoded image's; nothing is resized here."""
    width, height = size
    check_aspect_ratio(width, height, limits, name)
    resized = resized_size(processor, width, height)
    if resized is not None and resized[0] * resized[1] > limits.max_resized_pixels:
        raise ImageError(
            f"{name}: image {width}x{height} would be resized by the model's processor to "
            f"{resized[0]}x{resized[1]} = {resized[0] * resized[1]} pixels > limit {limits.max_resized_pixels} "
            "(raise max_image_resized_pixels to allow it)"
        )
