"""DreamBooth training data: instance and class images, paired per batch, chosen by a pure function of the step.

    data = DreamBoothData(instance=[Example(img, "a photo of sks dog", 0), ...],
                          classes=[[Example(img, "a photo of dog", 0), ...]],   # one list per concept
                          resolution=32, center_crop=True, random_flip=False, seed=0)
    views = data.select(step=7, micro=0, rank=1, world_size=2, batch_size=1, accumulation=1)
    pixels = data.pixels(views)          # (N, 3, R, R) in [-1, 1]; instance rows first, class rows second
    prompts = data.prompts(views)

Which images a rank sees at a step, and how they are flipped and cropped, depends only on
(seed, step, micro-batch, rank). There is no DataLoader state to checkpoint, so a resumed run draws
exactly the batches an uninterrupted run would have drawn — what makes resume bit-identical.

Instance images are drawn epoch by epoch: every instance image is seen once per epoch across all ranks
(a seeded permutation per epoch), as a DataLoader with a DistributedSampler would. Each instance row is
paired with a class row of the same concept, as the DreamBooth paper does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from raybooth.models.images import ImageLimits, decode_image

# Photos straight off a phone are ~12 MP; anything far bigger is a mistake or a bomb.
INSTANCE_IMAGE_LIMITS = ImageLimits(max_pixels=100_000_000, max_bytes=64 * 1024 * 1024)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Stream ids that keep the different random choices of one step independent of each other.
_INSTANCE_ORDER, _CLASS_PICK, _FLIP, _CROP = 1, 2, 3, 4


@dataclass
class Example:
    """One training image, resized so its shorter side is the training resolution (not cropped yet)."""

    pixels: torch.Tensor  # (3, H, W) uint8, min(H, W) == resolution
    prompt: str
    concept: int
    original_size: tuple[int, int] | None = None  # (H, W) of the file before resizing; None: as pixels


@dataclass(frozen=True)
class View:
    """One row of a batch: which image, flipped or not, cropped where."""

    kind: str  # "instance" | "class"
    index: int  # into data.instance, or into data.classes[concept]
    concept: int
    flip: bool
    top: int
    left: int


def resize_shorter_side(image: Image.Image, resolution: int) -> torch.Tensor:
    """PIL image → (3, H, W) uint8 with the shorter side scaled to `resolution` (bicubic, as diffusers)."""
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    resized = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_example(data: bytes, name: str, prompt: str, concept: int, resolution: int) -> Example:
    """Decode one image file (refusing corrupt or oversized ones, naming `name`) into an `Example`."""
    image = decode_image(data, INSTANCE_IMAGE_LIMITS, name=name)
    return Example(resize_shorter_side(image, resolution), prompt, concept, (image.height, image.width))


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class DreamBoothData:
    """Instance examples plus per-concept class examples, and the rule that picks each step's rows."""

    def __init__(
        self,
        instance: list[Example],
        classes: list[list[Example]] | None,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        seed: int,
    ):
        if not instance:
            raise ValueError("no instance images: a DreamBooth run needs at least one photo of the subject")
        self.instance = instance
        self.classes = classes  # None: no prior preservation
        if classes is not None:
            missing = sorted({e.concept for e in instance if not classes[e.concept]})
            if missing:
                raise ValueError(f"concepts {missing} have no class images but prior preservation is on")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed

    @property
    def with_prior(self) -> bool:
        return self.classes is not None

    def _instance_index(self, position: int) -> int:
        """The instance image at global sample `position`: epoch-wise seeded permutations."""
        n = len(self.instance)
        epoch, offset = divmod(position, n)
        return int(_rng(self.seed, _INSTANCE_ORDER, epoch).permutation(n)[offset])

    def _crop(self, pixels: torch.Tensor, rng: np.random.Generator) -> tuple[int, int]:
        _, h, w = pixels.shape
        r = self.resolution
        if self.center_crop:
            return (h - r) // 2, (w - r) // 2
        return int(rng.integers(0, h - r + 1)), int(rng.integers(0, w - r + 1))

    def select(
        self, step: int, micro: int, rank: int, world_size: int, batch_size: int, accumulation: int
    ) -> list[View]:
        """The rows rank `rank` trains on in micro-batch `micro` of optimizer step `step` (0-based).

        Returns `batch_size` instance views, then (with prior preservation) `batch_size` class views,
        the i-th class row from the same concept as the i-th instance row.
        """
        key = (self.seed, step, micro, rank)
        flip_rng, crop_rng, class_rng = _rng(*key, _FLIP), _rng(*key, _CROP), _rng(*key, _CLASS_PICK)
        first = ((step * accumulation + micro) * world_size + rank) * batch_size
        instance, klass = [], []
        for j in range(batch_size):
            index = self._instance_index(first + j)
            example = self.instance[index]
            flip = bool(self.random_flip and flip_rng.random() < 0.5)
            top, left = self._crop(example.pixels, crop_rng)
            instance.append(View("instance", index, example.concept, flip, top, left))
            if self.classes is not None:
                pool = self.classes[example.concept]
                c_index = int(class_rng.integers(len(pool)))
                c_top, c_left = self._crop(pool[c_index].pixels, crop_rng)
                # Class images are never flipped: they stand for the model's own prior, left as generated.
                klass.append(View("class", c_index, example.concept, False, c_top, c_left))
        return instance + klass

    def example(self, view: View) -> Example:
        if view.kind == "instance":
            return self.instance[view.index]
        assert self.classes is not None
        return self.classes[view.concept][view.index]

    def pixels_of(self, view: View) -> torch.Tensor:
        """(3, R, R) float in [-1, 1] for one view."""
        r = self.resolution
        crop = self.example(view).pixels[:, view.top : view.top + r, view.left : view.left + r]
        if view.flip:
            crop = crop.flip(-1)
        return crop.float() / 127.5 - 1.0

    def pixels(self, views: list[View]) -> torch.Tensor:
        """(N, 3, R, R) float in [-1, 1]."""
        return torch.stack([self.pixels_of(v) for v in views])

    def size_condition(self, view: View) -> tuple[int, int, int, int, int, int]:
        """SDXL's micro-conditioning of one row: original (H, W), crop (top, left), target (R, R), as
        train_dreambooth_lora_sdxl.py computes them: the size before resizing, and the crop's corner in
        the resized image, which that script flips before cropping (so a flipped row's left is mirrored)."""
        example = self.example(view)
        _, h, w = example.pixels.shape
        original = example.original_size or (h, w)
        r = self.resolution
        left = w - view.left - r if view.flip else view.left
        return (original[0], original[1], view.top, left, r, r)

    def size_conditions(self, views: list[View]) -> list[tuple[int, int, int, int, int, int]]:
        return [self.size_condition(v) for v in views]

    def prompts(self, views: list[View]) -> list[str]:
        return [self.example(v).prompt for v in views]

    def all_views(self) -> list[View]:
        """Every distinct view a center-cropped run can draw (both flips where flipping is on): the latent cache."""
        if not self.center_crop:
            raise ValueError("caching latents needs center_crop: random crops differ every step")
        out = []
        for i, e in enumerate(self.instance):
            top, left = self._crop(e.pixels, _rng(0))
            for flip in (False, True) if self.random_flip else (False,):
                out.append(View("instance", i, e.concept, flip, top, left))
        for concept, pool in enumerate(self.classes or []):
            for i, e in enumerate(pool):
                top, left = self._crop(e.pixels, _rng(0))
                out.append(View("class", i, concept, False, top, left))
        return out

    def all_prompts(self) -> list[str]:
        prompts = {e.prompt for e in self.instance}
        prompts.update(e.prompt for pool in self.classes or [] for e in pool)
        return sorted(prompts)
