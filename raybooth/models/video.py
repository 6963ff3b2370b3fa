"""Untrusted video input → a few RGB frames sampled at a fixed rate, or a `VideoError` saying what is wrong.

    from raybooth.models.images import ImageLimits
    from raybooth.models.video import VideoLimits, load_video
    frames = load_video("clip.mp4", VideoLimits(max_frames=8, fps=1.0), ImageLimits())   # list of PIL images

Accepts what `images.load_image` accepts (raw bytes, `data:video/...;base64,` URLs, local paths, file://
and, through the caller's `filesystem`, s3://), decoded with PyAV. A video reaches the model as frames:
the family's video processor gets them where it has one, every other vision model gets them as that many
images in order (`vlm_requests.prepare_request`), so each frame also passes the image checks
(`image_budget`). The checks run before the work they guard: the byte size before reading; the
container is sniffed from its magic bytes and opened with that demuxer only (FFmpeg's probing would
also open playlists such as HLS, which read other files); the frame size and aspect ratio from the
stream header before any frame is decoded; the sampled frame count from the duration before decoding
and again while decoding (a duration can lie). Plain PyAV + PIL: no Ray.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import av
from PIL import Image

from raybooth.models.images import (
    ByteLimit,
    Filesystem,
    ImageError,
    ImageLimits,
    check_aspect_ratio,
    local_filesystem,
    read_media_bytes,
)

# What `sniff_container` recognises (and so all that is ever opened), for the refusal's message.
ACCEPTED_CONTAINERS = "MP4/MOV, WebM/Matroska or AVI"


class VideoError(ImageError):
    """A video that cannot be used; the message names the video and the problem (a ValueError: HTTP 400)."""


@dataclass(frozen=True)
class VideoLimits:
    # Frames sampled from one video; each is an image to the model (hundreds of tokens), so a few dozen
    # is already a long prompt. A video sampling to more is refused, not silently cut.
    max_frames: int = 16
    # Frames kept per second of video: 1 fps keeps the scene changes of a short clip at a token cost a
    # chat prompt can carry (Qwen2-VL's own default is 2).
    fps: float = 1.0
    # 64 MiB: a minute of 1080p H.264; longer videos would sample past max_frames anyway.
    max_bytes: int = 64 * 1024 * 1024

    @classmethod
    def from_settings(cls, settings: Any) -> VideoLimits:
        """The limits of a config section with `max_video_frames`, `video_fps` and `max_video_bytes`."""
        return cls(
            max_frames=settings.max_video_frames, fps=settings.video_fps, max_bytes=settings.max_video_bytes
        )

    def byte_limit(self) -> ByteLimit:
        return ByteLimit(self.max_bytes, "video", "max_video_bytes")


def sniff_container(data: bytes) -> str | None:
    """The demuxer of a video by its magic bytes: "mov" (MP4/MOV), "matroska" (WebM/MKV), "avi"; else None."""
    if data[4:8] == b"ftyp" or data[4:8] in (b"moov", b"mdat", b"wide", b"free"):
        return "mov"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    return None


def _frame_budget(seconds: float, limits: VideoLimits, name: str) -> None:
    expected = math.ceil(seconds * limits.fps - 1e-6)
    if expected > limits.max_frames:
        raise VideoError(
            f"{name}: video too long: {seconds:.1f}s at video_fps {limits.fps:g} is {expected} frames > limit "
            f"{limits.max_frames} (raise max_video_frames or lower video_fps)"
        )


def _check_frame_size(width: int, height: int, image_limits: ImageLimits, name: str) -> None:
    if width * height > image_limits.max_pixels:
        raise VideoError(
            f"{name}: video frames of {width}x{height} = {width * height} pixels > limit "
            f"{image_limits.max_pixels} (raise max_image_pixels to allow it)"
        )
    try:
        check_aspect_ratio(width, height, image_limits, name)
    except ImageError as e:
        raise VideoError(str(e).replace("image aspect ratio", "video frame aspect ratio")) from e


def decode_video(
    data: bytes, limits: VideoLimits, image_limits: ImageLimits, name: str = "video"
) -> list[Image.Image]:
    """Bytes → RGB frames sampled at `limits.fps` (the first frame, then one per 1/fps seconds)."""
    if len(data) > limits.max_bytes:
        raise VideoError(
            f"{name}: video too large: {len(data)} bytes > limit {limits.max_bytes} "
            "(raise max_video_bytes to allow it)"
        )
    demuxer = sniff_container(data)
    if demuxer is None:
        raise VideoError(f"{name}: not a video: accepted containers are {ACCEPTED_CONTAINERS}")
    try:
        with av.open(io.BytesIO(data), format=demuxer, metadata_errors="ignore") as container:
            if not container.streams.video:
                raise VideoError(f"{name}: no video stream in the file (audio only?); send a video")
            stream = container.streams.video[0]
            _check_frame_size(stream.codec_context.width, stream.codec_context.height, image_limits, name)
            if stream.duration is not None and stream.time_base is not None:
                _frame_budget(float(stream.duration * stream.time_base), limits, name)
            elif container.duration is not None:
                _frame_budget(container.duration / av.time_base, limits, name)
            return _sample_frames(container, stream, limits, image_limits, name)
    except ImageError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        # FFmpeg's own wording (decoder names, errno) means nothing to the sender.
        raise VideoError(f"{name}: corrupt video: the {demuxer} data cannot be decoded") from e


def _sample_frames(
    container: Any, stream: Any, limits: VideoLimits, image_limits: ImageLimits, name: str
) -> list[Image.Image]:
    step = 1.0 / limits.fps
    rate = float(stream.average_rate or 0) or limits.fps  # for frames without a timestamp
    frames: list[Image.Image] = []
    next_time = 0.0
    for index, frame in enumerate(container.decode(stream)):
        time = frame.time if frame.time is not None else index / rate
        if time + 1e-6 < next_time:
            continue
        if len(frames) == limits.max_frames:  # the header's duration said less: it was wrong
            raise VideoError(
                f"{name}: video too long: more than {limits.max_frames} frames at video_fps {limits.fps:g} "
                "(raise max_video_frames or lower video_fps)"
            )
        _check_frame_size(frame.width, frame.height, image_limits, name)
        frames.append(frame.to_image())  # RGB, what vision towers expect
        while next_time <= time + 1e-6:  # after a gap, the next sample is one step past this frame
            next_time += step
    if not frames:
        raise VideoError(f"{name}: the video has no frames")
    return frames


def load_video(
    ref: str | bytes,
    limits: VideoLimits,
    image_limits: ImageLimits,
    name: str | None = None,
    filesystem: Filesystem = local_filesystem,
) -> list[Image.Image]:
    """Any supported video reference → sampled RGB frames; `VideoError` (or `ImageError`) naming the problem."""
    if isinstance(ref, bytes | bytearray | memoryview):
        return decode_video(bytes(ref), limits, image_limits, name or "video")
    label = name or (ref if not ref.startswith("data:") else "video")
    return decode_video(
        read_media_bytes(ref, limits.byte_limit(), label, filesystem), limits, image_limits, label
    )
