"""`raybooth batch`: answer an OpenAI Batch API file of chat requests on Ray Data.

    raybooth batch --input requests.jsonl --output results.jsonl [--model tiny-vlm]

Input: one JSON object per line, `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}`,
whose `body` is a chat request (`messages` with `text` and `image_url` parts; `image_url.url` a data: URL,
a path or an s3:// URI; `max_tokens`, `temperature`, `top_p`, `seed`, `stop`, `response_format`).
Output: one line per non-blank input line, in input order, in OpenAI's batch output shape:
- a completed request: `{"id", "custom_id", "response": {"status_code": 200, "request_id", "body":
  <chat.completion>}, "error": null}`;
- a request that cannot run (unreachable image, schema that does not compile, max_tokens over the cap):
  `"response": {"status_code": 400, "body": {"error": {"message", "type", "param", "code"}}}`;
- a line that is not a request at all (not JSON, no custom_id, wrong url): `"response": null,
  "error": {"code", "message"}` with the line number in the message.
Progress is kept as parquet parts in `<output>.parts/`; `results.jsonl` is assembled from them, in
input order and in one atomic write, once every line is done. A rerun skips the lines already done.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pyarrow as pa
from pydantic import ValidationError

from raybooth.cluster import storage
from raybooth.cluster.config import BatchConfig
from raybooth.errors import UserError
from raybooth.models.vlm_engine import SERVER_ERROR, GenerationResult, prepare_request
from raybooth.openai.chat import (
    ChatLimits,
    ToolCallFormat,
    chat_completion_response,
    generation_request_from_chat,
)
from raybooth.openai.errors import APIError, validation_error
from raybooth.openai.protocol import BatchError, BatchOutputLine, BatchRequestLine, BatchResponse
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
from raybooth.pipelines.parts import completed_row_ids, read_parts
from raybooth.pipelines.progress import JobSummary

LINES_PER_CHUNK = 64  # lines one CPU task parses and prepares: small enough to spread a 1k-line file

SOURCE_FIELDS: list[tuple[str, pa.DataType]] = [
    ("row_id", pa.int64()),  # 1-based line number in the input file
    ("custom_id", pa.string()),
    ("error_kind", pa.string()),  # "line": not a request (no HTTP status); "request": HTTP 400
    ("error_code", pa.string()),
    ("error_param", pa.string()),
    ("tool_format", pa.string()),  # ToolCallFormat as JSON when tool_choice forces a call, else null
]
PREPARED_SCHEMA = pa.schema(SOURCE_FIELDS + PREPARED_FIELDS)
OUTPUT_SCHEMA = pa.schema(
    [("row_id", pa.int64()), ("custom_id", pa.string()), ("line", pa.string()), ("error", pa.string())]
    + STATS_FIELDS
)


def parts_uri_for(output: str) -> str:
    return f"{output.rstrip('/')}.parts"


# --------------------------------------------------------------------------------------------------
# Input: byte ranges of the JSONL file (driver side, streamed: the file is never held in memory)
# --------------------------------------------------------------------------------------------------


def scan_jsonl(
    uri: str, done: set[int], lines_per_chunk: int = LINES_PER_CHUNK
) -> tuple[list[dict[str, Any]], int, int]:
    """Chunks of not-yet-done lines as byte ranges; plus the file's non-blank lines and those left to do."""
    fs, path = storage.filesystem(uri)
    items: list[dict[str, Any]] = []
    requests = todo = 0
    start = offset = 0
    first = line_no = 1
    skip: list[int] = []

    def close_chunk(end_line: int) -> None:
        if end_line - first > len(skip):  # some line in the chunk is still to do
            items.append(
                {"file": uri, "start": start, "length": offset - start, "first_line": first, "skip": skip}
            )

    with fs.open(path, "rb") as f:
        for raw in f:
            blank = not raw.strip()
            if not blank:
                requests += 1
            if blank or line_no in done:
                skip.append(line_no)
            else:
                todo += 1
            offset += len(raw)
            line_no += 1
            if line_no - first == lines_per_chunk:
                close_chunk(line_no)
                start, first, skip = offset, line_no, []
    close_chunk(line_no)
    return items, requests, todo


# --------------------------------------------------------------------------------------------------
# CPU stage: parse + validate + fetch images + prepare
# --------------------------------------------------------------------------------------------------


def _read_range(uri: str, start: int, length: int) -> bytes:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        f.seek(start)
        return f.read(length)


def prepare_request_line(
    line_no: int, raw: bytes, processor: Any, limits: ChatLimits, seed: int
) -> dict[str, Any]:
    """One input line → a prepared row, or an error row saying what is wrong with it."""
    started = time.perf_counter()
    row: dict[str, Any] = {
        "row_id": line_no,
        "custom_id": None,
        "error_kind": None,
        "error_code": None,
        "error_param": None,
        "tool_format": None,
    }

    def fail(kind: str, code: str, message: str, param: str | None = None) -> dict[str, Any]:
        row.update(error_kind=kind, error_code=code, error_param=param)
        return {**row, **prepared_columns(None, message, started)}

    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return fail("line", "invalid_json", f"line {line_no}: not valid JSON: {e}")
    if isinstance(obj, dict) and isinstance(obj.get("custom_id"), str):
        row["custom_id"] = obj["custom_id"]
    try:
        request = BatchRequestLine.model_validate(obj)
    except ValidationError as e:
        # The HTTP route's reading of the same problem (its `param` names the field the same way).
        err = validation_error(e.errors())
        in_body = e.errors()[0]["loc"][:1] == ("body",)
        if row["custom_id"] is None or not in_body or not isinstance(obj.get("body"), dict):
            # custom_id, method or url wrong: not a batch request at all, so no HTTP status either
            return fail(
                "line", "invalid_request", f"line {line_no}: not a batch request line: {err}", err.param
            )
        return fail("request", err.code, f"line {line_no}: invalid request: {err}", err.param)
    if request.body.n != 1:
        return fail(
            "request",
            "invalid_request",
            f"line {line_no}: n={request.body.n}: a batch job answers each line with one choice; repeat the "
            "line with its own custom_id (and seed) for more",
            "n",
        )
    tool_format = ToolCallFormat.of(request.body)
    row["tool_format"] = tool_format.to_json() if tool_format is not None else None
    try:
        generation = generation_request_from_chat(request.body, limits, default_seed=seed + line_no)
        prepared = prepare_request(processor, generation)
    except APIError as e:
        return fail("request", e.code or "invalid_request", f"line {line_no}: {e}", e.param)
    except Exception as e:
        return fail("request", "invalid_request", f"line {line_no}: {describe_error(e)}")
    return {**row, **prepared_columns(prepared, None, started)}


def prepare_batch_chunks(items: pa.Table, *, model: str, limits: ChatLimits, seed: int) -> pa.Table:
    """Ray Data CPU stage: JSONL byte ranges → one prepared (or error) row per non-blank line."""
    processor = load_processor(model)
    out = []
    for item in items.to_pylist():
        skip = set(item["skip"])
        data = _read_range(item["file"], item["start"], item["length"])
        # Split on \n only, as the driver's line scan did, so line numbers agree.
        for i, raw in enumerate(data.removesuffix(b"\n").split(b"\n")):
            line_no = item["first_line"] + i
            if line_no not in skip and raw.strip():
                out.append(prepare_request_line(line_no, raw, processor, limits, seed))
    return pa.Table.from_pylist(out, schema=PREPARED_SCHEMA)


# --------------------------------------------------------------------------------------------------
# Model stage
# --------------------------------------------------------------------------------------------------


def batch_output_line(
    row: dict[str, Any], result: GenerationResult | None, stats: RowStats, model_label: str
) -> BatchOutputLine:
    """A prepared row and its engine result as OpenAI's batch output line; a refused request's body is
    the `APIError` body the HTTP route would send, with the same status."""
    request_id = f"req_{uuid.uuid4().hex}"
    if row["error_kind"] == "line":
        return BatchOutputLine(
            custom_id=row["custom_id"], error=BatchError(code=row["error_code"], message=row["error"])
        )
    if row["error"] is not None or result is None or result.error is not None:
        message = row["error"] or (result.error if result is not None else "no result")
        if row["error"] is None:
            message = f"line {row['row_id']}: {message}"
        # The server's fault: the whole batch failed, or the engine says this row failed on its side.
        server = stats.server_error or (result is not None and result.error_type == SERVER_ERROR)
        code = row["error_code"] or ("server_error" if server else "invalid_request")
        err = APIError(500 if server else 400, message, param=row["error_param"], code=code)
        return BatchOutputLine(
            custom_id=row["custom_id"],
            response=BatchResponse(status_code=err.status, request_id=request_id, body=err.body()),
        )
    tool_format = ToolCallFormat.from_json(row["tool_format"]) if row["tool_format"] else None
    response = chat_completion_response(result, model=model_label, tool_format=tool_format)
    return BatchOutputLine(
        custom_id=row["custom_id"],
        response=BatchResponse(status_code=200, request_id=request_id, body=response.model_dump(mode="json")),
    )


class BatchWorker(GenerationWorker):
    output_schema = OUTPUT_SCHEMA

    def format_row(
        self, row: dict[str, Any], result: GenerationResult | None, stats: RowStats
    ) -> dict[str, Any]:
        line = batch_output_line(row, result, stats, self.model_label)
        failed = line.error is not None or (line.response is not None and line.response.status_code != 200)
        error = None
        if failed:
            error = line.error.message if line.error is not None else line.response.body["error"]["message"]
        return {
            "row_id": row["row_id"],
            "custom_id": row["custom_id"],
            "line": line.model_dump_json(),
            "error": error,
            **stats_columns(row, result, stats),
        }


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


def check_batch_config(cfg: BatchConfig) -> None:
    """Everything that can be checked before Ray starts: input, output and model."""
    require_input_output(
        cfg,
        "batch",
        "a JSONL file of /v1/chat/completions requests, local or s3://",
        "the results JSONL file",
    )
    if not storage.exists(cfg.input):
        raise UserError(f"--input {cfg.input} does not exist")
    if not storage.is_remote(cfg.input) and storage.local_path(cfg.input).is_dir():
        raise UserError(f"--input {cfg.input} is a folder; pass the JSONL file itself")
    if not storage.is_remote(cfg.output) and storage.local_path(cfg.output).is_dir():
        raise UserError(f"--output {cfg.output} is a folder; pass a file name such as results.jsonl")
    check_model_family(cfg.model, needs_images=False, job="batch")


def assemble_results(parts_uri: str, output: str) -> int:
    """Write every done line, in input order, into `output` in one atomic write; returns the line count."""
    table = read_parts(parts_uri, ["row_id", "line"])
    lines: dict[int, str] = {}
    if table is not None:
        for row_id, line in zip(
            table.column("row_id").to_pylist(), table.column("line").to_pylist(), strict=True
        ):
            lines.setdefault(row_id, line)  # a retried task may have written a row twice: keep one
    text = "".join(lines[k] + "\n" for k in sorted(lines))
    storage.write_text_atomic(output, text)
    return len(lines)


def run_batch(cfg: BatchConfig, verbose: bool = False) -> JobSummary:
    check_batch_config(cfg)
    parts = parts_uri_for(cfg.output)
    done = completed_row_ids(parts)  # also deletes parts a crashed run left unreadable
    items, requests, todo = scan_jsonl(cfg.input, done)
    prepare_kwargs = {"model": cfg.model, "limits": ChatLimits.for_batch(cfg), "seed": cfg.seed}
    plan = JobPlan("batch", items, todo, prepare_batch_chunks, prepare_kwargs, 1, BatchWorker, parts)
    counts, seconds, errors = run_inference_job(cfg, plan, verbose=verbose)
    left = requests - len(completed_row_ids(parts))
    output = cfg.output
    if left <= 0:
        assemble_results(parts, cfg.output)
    else:
        output = f"{parts} ({left} of {requests} lines left; rerun to finish)"
    return JobSummary.from_counts("batch", output, counts, len(done), seconds, errors, cfg.max_error_fraction)
