"""`raybooth caption`: caption a folder, glob, parquet file or S3 prefix of images on Ray Data.

    raybooth caption --input s3://bucket/images/ --output s3://bucket/captions/ --replicas 1:4

Output: parquet parts under `--output`, one row per input image (also for images that failed):
`row_id`, `path`, `caption`, `model`, `error` (null when fine) and per-row timing and batching columns
(`preprocess_ms`, `generate_ms`, `prompt_tokens`, `completion_tokens`, `batch_rows`, `padding_tokens`,
`idle_slot_steps`, ...: `pipelines/scheduled_generation.py` says what each counts).
Image inputs are files with an image suffix; their row id is their URI. Parquet inputs need a column
of image bytes, image paths, or Hugging Face `Image` structs (`{bytes, path}`); their row id is
`<file URI>#<row index>`. Rerunning with the same `--output` skips rows already written.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from raybooth.cluster import storage
from raybooth.cluster.config import CaptionConfig
from raybooth.errors import UserError
from raybooth.models.decoding import SamplingParams
from raybooth.models.images import ImageLimits, decode_image, load_image
from raybooth.models.vlm_engine import GenerationRequest, GenerationResult, prepare_request
from raybooth.pipelines.inference import (
    PREPARED_FIELDS,
    STATS_FIELDS,
    GenerationWorker,
    JobPlan,
    RowStats,
    check_model_family,
    describe_error,
    load_processor,
    prepared_columns,
    require_input_output,
    run_inference_job,
    stats_columns,
)
from raybooth.pipelines.parts import completed_row_ids
from raybooth.pipelines.progress import JobSummary

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PARQUET_SUFFIX = ".parquet"
GLOB_CHARS = ("*", "?", "[")
# Column names tried, in order, when a parquet input's image column is not configured.
GUESSED_IMAGE_COLUMNS = ("image", "image_bytes", "bytes", "image_path", "path", "uri", "file")
IMAGES_PER_PREPARE_CALL = 16  # one CPU task call decodes this many image files

SOURCE_FIELDS: list[tuple[str, pa.DataType]] = [("row_id", pa.string()), ("path", pa.string())]
PREPARED_SCHEMA = pa.schema(SOURCE_FIELDS + PREPARED_FIELDS)
OUTPUT_SCHEMA = pa.schema(
    SOURCE_FIELDS + [("caption", pa.string()), ("model", pa.string()), ("error", pa.string())] + STATS_FIELDS
)


# --------------------------------------------------------------------------------------------------
# Input: what to caption (driver side, before Ray starts)
# --------------------------------------------------------------------------------------------------


@dataclass
class CaptionInput:
    kind: Literal["images", "parquet"]
    uris: list[str]
    image_column: str | None = None  # parquet only


def _glob(pattern: str) -> list[str]:
    fs, path = storage.filesystem(pattern)
    found = sorted(fs.glob(path))
    if storage.is_remote(pattern):
        scheme = pattern.split("://", 1)[0]
        return [f"{scheme}://{p}" for p in found]
    return found


def _pick_image_column(uri: str, schema: pa.Schema, wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in schema.names:
            raise UserError(
                f"{uri}: no column {wanted!r} (columns: {', '.join(schema.names)}); fix image_column"
            )
        return wanted
    for name in GUESSED_IMAGE_COLUMNS:
        if name in schema.names:
            return name
    raise UserError(
        f"{uri}: no image column found (tried {', '.join(GUESSED_IMAGE_COLUMNS)}; columns: "
        f"{', '.join(schema.names)}); set image_column=<name>"
    )


def find_caption_input(uri: str, image_column: str | None = None) -> CaptionInput:
    """List the images or parquet files `uri` names; `UserError` if it names none."""
    uris = _glob(uri) if any(c in uri for c in GLOB_CHARS) else storage.list_files(uri)
    images = [u for u in uris if u.lower().endswith(IMAGE_SUFFIXES)]
    tables = [u for u in uris if u.lower().endswith(PARQUET_SUFFIX)]
    if images and tables:
        raise UserError(f"--input {uri} mixes image files and parquet files; point it at one kind")
    if tables:
        fs, path = storage.pyarrow_filesystem(tables[0])
        column = _pick_image_column(tables[0], pq.read_schema(path, filesystem=fs), image_column)
        return CaptionInput("parquet", tables, column)
    if images:
        return CaptionInput("images", images)
    raise UserError(
        f"--input {uri}: no images ({', '.join(IMAGE_SUFFIXES)}) or parquet files there; "
        "check the path (folders are searched recursively)"
    )


def caption_work_items(source: CaptionInput, done: set[str]) -> tuple[list[dict[str, Any]], int]:
    """Work items for the rows not yet done, and how many rows they hold.

    An image file is one item; a parquet row group is one item (read by one CPU task), carrying the
    row indices inside it to skip because an earlier run wrote them.
    """
    items: list[dict[str, Any]] = []
    rows = 0
    if source.kind == "images":
        for uri in source.uris:
            if uri not in done:
                items.append(
                    {"file": uri, "row_group": -1, "first_row": 0, "rows": 1, "skip": [], "column": ""}
                )
        return items, len(items)
    for uri in source.uris:
        fs, path = storage.pyarrow_filesystem(uri)
        meta = pq.ParquetFile(path, filesystem=fs).metadata
        first = 0
        for group in range(meta.num_row_groups):
            count = meta.row_group(group).num_rows
            skip = [i for i in range(count) if f"{uri}#{first + i}" in done]
            if len(skip) < count:
                items.append(
                    {
                        "file": uri,
                        "row_group": group,
                        "first_row": first,
                        "rows": count,
                        "skip": skip,
                        "column": source.image_column,
                    }
                )
                rows += count - len(skip)
            first += count
    return items, rows


# --------------------------------------------------------------------------------------------------
# CPU stage: read + decode + prepare
# --------------------------------------------------------------------------------------------------


def _parquet_image_sources(item: dict[str, Any]) -> list[tuple[str, str | None, Any]]:
    """(row id, source path, bytes-or-path-or-exception) for the rows of one parquet row group not yet done."""
    skip = set(item["skip"])
    try:
        fs, path = storage.pyarrow_filesystem(item["file"])
        group = pq.ParquetFile(path, filesystem=fs).read_row_group(
            item["row_group"], columns=[item["column"]]
        )
        values: list[Any] = group.column(0).to_pylist()
    except Exception as e:  # an unreadable row group fails its rows, each with the reason
        values = [ValueError(f"cannot read row group {item['row_group']} of {item['file']}: {e}")] * item[
            "rows"
        ]
    out = []
    for i, value in enumerate(values):
        if i in skip:
            continue
        if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        source = value if isinstance(value, str) else None
        out.append((f"{item['file']}#{item['first_row'] + i}", source, value))
    return out


def row_seed(seed: int, row_id: str) -> int:
    """A per-row sampling seed that depends on the row only, never on its batch or replica."""
    return (seed * 1_000_003 + zlib.crc32(row_id.encode())) % (2**63)


def prepare_caption_items(
    items: pa.Table,
    *,
    model: str,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    limits: ImageLimits,
) -> pa.Table:
    """Ray Data CPU stage: work items → one prepared row per image (or an error row)."""
    processor = load_processor(model)
    out: list[dict[str, Any]] = []
    for item in items.to_pylist():
        if item["row_group"] < 0:
            sources: list[tuple[str, str | None, Any]] = [(item["file"], item["file"], item["file"])]
        else:
            sources = _parquet_image_sources(item)
        for row_id, path, ref in sources:
            started = time.perf_counter()
            try:
                if isinstance(ref, Exception):
                    raise ref
                if ref is None:
                    raise ValueError("no image in this row (the image column is null)")
                name = path or row_id
                image = (
                    decode_image(ref, limits, name)
                    if isinstance(ref, bytes)
                    else load_image(ref, limits, name, filesystem=storage.filesystem)
                )
                request = GenerationRequest(
                    messages=[
                        {
                            "role": "user",
                            "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}],
                        }
                    ],
                    params=SamplingParams(
                        max_tokens=max_new_tokens, temperature=temperature, seed=row_seed(seed, row_id)
                    ),
                    image_limits=limits,
                )
                columns = prepared_columns(prepare_request(processor, request), None, started)
            except Exception as e:
                columns = prepared_columns(None, describe_error(e), started)
            out.append({"row_id": row_id, "path": path, **columns})
    return pa.Table.from_pylist(out, schema=PREPARED_SCHEMA)


# --------------------------------------------------------------------------------------------------
# Model stage
# --------------------------------------------------------------------------------------------------


class CaptionWorker(GenerationWorker):
    output_schema = OUTPUT_SCHEMA

    def format_row(
        self, row: dict[str, Any], result: GenerationResult | None, stats: RowStats
    ) -> dict[str, Any]:
        error = row["error"] or (result.error if result is not None else None)
        return {
            "row_id": row["row_id"],
            "path": row["path"],
            "caption": result.text if result is not None and error is None else None,
            "model": self.model_label,
            "error": error,
            **stats_columns(row, result, stats),
        }


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


def check_caption_config(cfg: CaptionConfig) -> CaptionInput:
    """Everything that can be checked before Ray starts: input, output and model."""
    require_input_output(
        cfg, "caption", "a folder, glob, parquet file or s3:// prefix of images", "a folder or s3:// prefix"
    )
    if not storage.is_remote(cfg.output) and storage.local_path(cfg.output).is_file():
        raise UserError(f"--output {cfg.output} is a file; captions are written as parts into a folder")
    source = find_caption_input(cfg.input, cfg.image_column)
    check_model_family(cfg.model, needs_images=True, job="caption")
    return source


def caption_prepare_kwargs(cfg: CaptionConfig) -> dict[str, Any]:
    """What the CPU stage (`prepare_caption_items`) takes from the job's config."""
    return {
        "model": cfg.model,
        "prompt": cfg.prompt,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "seed": cfg.seed,
        "limits": ImageLimits.from_settings(cfg),
    }


def run_caption(cfg: CaptionConfig, verbose: bool = False) -> JobSummary:
    source = check_caption_config(cfg)
    done = completed_row_ids(cfg.output)  # also deletes parts a crashed run left unreadable
    items, rows = caption_work_items(source, done)
    prepare_kwargs = caption_prepare_kwargs(cfg)
    # An image file is one item; a parquet row group (many rows) is one item on its own.
    per_call = IMAGES_PER_PREPARE_CALL if source.kind == "images" else 1
    plan = JobPlan(
        "caption", items, rows, prepare_caption_items, prepare_kwargs, per_call, CaptionWorker, cfg.output
    )
    counts, seconds, errors = run_inference_job(cfg, plan, verbose=verbose)
    return JobSummary.from_counts(
        "caption", cfg.output, counts, len(done), seconds, errors, cfg.max_error_fraction
    )
