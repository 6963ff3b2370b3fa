"""Untrusted image input: limits checked before decoding, EXIF rotation, RGB, and errors that name the problem.

.venv/bin/python -m pytest tests/models/test_images.py
"""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from raybooth.models.chat import ChatLimits, ChatRequestError, generation_request_from_chat
from raybooth.models.images import ImageError, ImageLimits, decode_image, load_image
from raybooth.models.openai_schema import ChatCompletionRequest
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


def test_chat_request_becomes_engine_request_with_decoded_images(tmp_path):
    path = tmp_path / "b.png"
    draw_sample_image(2).save(path)
    body = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare"},
                    {"type": "image_url", "image_url": {"url": str(path)}},
                    {"type": "image_url", "image_url": {"url": data_url(path.read_bytes())}},
                ],
            },
        ],
        "max_completion_tokens": 7,
        "temperature": 0.5,
        "stop": "\n",
        "seed": 4,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object"}},
        },
    }
    request = generation_request_from_chat(ChatCompletionRequest.model_validate(body), ChatLimits())
    assert request.messages[0] == {"role": "system", "content": "Be brief."}
    images = [p["image"] for p in request.messages[1]["content"] if p["type"] == "image"]
    assert len(images) == 2 and all(i.mode == "RGB" for i in images)
    p = request.params
    assert (p.max_tokens, p.temperature, p.stop, p.seed, p.json_schema) == (
        7,
        0.5,
        ["\n"],
        4,
        {"type": "object"},
    )


def test_chat_request_errors_name_the_part_and_the_cap(tmp_path):
    missing = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": str(tmp_path / "x.png")}}],
    }
    with pytest.raises(ChatRequestError, match="missing image") as info:
        generation_request_from_chat(ChatCompletionRequest(messages=[missing]), ChatLimits())
    assert info.value.param == "messages[0].content[0].image_url"
    too_many = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=5000)
    with pytest.raises(ChatRequestError, match="cap of 1024") as info:
        generation_request_from_chat(too_many, ChatLimits())
    assert info.value.param == "max_tokens"
