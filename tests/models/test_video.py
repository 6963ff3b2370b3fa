"""Video input: PyAV decoding and frame sampling with its limits, a video through the engine as frames, and
`video_url` parts of chat and batch requests (data: URLs, paths, storage URIs) with their 400s.

.venv/bin/python -m pytest tests/models/test_video.py
"""

from __future__ import annotations

import base64
import functools
import io
import json
import shutil

import av
import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from raybooth.cluster.workdir import default_models_dir
from raybooth.models.decoding import SamplingParams
from raybooth.models.images import ImageError, ImageLimits
from raybooth.models.loaders import load_vlm_processor
from raybooth.models.presets import resolve_model
from raybooth.models.video import VideoError, VideoLimits, decode_video, load_video
from raybooth.models.vlm_engine import INVALID_REQUEST, GenerationRequest, VLMEngine, prepare_request
from raybooth.models.vlm_requests import RequestError
from raybooth.openai.chat import ChatLimits, generation_request_from_chat
from raybooth.openai.errors import APIError
from raybooth.openai.protocol import ChatCompletionRequest
from raybooth.samples import draw_sample_image, png_bytes

FRAME_SIZE = (32, 24)
ONE_FPS = VideoLimits(max_frames=4, fps=1.0)


def source_frame(i: int) -> Image.Image:
    return draw_sample_image(i, size=32).resize(FRAME_SIZE)


@functools.cache
def make_video(frames: int = 8, rate: int = 4, container: str = "mp4", codec: str = "mpeg4") -> bytes:
    """`frames` distinct drawn images at `rate` fps (8 at 4 fps: a 2 s clip), encoded in memory."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = FRAME_SIZE
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.asarray(source_frame(i)), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def video_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def nearest_source(frame: Image.Image, candidates: int = 8) -> int:
    """Which drawn image a decoded frame is (lossy codecs change pixels, not which image is closest)."""
    pixels = np.asarray(frame, dtype=np.float32)
    return int(np.argmin([np.abs(pixels - np.asarray(source_frame(i))).mean() for i in range(candidates)]))


# --------------------------------------------------------------------------------------------------
# Decoding and sampling
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("container", "codec"), [("mp4", "mpeg4"), ("webm", "libvpx"), ("avi", "mjpeg")])
def test_frames_are_sampled_at_the_configured_fps_from_each_container(container, codec):
    data = make_video(container=container, codec=codec)
    frames = decode_video(data, VideoLimits(max_frames=8, fps=2.0), ImageLimits())
    # 2 s at 2 fps: t = 0, 0.5, 1.0, 1.5 s, which at 4 fps are source frames 0, 2, 4, 6.
    assert [nearest_source(f) for f in frames] == [0, 2, 4, 6]
    assert all(f.mode == "RGB" and f.size == FRAME_SIZE for f in frames)
    assert [nearest_source(f) for f in decode_video(data, ONE_FPS, ImageLimits())] == [0, 4]


@pytest.mark.parametrize(
    ("data", "limits", "image_limits", "message"),
    [
        (
            make_video(),
            VideoLimits(max_frames=3, fps=2.0),
            ImageLimits(),
            "video too long: 2.0s at video_fps 2",
        ),
        (make_video(), VideoLimits(max_bytes=100), ImageLimits(), "video too large"),
        (make_video(), ONE_FPS, ImageLimits(max_pixels=500), "768 pixels > limit 500"),
        (make_video(), ONE_FPS, ImageLimits(max_aspect_ratio=1.2), "aspect ratio too extreme"),
        (png_bytes(draw_sample_image(0)), ONE_FPS, ImageLimits(), "not a video: accepted containers"),
        (b"#EXTM3U\n#EXT-X-ENDLIST\n", ONE_FPS, ImageLimits(), "not a video"),
        (make_video()[:300], ONE_FPS, ImageLimits(), "corrupt video"),
    ],
    ids=["frames", "bytes", "pixels", "aspect", "png", "playlist", "truncated"],
)
def test_bad_videos_are_one_clear_error(data, limits, image_limits, message):
    with pytest.raises(VideoError, match=message) as info:
        decode_video(data, limits, image_limits, name="clip.mp4")
    assert str(info.value).startswith("clip.mp4: ") and "\n" not in str(info.value)


def test_a_video_is_read_from_a_path_a_data_url_and_a_storage_filesystem(tmp_path):
    data = make_video()
    (tmp_path / "clip.mp4").write_bytes(data)
    memory = fsspec.filesystem("memory")
    memory.pipe("/bucket/clip.mp4", data)
    in_memory = lambda uri: (memory, uri.removeprefix("s3:/"))  # noqa: E731 - the s3:// stand-in
    for ref, fs in [
        (str(tmp_path / "clip.mp4"), None),
        (video_url(data), None),
        ("s3://bucket/clip.mp4", in_memory),
    ]:
        options = {"filesystem": fs} if fs else {}
        assert [nearest_source(f) for f in load_video(ref, ONE_FPS, ImageLimits(), **options)] == [0, 4]
    # The byte limit is checked before the bytes are read, with the video's own setting named.
    with pytest.raises(ImageError, match=r"video too large: .* \(raise max_video_bytes"):
        load_video("s3://bucket/clip.mp4", VideoLimits(max_bytes=100), ImageLimits(), filesystem=in_memory)


# --------------------------------------------------------------------------------------------------
# Through the engine: frames as images where the model has no video processor (tiny-vlm, tiny-smolvlm),
# Qwen-VL's own spatio-temporal patches where it has (raybooth's PIL one, without torchvision)
# --------------------------------------------------------------------------------------------------


@functools.cache
def load_engine(name: str) -> VLMEngine:
    return VLMEngine.from_pretrained(
        resolve_model(name, kind="vlm", models_dir=default_models_dir()), device="cpu"
    )


def ask(*parts, limits: ImageLimits | None = None) -> GenerationRequest:
    options = {"image_limits": limits} if limits is not None else {}
    return GenerationRequest(
        [{"role": "user", "content": [*parts, {"type": "text", "text": "What happens?"}]}],
        SamplingParams(max_tokens=6, temperature=0.0),
        **options,
    )


@pytest.mark.parametrize("preset", ["tiny-vlm", "tiny-smolvlm"])
def test_a_video_is_its_frames_as_images_in_order(preset):
    engine = load_engine(preset)
    frames = decode_video(make_video(), ONE_FPS, ImageLimits())
    as_video = ask({"type": "video", "video": frames})
    as_images = ask(*({"type": "image", "image": f} for f in frames))
    prepared = prepare_request(engine.processor, as_video)
    assert prepared.num_images == 2
    assert prepared.input_ids == prepare_request(engine.processor, as_images).input_ids
    reversed_frames = ask({"type": "video", "video": frames[::-1]})
    video, images, reversed_video = engine.generate([as_video, as_images, reversed_frames])
    assert video.error is None and video.token_ids == images.token_ids and video.completion_tokens == 6
    # The frames reach the model in their order.
    assert not np.allclose(
        prepared.inputs["pixel_values"].numpy(),
        prepare_request(engine.processor, reversed_frames).inputs["pixel_values"].numpy(),
    )
    assert reversed_video.error is None


@pytest.mark.parametrize(
    "preset, video_class",
    [("tiny-qwen2.5-vl", "PilQwen2VLVideoProcessor"), ("tiny-qwen3-vl", "PilQwen3VLVideoProcessor")],
)
def test_a_qwen_video_is_its_processors_patches_and_an_image_is_a_video_of_repeated_frames(
    preset, video_class
):
    """Qwen-VL without torchvision: the PIL video processor gives the model a video as transformers' own
    does. An image is a one-step video of `temporal_patch_size` identical frames, so a video of two copies
    of a frame is, patch for patch, the image processor's output for it; frames are padded to a whole
    temporal patch with the last one; the fps the frames were sampled at sets the time between temporal
    patches (Qwen2.5-VL: `second_per_grid_ts`, which M-RoPE's time axis reads; Qwen3-VL: a timestamp
    before each patch's tokens); the frames reach the model in their order."""
    engine = load_engine(preset)
    processor = engine.processor
    assert type(processor.video_processor).__name__ == video_class
    frame = draw_sample_image(3).resize((72, 40))
    image = processor.image_processor(images=[frame], return_tensors="pt")
    video = processor.video_processor([frame, frame], return_tensors="pt")
    assert video["video_grid_thw"].tolist() == image["image_grid_thw"].tolist() == [[1, 4, 8]]
    np.testing.assert_allclose(video["pixel_values_videos"], image["pixel_values"], atol=1e-5, rtol=0)

    frames = decode_video(make_video(), VideoLimits(max_frames=3, fps=1.5), ImageLimits())
    assert len(frames) == 3
    prepared = prepare_request(processor, ask({"type": "video", "video": frames, "fps": 1.5}))
    (t, h, w), merge = prepared.inputs["video_grid_thw"].tolist()[0], processor.video_processor.merge_size
    assert t == 2  # 3 frames + the last repeated = 2 temporal patches
    pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert prepared.input_ids.count(pad) == t * h * w // merge**2
    if "second_per_grid_ts" in prepared.inputs:
        assert prepared.inputs["second_per_grid_ts"].tolist() == pytest.approx([2 / 1.5])
    else:  # each temporal patch's middle: frames (0, 1) at 1.5 fps, then (2, 2)
        prompt = processor.tokenizer.decode(prepared.input_ids)
        assert "<0.3 seconds>" in prompt and "<1.3 seconds>" in prompt
    padded = prepare_request(processor, ask({"type": "video", "video": [*frames, frames[-1]], "fps": 1.5}))
    torch.testing.assert_close(padded.inputs["pixel_values_videos"], prepared.inputs["pixel_values_videos"])
    backwards = prepare_request(processor, ask({"type": "video", "video": frames[::-1], "fps": 1.5}))
    assert not torch.equal(backwards.inputs["pixel_values_videos"], prepared.inputs["pixel_values_videos"])
    with pytest.raises(RequestError, match="fps must be a positive number"):
        prepare_request(processor, ask({"type": "video", "video": frames, "fps": 0}))


def test_video_frames_count_against_the_image_budget():
    engine = load_engine("tiny-vlm")
    frames = decode_video(make_video(), ONE_FPS, ImageLimits())
    [result] = engine.generate(
        [ask({"type": "video", "video": frames}, limits=ImageLimits(max_resized_pixels=100))]
    )
    assert result.error_type == INVALID_REQUEST and "image 0: image 32x24 would be resized" in result.error


def test_a_text_only_model_refuses_a_video_naming_the_model():
    tokenizer = load_vlm_processor("tiny-llm", models_dir=default_models_dir())
    frames = decode_video(make_video(), ONE_FPS, ImageLimits())
    with pytest.raises(RequestError, match=r"model tiny-llm takes no video; send text only"):
        prepare_request(tokenizer, ask({"type": "video", "video": frames}))


# --------------------------------------------------------------------------------------------------
# video_url parts of chat requests (the chat route and the batch job share this)
# --------------------------------------------------------------------------------------------------


def chat_request(url: str) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "video_url", "video_url": {"url": url}},
                        {"type": "text", "text": "?"},
                    ],
                }
            ]
        }
    )


def test_a_video_url_part_becomes_its_sampled_frames(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(make_video())
    limits = ChatLimits(videos=ONE_FPS)
    for url in (video_url(make_video()), str(tmp_path / "clip.mp4")):
        [message] = generation_request_from_chat(chat_request(url), limits).messages
        video, text = message["content"]
        assert video["type"] == "video" and [nearest_source(f) for f in video["video"]] == [0, 4]
        assert text == {"type": "text", "text": "?"}


@pytest.mark.parametrize(
    ("url", "limits", "message"),
    [
        (video_url(b"not a video at all"), ChatLimits(), "not a video"),
        (video_url(make_video()), ChatLimits(videos=VideoLimits(max_frames=1)), "video too long"),
        (video_url(make_video()), ChatLimits(videos=ONE_FPS, max_images=1), "max_images_per_request"),
        ("/etc/clip.mp4", ChatLimits(inline_videos_only=True), "over HTTP videos must be inline data: URLs"),
    ],
    ids=["not-a-video", "frames", "image-cap", "path-over-http"],
)
def test_a_bad_video_url_is_a_400_naming_the_part(url, limits, message):
    with pytest.raises(APIError, match=message) as info:
        generation_request_from_chat(chat_request(url), limits)
    assert info.value.status == 400 and info.value.param in ("messages[0].content[0].video_url", "messages")


def test_a_bad_video_fails_its_batch_line_only():
    from raybooth.cluster.config import BatchConfig
    from raybooth.pipelines.batch import prepare_request_line

    processor = load_vlm_processor("tiny-vlm", models_dir=default_models_dir())
    limits = ChatLimits.for_batch(BatchConfig(video_fps=1.0, max_video_frames=4))

    def line(url: str) -> bytes:
        return json.dumps(
            {
                "custom_id": url[-8:],
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": chat_request(url).model_dump(),
            }
        ).encode()

    good, bad = (
        prepare_request_line(n, line(u), processor, limits, 0)
        for n, u in [(1, video_url(make_video())), (2, video_url(b"junk" * 9))]
    )
    assert good["error"] is None and good["num_images"] == 2
    assert bad["error_kind"] == "request" and bad["error_param"] == "messages[0].content[0].video_url"
    assert bad["error"].startswith("line 2: ") and "not a video" in bad["error"]

    # A Qwen-VL batch line carries the video's patches, its grid and the batch's video_fps as the row's
    # tensors: what the engine replica reads back.
    from raybooth.pipelines.inference import prepared_from_row

    qwen = load_vlm_processor("tiny-qwen2.5-vl", models_dir=default_models_dir())
    row = prepare_request_line(1, line(video_url(make_video())), qwen, limits, 0)
    assert row["error"] is None
    inputs = prepared_from_row(row).inputs
    assert inputs["video_grid_thw"].tolist()[0][0] == 1  # 2 frames at 1 fps: one temporal patch
    assert inputs["second_per_grid_ts"].tolist() == pytest.approx([2.0]) and "pixel_values_videos" in inputs


def test_a_checkpoints_own_video_settings_are_read_in_every_place_they_are_kept(tmp_path):
    """Real checkpoints keep the video settings in `video_preprocessor_config.json` (older spelling
    `min_pixels`/`max_pixels`) or not at all (the image processor's serve, as in transformers)."""
    source = resolve_model("tiny-qwen2.5-vl", kind="vlm", models_dir=default_models_dir())
    folder = tmp_path / "qwen"
    shutil.copytree(source, folder)
    config_file = folder / "processor_config.json"
    config = json.loads(config_file.read_text())
    inline = config.pop("video_processor")
    config_file.write_text(json.dumps(config))

    from_image = load_vlm_processor(str(folder)).video_processor
    assert (from_image.patch_size, from_image.size.longest_edge) == (inline["patch_size"], 4096)

    own = {**inline, "size": None, "min_pixels": 256, "max_pixels": 1024, "cap_pixels_per_frame": True}
    (folder / "video_preprocessor_config.json").write_text(json.dumps(own))
    video = load_vlm_processor(str(folder)).video_processor
    assert (video.size.shortest_edge, video.size.longest_edge, video.cap_pixels_per_frame) == (
        256,
        1024,
        True,
    )
    frames = [draw_sample_image(i).resize((64, 64)) for i in range(2)]
    assert video(frames)["video_grid_thw"].tolist() == [[1, 4, 4]]  # 32x32: within 1024 pixels
