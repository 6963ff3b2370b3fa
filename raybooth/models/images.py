"""Untrusted image input → a safe RGB PIL image, or an `ImageError` that says what is wrong.

    from raybooth.cluster import storage
    from raybooth.models.images import ImageLimits, load_image
    limits = ImageLimits(max_pixels=25_000_000, max_bytes=32 << 20)
    image = load_image("s3://bucket/cat.jpg", limits, filesystem=storage.filesystem)

Accepts raw bytes, `data:image/...;base64,` URLs, local paths and `file://` URIs; any other URI (`s3://`)
through the `filesystem` the caller passes (a function URI -> (fsspec filesystem, path), such as
`raybooth.cluster.storage.filesystem`, so models/ never reads the storage config itself). Every check runs
before the expensive step it guards: the byte size before reading (or base64-decoding) the payload, the
pixel count and aspect ratio from the header before decoding pixels (a decompression bomb is a tiny file
that expands to gigabytes; a 1x400,000 PNG is 1 KB that a processor's shortest-edge resize makes 13 G
pixels). PIL's own `DecompressionBombError` is caught too. Only the formats README lists are opened
(`ACCEPTED_FORMATS`): PIL would otherwise hand an EPS/PDF to Ghostscript. What the model's processor
will make of an image is checked by `image_budget.check_image_budget`, which needs the processor. EXIF orientation is applied so a phone
photo is upright, and every mode (P, RGBA, CMYK, 16-bit) ends as RGB, which is what vision towers expect.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageOps, UnidentifiedImageError

from raybooth.errors import StorageError

HTTP_SCHEMES = ("http://", "https://")
# URI -> (filesystem, path inside it); `raybooth.cluster.storage.filesystem` is the one jobs pass.
Filesystem = Callable[[str], tuple[fsspec.AbstractFileSystem, str]]
# PIL's format names of the files README lists (.jpg .jpeg .png .webp .bmp .gif .tif .tiff); phone photos
# that PIL reads as MPO open through its JPEG plugin. Nothing else is opened: no EPS/PS/PDF (Ghostscript),
# no exotic plugins whose decoders nobody here vets.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED_NAMES = "PNG, JPEG, WebP, GIF, BMP or TIFF"


class ImageError(ValueError):
    """An image that cannot be used; the message names the image and the problem."""


@dataclass(frozen=True)
class ImageLimits:
    # 25 MP is above any phone or DSLR photo a captioner sees, far below a bomb's hundreds of megapixels.
    max_pixels: int = 25_000_000
    # 32 MiB: larger than any sane JPEG/PNG of a 25 MP photo.
    max_bytes: int = 32 * 1024 * 1024
    # long side / short side. 50 lets scrolling screenshots (1080x20000 is 18.5) and 360-degree panoramas
    # through, stays under Qwen-VL's hard limit of 200, and refuses the 1x400,000 strip at its header.
    max_aspect_ratio: float = 50.0
    # Pixels of an image after the processor's own resize (see image_budget.py). 16 MP is above every
    # shipped processor's normal output (Qwen2.5-VL's max_pixels is 12.8 MP) yet 1/25 of what a
    # shortest-edge-32 resize makes of the 1x400,000 strip.
    max_resized_pixels: int = 16_777_216

    @classmethod
    def from_settings(cls, settings: Any) -> ImageLimits:
        """The limits of a config section with `max_image_pixels`, `max_image_bytes`,
        `max_image_aspect_ratio` and `max_image_resized_pixels` (a batch job's config, serve's `limits`)."""
        return cls(
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.max_image_bytes,
            max_aspect_ratio=settings.max_image_aspect_ratio,
            max_resized_pixels=settings.max_image_resized_pixels,
        )


def check_aspect_ratio(width: int, height: int, limits: ImageLimits, name: str) -> None:
    """Refuse a strip of an image: processors scale the short side up, so its cost is in the long side."""
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > limits.max_aspect_ratio:
        raise ImageError(
            f"{name}: image aspect ratio too extreme: {width}x{height} is {ratio:.4g}:1 > limit "
            f"{limits.max_aspect_ratio:g}:1 (raise max_image_aspect_ratio to allow it)"
        )


@dataclass(frozen=True)
class ByteLimit:
    """A payload's byte limit and the words its refusal uses: what it is and the setting that raises it."""

    max_bytes: int
    kind: str = "image"  # "image" | "video"
    setting: str = "max_image_bytes"

    @classmethod
    def of_images(cls, limits: ImageLimits) -> ByteLimit:
        return cls(limits.max_bytes)


def _check_bytes(size: int, limit: ByteLimit, name: str) -> None:
    if size > limit.max_bytes:
        raise ImageError(
            f"{name}: {limit.kind} too large: {size} bytes > limit {limit.max_bytes} "
            f"(raise {limit.setting} to allow it)"
        )


def decode_image(data: bytes, limits: ImageLimits, name: str = "image") -> Image.Image:
    """Bytes → upright RGB image, refusing oversized, bomb, corrupt and truncated images."""
    _check_bytes(len(data), ByteLimit.of_images(limits), name)
    if not data:
        raise ImageError(f"{name}: corrupt image: empty file")
    fmt: str | None = None  # what the header says, for the message when decoding fails
    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) between its two bomb thresholds; our own pixel check decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            fmt, (width, height) = image.format, image.size  # from the header: no pixel is decoded yet
            if width * height > limits.max_pixels:
                raise ImageError(
                    f"{name}: decompression bomb refused: {width}x{height} = {width * height} pixels > limit "
                    f"{limits.max_pixels} (raise max_image_pixels to allow it)"
                )
            check_aspect_ratio(width, height, limits, name)
            image.load()
            image = ImageOps.exif_transpose(image)
            return image if image.mode == "RGB" else image.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: decompression bomb refused: {e}") from e
    except UnidentifiedImageError as e:
        # PIL cannot tell "EPS, which we do not open" from garbage once the EPS plugin is left out.
        raise ImageError(
            f"{name}: corrupt image or unsupported format: accepted formats are {ACCEPTED_NAMES}"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        # PIL raises OSError("image file is truncated ...") for cut-off files, SyntaxError for broken headers;
        # its own wording beyond that (decoder names, byte counts) means nothing to the sender.
        problem = "truncated image" if "truncated" in str(e).lower() else "corrupt image"
        raise ImageError(f"{name}: {problem}: the {_format_name(fmt)} data cannot be decoded") from e


def _format_name(fmt: str | None) -> str:
    return {"WEBP": "WebP", None: "image"}.get(fmt, fmt or "image")


def decode_data_url(url: str, limits: ImageLimits | ByteLimit, name: str = "image") -> bytes:
    """`data:image/png;base64,...` → bytes, refusing oversized payloads before decoding them."""
    limit = limits if isinstance(limits, ByteLimit) else ByteLimit.of_images(limits)
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise ImageError(f"{name}: malformed data URL (expected data:{limit.kind}/<type>;base64,<data>)")
    if ";base64" not in header:
        raise ImageError(f"{name}: data URL must be base64-encoded (data:{limit.kind}/<type>;base64,...)")
    _check_bytes(len(payload) * 3 // 4, limit, name)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"{name}: data URL is not valid base64: {e}") from e


def local_filesystem(ref: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The default `Filesystem`: local paths and file:// URIs only."""
    scheme, sep, rest = ref.partition("://")
    if not sep:
        return LocalFileSystem(), ref
    if scheme == "file":
        return LocalFileSystem(), rest
    raise StorageError(f"{scheme}:// images need a storage filesystem here; give a local path or a data: URL")


def read_image_bytes(
    ref: str, limits: ImageLimits, name: str | None = None, filesystem: Filesystem = local_filesystem
) -> bytes:
    """The bytes behind a data URL, local path, file:// or (through `filesystem`) s3:// URI.

    The size is checked before the bytes are read."""
    return read_media_bytes(ref, ByteLimit.of_images(limits), name, filesystem)


def read_media_bytes(
    ref: str, limit: ByteLimit, name: str | None = None, filesystem: Filesystem = local_filesystem
) -> bytes:
    """`read_image_bytes` for any payload (images, videos): `limit` says its byte cap and what it is."""
    kind = limit.kind
    name = name or (ref if not ref.startswith("data:") else kind)
    if ref.startswith("data:"):
        return decode_data_url(ref, limit, name)
    if ref.startswith(HTTP_SCHEMES):
        raise ImageError(
            f"{name}: http(s) {kind} URLs are not fetched by raybooth; inline the {kind} as a data: URL "
            "or give a path / s3:// URI the cluster can read"
        )
    try:
        fs, path = filesystem(ref)
        _check_bytes(int(fs.size(path)), limit, name)
        return fs.cat_file(path)
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f"{name}: missing {kind}: no such file or object") from e
    except (StorageError, OSError) as e:
        raise ImageError(f"{name}: cannot read {kind}: {e}") from e
    except Exception as e:  # botocore and aiohttp errors have no common base worth importing here
        raise ImageError(f"{name}: cannot read {kind}: {type(e).__name__}: {e}") from e


def load_image(
    ref: str | bytes, limits: ImageLimits, name: str | None = None, filesystem: Filesystem = local_filesystem
) -> Image.Image:
    """Any supported image reference → upright RGB PIL image; `ImageError` naming the problem otherwise."""
    if isinstance(ref, bytes | bytearray | memoryview):
        return decode_image(bytes(ref), limits, name or "image")
    label = name or (ref if not ref.startswith("data:") else "image")
    return decode_image(read_image_bytes(ref, limits, label, filesystem), limits, label)
