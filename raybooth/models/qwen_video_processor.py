"""Qwen-VL's video processors (Qwen2-VL / Qwen2.5-VL, Qwen3-VL) on PIL and NumPy, for machines without
torchvision.

    video_processor = PilQwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                               size={"shortest_edge": 3136, "longest_edge": 602112})
    processor = Qwen2_5_VLProcessor(image_processor, tokenizer, video_processor, chat_template=...)
    processor(text=[prompt_with_video], videos=[frames],
              video_metadata=[VideoMetadata(total_num_frames=len(frames), fps=1.0)], return_tensors="pt")
    # input_ids with <|video_pad|> x tokens, pixel_values_videos (N, C*T*P*P), video_grid_thw (1, 3),
    # second_per_grid_ts (1,): what Qwen2-VL's vision tower and M-RoPE positions read

transformers' `Qwen2VLVideoProcessor` and `Qwen3VLVideoProcessor` need torchvision (PyPI's is a CUDA build that cannot load with the
CPU torch). Without it a Qwen-VL video would reach the model only as separate images; this class gives
the model a video as its own processor does: each frame resized (PIL, bicubic) to the same
`smart_resize` grid, rescaled and normalised, the frames padded to a multiple of `temporal_patch_size`
by repeating the last, and cut into spatio-temporal patches in the vision tower's merge order, with
`video_grid_thw` (temporal, height, width patches) per video. `loaders.py` builds it from a checkpoint's
video settings (or its image processor's) where `AutoProcessor` cannot load; with torchvision installed
the checkpoint loads transformers' class as usual. Each saves under the name of transformers' class.
The output is always PyTorch tensors (what the engine feeds the model).

A video of `temporal_patch_size` identical frames is, patch for patch, the image processor's output for
that frame (an image is a one-step video of repeated frames): the tests hold the two to that.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as qwen3_smart_resize
from transformers.video_processing_utils import BaseVideoProcessor, VideoProcessorMixin
from transformers.video_utils import VideoMetadata


class PilQwen2VLVideoProcessor(BaseVideoProcessor):
    # transformers' Qwen2VLVideoProcessor defaults.
    size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    rescale_factor = 1 / 255
    patch_size = 14
    temporal_patch_size = 2
    merge_size = 2
    cap_pixels_per_frame = None  # transformers' default today: no whole-video pixel budget
    max_video_tokens = 128000
    model_input_names = ["pixel_values_videos", "video_grid_thw"]
    saved_as = "Qwen2VLVideoProcessor"  # what loads it where torchvision is

    def to_dict(self) -> dict[str, Any]:
        saved = super().to_dict()
        saved["video_processor_type"] = self.saved_as
        return saved

    def __call__(self, videos: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(videos, **kwargs)

    def preprocess(
        self,
        videos: Any,
        video_metadata: Any = None,
        return_metadata: bool = False,
        return_tensors: str | None = None,
        **_: Any,  # the processor's other per-call video defaults (do_resize, ...) are this class's own
    ) -> BatchFeature:
        """`videos`: one video or a list of them, each a list of PIL frames."""
        if videos and isinstance(videos[0], Image.Image):
            videos = [videos]
        metadata = _metadata(videos, video_metadata)
        patches, grids = zip(*(self._patches(list(frames)) for frames in videos), strict=True)
        data: dict[str, Any] = {
            "pixel_values_videos": torch.from_numpy(np.concatenate(patches)),
            "video_grid_thw": torch.tensor(grids, dtype=torch.long),
        }
        if return_metadata:
            data["video_metadata"] = metadata
        return BatchFeature(data=data, skip_tensor_conversion=["video_metadata"])

    def _resized_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """Every frame's (height, width): multiples of patch x merge within the pixel bounds; with
        `cap_pixels_per_frame`, each frame's share of the whole video's token budget (qwen-vl-utils)."""
        factor = self.patch_size * self.merge_size
        max_pixels = self.size.longest_edge
        if self.cap_pixels_per_frame:
            budget = (
                int(self.max_video_tokens * factor * factor * 0.9) * self.temporal_patch_size // num_frames
            )
            max_pixels = max(min(max_pixels, budget), int(self.size.shortest_edge * 1.05))
        return smart_resize(
            height, width, factor=factor, min_pixels=self.size.shortest_edge, max_pixels=max_pixels
        )

    def _patches(self, frames: list[Image.Image]) -> tuple[np.ndarray, list[int]]:
        if not frames:
            raise ValueError("a video needs at least one frame")
        width, height = frames[0].size
        resized_h, resized_w = self._resized_size(len(frames), height, width)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
        pixels = []
        for frame in frames:
            image = frame.convert("RGB").resize((resized_w, resized_h), Image.Resampling.BICUBIC)
            array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) * np.float32(self.rescale_factor)
            pixels.append((array - mean) / std)
        t = self.temporal_patch_size
        pixels += [pixels[-1]] * (-len(pixels) % t)  # the last frame repeated to a whole temporal patch
        video = np.stack(pixels)  # (T, C, H, W)
        p, m = self.patch_size, self.merge_size
        grid_t, grid_h, grid_w = len(pixels) // t, resized_h // p, resized_w // p
        channels = video.shape[1]
        blocks = video.reshape(grid_t, t, channels, grid_h // m, m, p, grid_w // m, m, p)
        # (t, merged rows, merged cols, row in merge, col in merge, C, frame in patch, y, x): the order the
        # vision tower reads its patches and merges 2x2 neighbours.
        blocks = blocks.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = blocks.reshape(grid_t * grid_h * grid_w, channels * t * p * p)
        return np.ascontiguousarray(flat, dtype=np.float32), [grid_t, grid_h, grid_w]


class PilQwen3VLVideoProcessor(PilQwen2VLVideoProcessor):
    """Qwen3-VL's: 16-pixel patches and [-1, 1] normalisation by default, and the resize bounds the whole
    video's pixels (frames x height x width, frames rounded to temporal patches) rather than one frame's.
    Its processor writes each temporal patch's time (`<0.5 seconds>`) from the frames' metadata."""

    size = {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768}
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    patch_size = 16
    max_video_tokens = 768
    saved_as = "Qwen3VLVideoProcessor"

    def _resized_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        factor = self.patch_size * self.merge_size
        max_pixels = self.size.longest_edge
        if self.cap_pixels_per_frame:
            per_frame = min(self.max_video_tokens * factor * factor, max_pixels // num_frames)
            max_pixels = max(per_frame, int(self.size.shortest_edge * 1.05)) * num_frames
        return qwen3_smart_resize(
            num_frames=max(num_frames, self.temporal_patch_size),  # a shorter video is padded to one patch
            height=height,
            width=width,
            temporal_factor=self.temporal_patch_size,
            factor=factor,
            min_pixels=self.size.shortest_edge,
            max_pixels=max_pixels,
        )


# Processors whose video processor needs torchvision, and the one that does the same on PIL and NumPy.
PIL_VIDEO_PROCESSORS: dict[str, type[BaseVideoProcessor]] = {
    "Qwen2VLProcessor": PilQwen2VLVideoProcessor,
    "Qwen2_5_VLProcessor": PilQwen2VLVideoProcessor,
    "Qwen3VLProcessor": PilQwen3VLVideoProcessor,
}


@functools.cache
def with_pil_video(cls: type[Any]) -> type[Any]:
    """The processor class `cls` (same name, so it saves as itself) accepting a PIL video processor.
    Without torchvision transformers cannot name the video processors' base class, so its own check of
    the `video_processor` argument fails for any video processor; this one checks it directly."""

    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and isinstance(argument, VideoProcessorMixin):
            return type(argument)
        return cls.check_argument_for_proper_class(self, argument_name, argument)

    return type(cls.__name__, (cls,), {"check_argument_for_proper_class": check_argument_for_proper_class})


def _metadata(videos: list[Any], given: Any) -> list[VideoMetadata]:
    """One `VideoMetadata` per video: the caller's (its fps sets the time between temporal patches, which
    Qwen2.5-VL's M-RoPE positions read), or transformers' default of 24 fps where none was given."""
    if given is None:
        return [VideoMetadata(total_num_frames=len(frames), fps=24.0) for frames in videos]
    given = list(given) if isinstance(given, list | tuple) else [given]
    if len(given) != len(videos):
        raise ValueError(f"{len(given)} video_metadata entries for {len(videos)} videos")
    return [m if isinstance(m, VideoMetadata) else VideoMetadata(**m) for m in given]
