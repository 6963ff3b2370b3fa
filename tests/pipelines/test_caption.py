"""`raybooth caption` on the session's embedded Ray with tiny-vlm: bad images, resume, parquet and S3 input.

.venv/bin/python -m pytest tests/pipelines/test_caption.py
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image
from transformers import Blip2Config

from raybooth.cli import main
from raybooth.cluster import storage
from raybooth.cluster.config import CaptionConfig
from raybooth.cluster.job_commands import load_job_config, parse_job_args
from raybooth.pipelines.caption import run_caption
from raybooth.pipelines.progress import JobSummary, job_failed
from raybooth.samples import png_bytes, write_sample_images

pytestmark = pytest.mark.slow

# Captions are random text from a random model: 4 tokens prove the path, more would only cost time.
FAST = {"max_new_tokens": 4, "max_prepare_tasks": 2}


def read_output(uri: str) -> pa.Table:
    fs, path = storage.pyarrow_filesystem(uri)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


def bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, format="PNG")  # 36 MP > the 25 MP default, ~40 KB on disk
    return buf.getvalue()


# Both image limits of the config reach the CPU stage: the aspect ratio from the header, and the size after
# tiny-vlm's resize (shortest edge up to 32) before the processor runs.
LIMITS = {"max_image_aspect_ratio": 100, "max_image_resized_pixels": 50_000}


@pytest.fixture(scope="module")
def images_with_bad_ones(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """202 PNGs: 3 corrupt, 2 truncated, 1 decompression bomb, and 2 thin ones past `LIMITS`; returns the
    folder and {name: what its error says}."""
    folder = tmp_path_factory.mktemp("caption_images")
    paths = write_sample_images(folder, 200, size=32)
    bad: dict[str, str] = {}
    for i in (7, 50, 120):
        paths[i].write_bytes(b"\x89PNG but not really" * (i + 1))
        bad[paths[i].name] = "corrupt image"
    for i in (33, 160):
        data = paths[i].read_bytes()
        paths[i].write_bytes(data[: len(data) // 2])
        bad[paths[i].name] = "truncated image"
    paths[99].write_bytes(bomb_png())
    bad[paths[99].name] = "decompression bomb"
    (folder / "strip.png").write_bytes(png_bytes(Image.new("RGB", (1, 400_000))))  # 400000:1
    bad["strip.png"] = "> limit 100:1 (raise max_image_aspect_ratio"
    (folder / "tall.png").write_bytes(png_bytes(Image.new("RGB", (10, 1000))))  # 100:1 -> 32x3200 resized
    bad["tall.png"] = "32x3200 = 102400 pixels > limit 50000 (raise max_image_resized_pixels"
    return folder, bad


def test_202_images_with_8_bad_ones(ray_cluster, images_with_bad_ones, tmp_path):
    folder, bad = images_with_bad_ones
    out = tmp_path / "captions"
    # 8 of 202 (4%) is over a 2% error budget: the job fails, though most rows are fine.
    cfg = CaptionConfig(
        input=str(folder), output=str(out), replicas="1:2", max_error_fraction=0.02, **LIMITS, **FAST
    )
    summary = run_caption(cfg)

    table = read_output(str(out))
    rows = table.to_pylist()
    assert len(rows) == 202 and len({r["row_id"] for r in rows}) == 202
    good = [r for r in rows if r["error"] is None]
    failed = {Path(r["path"]).name: r["error"] for r in rows if r["error"] is not None}
    assert len(good) == 194 and len(failed) == 8
    for name, problem in bad.items():
        assert problem in failed[name], failed[name]
        assert name in failed[name] or name == "tall.png", failed[name]  # the resize check names the image 0
    assert all(isinstance(r["caption"], str) and r["caption"] for r in good)
    assert all(r["model"] == "tiny-vlm" and r["completion_tokens"] == 4 for r in good)
    assert all(r["generate_ms"] > 0 and r["preprocess_ms"] > 0 and 1 <= r["batch_rows"] <= 8 for r in good)
    assert all(r["caption"] is None for r in rows if r["error"] is not None)
    assert (summary.rows, summary.failed, summary.skipped) == (202, 8, 0)
    assert summary.rows_per_s > 0 and 0.0 <= summary.padding_fraction < 1.0
    assert summary.exit_code == 1
    assert "8 of 202 rows failed (4.0% > max_error_fraction 2.0%); first errors:" in summary.error_text()


def test_rerun_resumes_without_duplicates_or_gaps(ray_cluster, tmp_path):
    folder = tmp_path / "imgs"
    write_sample_images(folder, 30, size=32)
    out = tmp_path / "captions"
    first = run_caption(CaptionConfig(input=str(folder), output=str(out), limit=12, **FAST))
    assert first.rows == 12
    # A crash mid-write leaves a cut-off part: it must be neither trusted nor fatal.
    good_part = storage.list_files(str(out), [".parquet"])[0]
    (out / "crashed-part.parquet").write_bytes(Path(good_part).read_bytes()[:100])

    second = run_caption(CaptionConfig(input=str(folder), output=str(out), **FAST))
    assert (second.rows, second.skipped) == (18, 12)
    assert not (out / "crashed-part.parquet").exists()
    ids = read_output(str(out)).column("row_id").to_pylist()
    assert sorted(ids) == sorted(str(p) for p in folder.iterdir())  # every image once

    third = run_caption(CaptionConfig(input=str(folder), output=str(out), **FAST))
    assert (third.rows, third.skipped) == (0, 30)


def test_parquet_input_and_output_on_s3(ray_cluster, s3_bucket, tmp_path):
    # Images as bytes in a parquet file and as s3:// paths in another, both on the loopback S3 server.
    png = [png_bytes(Image.new("RGB", (32, 32), (i * 40, 0, 0))) for i in range(6)]
    for i, data in enumerate(png):
        storage.write_bytes_atomic(f"s3://{s3_bucket}/raw/{i}.png", data)
    by_bytes = pa.table({"image": png[:4] + [b"broken"]})
    by_path = pa.table(
        {"image": [f"s3://{s3_bucket}/raw/{i}.png" for i in (4, 5)] + [f"s3://{s3_bucket}/raw/9.png"]}
    )
    for name, table in (("a.parquet", by_bytes), ("b.parquet", by_path)):
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=2)
        storage.write_bytes_atomic(f"s3://{s3_bucket}/tables/{name}", buf.getvalue())

    out = f"s3://{s3_bucket}/captions"
    # int8 weights in the replicas (quantization: int8), which answer every good row.
    summary = run_caption(
        CaptionConfig(input=f"s3://{s3_bucket}/tables", output=out, quantization="int8", **FAST)
    )
    rows = {r["row_id"]: r for r in read_output(out).to_pylist()}
    assert (summary.rows, summary.failed) == (8, 2)
    assert set(rows) == {f"s3://{s3_bucket}/tables/a.parquet#{i}" for i in range(5)} | {
        f"s3://{s3_bucket}/tables/b.parquet#{i}" for i in range(3)
    }
    assert "corrupt image" in rows[f"s3://{s3_bucket}/tables/a.parquet#4"]["error"]
    assert "missing image" in rows[f"s3://{s3_bucket}/tables/b.parquet#2"]["error"]
    assert rows[f"s3://{s3_bucket}/tables/b.parquet#0"]["path"] == f"s3://{s3_bucket}/raw/4.png"
    assert all(r["caption"] for r in rows.values() if r["error"] is None)


def test_cli_fails_fast_on_bad_input(tmp_path, capsys):
    # No Ray is needed to refuse these: the checks run before the cluster starts.
    assert main(["caption", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 2
    assert "no images" in capsys.readouterr().err
    (tmp_path / "one.png").write_bytes(png_bytes(Image.new("RGB", (8, 8))))
    assert (
        main(["caption", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--replicas", "3:1"]) == 2
    )
    assert "replicas" in capsys.readouterr().err
    assert (
        main(["caption", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--replicas", "two"]) == 2
    )
    capsys.readouterr()
    # A text-only LLM cannot caption, and a family the engine cannot run is refused by name.
    assert main(["caption", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "model=tiny-llm"]) == 2
    assert "model tiny-llm is a text-only LLM and takes no images" in capsys.readouterr().err
    Blip2Config().save_pretrained(tmp_path / "blip2")
    assert (
        main(
            [
                "caption",
                "--input",
                str(tmp_path),
                "--output",
                str(tmp_path / "o"),
                f"model={tmp_path / 'blip2'}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "model type 'blip-2'" in err and "supported families" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("rows", "failed", "fraction", "fails"),
    [
        (10, 0, 0.0, False),
        (10, 1, 0.0, True),  # 0: any failed row fails the job
        (10, 9, 1.0, False),  # the default tolerates all but a run where every row failed
        (10, 10, 1.0, True),
        (100, 29, 0.29, False),  # "more than" the fraction: exactly at it passes (0.29 * 100 < 29 in floats)
        (10, 4, 0.3, True),
        (0, 0, 0.0, False),  # nothing to do (everything was done before) is not a failure
    ],
)
def test_max_error_fraction_decides_the_exit_code(rows, failed, fraction, fails):
    assert job_failed(rows, failed, fraction) is fails
    summary = JobSummary("caption", "out", rows, failed, 0, 1.0, 1.0, 0.0, ["e1"], fraction)
    assert summary.exit_code == int(fails)
    if failed:
        assert summary.error_text().splitlines()[1] == "  e1"


@pytest.mark.parametrize("job", ["caption", "batch"])
def test_max_error_fraction_is_a_flag_and_a_config_key(job):
    args = parse_job_args(job, ["--max-error-fraction", "0.25"])
    assert load_job_config(job, args).max_error_fraction == 0.25
    assert load_job_config(job, parse_job_args(job, ["max_error_fraction=0"])).max_error_fraction == 0.0
    assert load_job_config(job, parse_job_args(job, [])).max_error_fraction == 1.0


def test_caption_on_tiny_qwen_vl_has_no_error_rows(ray_cluster, tmp_path):
    """Qwen-VL rows carry their image grids and token types from the CPU stage to the replicas."""
    folder = tmp_path / "imgs"
    write_sample_images(folder, 6, size=48)
    out = tmp_path / "captions"
    summary = run_caption(CaptionConfig(input=str(folder), output=str(out), model="tiny-qwen2.5-vl", **FAST))
    rows = read_output(str(out)).to_pylist()
    assert (summary.rows, summary.failed) == (6, 0) and summary.exit_code == 0
    assert all(r["error"] is None and r["caption"] and r["completion_tokens"] == 4 for r in rows)
    assert all(r["batch_rows"] > 1 for r in rows)  # one image per row: Qwen rows pack together


# Every other family's rows, through the same CPU stage and replica without Ray: test_job_families.py.


def test_a_job_whose_rows_all_failed_exits_1_with_the_first_errors(ray_cluster, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"broken{i}.png").write_bytes(b"not a png at all")
    out = tmp_path / "captions"
    code = main(
        ["caption", "--input", str(folder), "--output", str(out), "max_new_tokens=4", "max_prepare_tasks=2"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "all 3 rows failed; first errors:" in err and "broken0.png" in err
