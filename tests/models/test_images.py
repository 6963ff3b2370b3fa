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


def thin_png(length: int = 400_000) -> bytes:
    """1 x `length` pixels of one colour: about a kilobyte of PNG, inside every byte and pixel limit."""
    return encoded(Image.new("1", (1, length)))


def test_thin_image_is_refused_from_its_header_naming_the_limit():
    """A 1x400,000 strip is 0.4 MP, but processors scale the short side up: it is refused before decoding."""
    import time
    import tracemalloc

    data = thin_png()
    assert len(data) < 5_000
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(
            ImageError, match=r"1x400000 is 4e\+05:1 > limit 50:1 \(raise max_image_aspect_ratio"
        ):
            decode_image(data, ImageLimits())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < 2_000_000, f"refusing the strip allocated {peak} bytes"
    # A long screenshot's shape (18.5:1) and a panorama's (8:1) are within the default.
    assert decode_image(encoded(Image.new("L", (200, 3700))), ImageLimits()).size == (200, 3700)
    assert decode_image(encoded(Image.new("RGB", (800, 100))), ImageLimits()).size == (800, 100)
    with pytest.raises(ImageError, match="max_image_aspect_ratio"):
        decode_image(encoded(Image.new("RGB", (800, 100))), ImageLimits(max_aspect_ratio=4))


@pytest.mark.parametrize(
    ("fmt", "save"),
    [
        ("PNG", {}),
        ("JPEG", {}),
        ("WEBP", {}),
        ("GIF", {}),
        ("BMP", {}),
        ("TIFF", {}),
        ("MPO", {"save_all": True}),
    ],
)
def test_the_documented_formats_decode(fmt, save):
    # MPO is what PIL calls many phone JPEGs (a multi-picture JPEG): it opens through the JPEG plugin.
    image = Image.new("RGB", (12, 10), (200, 30, 60))
    assert decode_image(encoded(image, fmt, **save), LIMITS).size == (12, 10)


@pytest.mark.parametrize("fmt", ["PCX", "TGA", "ICO", "PPM"])
def test_other_formats_are_refused_naming_the_accepted_ones(fmt):
    with pytest.raises(ImageError, match=r"unsupported format: accepted formats are PNG, JPEG, WebP, GIF"):
        decode_image(encoded(Image.new("RGB", (16, 16)), fmt), LIMITS, "x")


def test_eps_is_refused_and_ghostscript_never_runs(tmp_path, monkeypatch):
    """PIL hands EPS/PS to Ghostscript; a stand-in `gs` that leaves a mark shows whether it would run."""
    from PIL import EpsImagePlugin

    mark = tmp_path / "ghostscript-ran"
    fake_gs = tmp_path / "gs"
    fake_gs.write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    fake_gs.chmod(0o755)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", str(fake_gs))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nnewpath 0 0 moveto showpage\n"
    assert Image.open(io.BytesIO(eps)).format == "EPS"  # PIL itself would take it
    with pytest.raises(ImageError) as refused:
        decode_image(eps, LIMITS, "drawing.eps")
    assert str(refused.value) == (
        "drawing.eps: corrupt image or unsupported format: accepted formats are PNG, JPEG, WebP, GIF, BMP or TIFF"
    )
    assert not mark.exists()


def test_decode_failures_say_what_broke_without_pil_internals():
    data = png_bytes(draw_sample_image(0))[:200]
    with pytest.raises(ImageError) as refused:
        decode_image(data, LIMITS, "x.png")
    assert str(refused.value) == "x.png: truncated image: the PNG data cannot be decoded"
