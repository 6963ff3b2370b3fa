"""Untrusted image input: limits checked before decoding, EXIF rotation, RGB, and errors that name the problem.

.venv/bin/python -m pytest tests/models/test_images.py
"""

from __future__ import annotations

import base64
import io

import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from raybooth.models.images import ImageError, ImageLimits, decode_image, load_image
from raybooth.samples import draw_sample_image, png_bytes

LIMITS = ImageLimits(max_pixels=1_000_000, max_bytes=1_000_000)


def encoded(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_decodes_any_mode_to_rgb():
    for mode in ("RGBA", "P", "L", "CMYK"):
        image = decode_image(encoded(Image.new(mode, (8, 6)), "TIFF"), LIMITS)
        assert image.mode == "RGB" and image.size == (8, 6)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": a portrait phone photo stored landscape
    image = decode_image(encoded(Image.new("RGB", (40, 20)), "JPEG", exif=exif), LIMITS)
    assert image.size == (20, 40)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"not an image at all", "corrupt image"),
        (b"", "corrupt image"),
        (png_bytes(draw_sample_image(0))[:200], "truncated image"),
    ],
)
def test_bad_bytes_name_the_problem(data, problem):
    with pytest.raises(ImageError, match=problem):
        decode_image(data, LIMITS, "x.png")


def test_decompression_bomb_is_refused_from_the_header():
    bomb = encoded(Image.new("1", (2000, 2000)))  # 4 MP of one colour: a few hundred bytes of PNG
    assert len(bomb) < 10_000
    with pytest.raises(
        ImageError, match=r"decompression bomb refused: 2000x2000 = 4000000 pixels > limit 1000000"
    ):
        decode_image(bomb, LIMITS, "bomb.png")


def test_byte_limit_is_checked_before_decoding(tmp_path):
    big = encoded(draw_sample_image(0, size=256))
    small_limits = ImageLimits(max_pixels=10**8, max_bytes=len(big) - 1)
    with pytest.raises(ImageError, match="image too large"):
        decode_image(big, small_limits)
    path = tmp_path / "big.png"
    path.write_bytes(big)
    with pytest.raises(ImageError, match="image too large"):
        load_image(str(path), small_limits)
    with pytest.raises(ImageError, match="image too large"):
        load_image(data_url(big), small_limits)


def test_sources_path_data_url_and_errors(tmp_path):
    path = tmp_path / "a.png"
    draw_sample_image(1).save(path)
    assert load_image(str(path), LIMITS).size == (64, 64)
    assert load_image(data_url(path.read_bytes()), LIMITS).size == (64, 64)
    with pytest.raises(ImageError, match="missing image"):
        load_image(str(tmp_path / "nope.png"), LIMITS)
    with pytest.raises(ImageError, match="not valid base64"):
        load_image("data:image/png;base64,@@@", LIMITS)
    with pytest.raises(ImageError, match="http"):
        load_image("https://example.com/cat.png", LIMITS)


def test_uris_are_read_through_the_filesystem_the_caller_passes(tmp_path):
    """models/ reads no storage config: s3:// needs the caller's filesystem, which is then what reads."""
    path = tmp_path / "a.png"
    draw_sample_image(2).save(path)
    assert load_image(f"file://{path}", LIMITS).size == (64, 64)
    with pytest.raises(ImageError, match=r"s3:// images need a storage filesystem"):
        load_image("s3://bucket/a.png", LIMITS)
    asked: list[str] = []

    def bucket_in_tmp(ref: str):  # a stand-in store: s3://bucket/<name> lives under tmp_path
        asked.append(ref)
        return LocalFileSystem(), str(tmp_path / ref.removeprefix("s3://bucket/"))

    assert load_image("s3://bucket/a.png", LIMITS, filesystem=bucket_in_tmp).size == (64, 64)
    assert asked == ["s3://bucket/a.png"]
