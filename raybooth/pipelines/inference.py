"""The Ray Data pipeline both batch inference jobs run: prepare on CPU tasks → generation on an actor pool
of model replicas (continuous batching by default) → parquet parts.

    plan = JobPlan("caption", items, rows, prepare_caption_items, {...}, 16, CaptionWorker, parts_uri)
    counts, seconds = run_inference_job(cfg, plan)     # Ray up (or connected) for this job only

Stages (streaming: Ray Data pulls blocks through with backpressure, nothing is materialised):
1. `from_items(work items)`: small descriptors (a file, a parquet row group, a JSONL byte range).
2. `map_batches(prepare_fn)` as CPU tasks: read, decode and check images, apply the chat template,
   tokenize, run the image processor. Output rows carry token ids and pixel tensors, or an error.
3. `map_batches(Worker, compute=ActorPoolStrategy(min, max))`: each replica holds one `VLMEngine` and
   generates the rows of each call (`pack_window` of them): through its continuous-batching scheduler, or
   (`scheduler: static`) in packed token-budget batches (`scheduled_generation.py`).
4. `write_parquet` into the parts folder (see `parts.py` for why that makes reruns safe).

The job-specific parts (what a work item is, how a row is prepared, what an output row looks like) live
in `caption.py` and `batch.py`; this module is the machinery they share.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from raybooth.cluster import storage
from raybooth.cluster.config import InferenceJobConfig
from raybooth.cluster.workdir import default_models_dir
from raybooth.errors import UserError
from raybooth.models.decoding import SamplingParams
from raybooth.models.packing import PackedBatch, PackItem, pack_by_token_budget, pack_fifo
from raybooth.models.speculative import SpeculativeOptions
from raybooth.models.vlm_engine import GenerationResult, PreparedRequest, VLMEngine
from raybooth.models.vlm_scheduler import Scheduler
from raybooth.pipelines.parts import SUMMARY_COLUMNS, list_parts, read_parts, run_counts
from raybooth.pipelines.scheduled_generation import RowStats, generate_continuous, generate_static

log = logging.getLogger(__name__)

# Columns every prepared row carries between the CPU stage and the model replicas. Every processor output
# (pixel values, image grids, token type ids, ...) travels in one safetensors blob, dtypes and shapes kept:
# a plain binary column never trips Arrow's tensor-type unification, whatever the family returns.
PREPARED_FIELDS: list[tuple[str, pa.DataType]] = [
    ("input_ids", pa.list_(pa.int32())),
    ("tensors", pa.binary()),  # safetensors bytes of PreparedRequest.inputs; b"" when there are none
    ("num_images", pa.int32()),
    ("params", pa.string()),  # SamplingParams as JSON
    ("error", pa.string()),  # set: the row skips generation and is written with this error
    ("preprocess_ms", pa.float64()),
]

# Per-row timing and batching stats every output row carries (what each means: RowStats).
STATS_FIELDS: list[tuple[str, pa.DataType]] = [
    ("prompt_tokens", pa.int32()),
    ("completion_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("preprocess_ms", pa.float64()),
    ("generate_ms", pa.float64()),
    ("batch_rows", pa.int32()),
    ("batch_padding_fraction", pa.float64()),
    ("padding_tokens", pa.int32()),
    ("decode_steps", pa.int32()),
    ("idle_slot_steps", pa.int32()),
]


# --------------------------------------------------------------------------------------------------
# Prepared rows: PreparedRequest <-> Arrow columns
# --------------------------------------------------------------------------------------------------


def prepared_columns(prepared: PreparedRequest | None, error: str | None, started: float) -> dict[str, Any]:
    """The PREPARED_FIELDS of one row; `started` is its `time.perf_counter()` at the start of preparing."""
    inputs = prepared.inputs if prepared is not None else {}
    return {
        "input_ids": prepared.input_ids if prepared is not None else [],
        "tensors": save_tensors({k: v.contiguous() for k, v in inputs.items()}) if inputs else b"",
        "num_images": prepared.num_images if prepared is not None else 0,
        "params": json.dumps(dataclasses.asdict(prepared.params)) if prepared is not None else None,
        "error": error,
        "preprocess_ms": (time.perf_counter() - started) * 1000.0,
    }


def prepared_from_row(row: dict[str, Any]) -> PreparedRequest:
    return PreparedRequest(
        input_ids=list(row["input_ids"]),
        params=SamplingParams(**json.loads(row["params"])),
        inputs=load_tensors(row["tensors"]) if row["tensors"] else {},
        num_images=int(row["num_images"] or 0),
    )


@functools.lru_cache(maxsize=4)
def load_processor(model: str) -> Any:
    """The model's processor only (no weights), cached per worker process: CPU tasks reuse it. The same
    loader the replicas use, so a text-only LLM gets its tokenizer and Qwen-VL works without torchvision."""
    from raybooth.models.loaders import load_vlm_processor

    return load_vlm_processor(model, models_dir=default_models_dir())


def check_model_family(model: str, needs_images: bool, job: str) -> None:
    """Refuse, before Ray starts, a local or preset model the engine cannot run, or (`needs_images`) a
    text-only LLM for a job that sends images. A hub id is checked where it loads (no network here)."""
    from pathlib import Path

    from transformers import AutoConfig

    from raybooth.models.presets import resolve_model
    from raybooth.models.vlm_family import detect_family

    path = resolve_model(model, kind="vlm", models_dir=default_models_dir())  # builds a preset once, here
    if not Path(path).is_dir():
        return
    family = detect_family(AutoConfig.from_pretrained(path))
    if needs_images and not family.takes_images:
        raise UserError(
            f"{job}: model {model} is a {family.name} and takes no images; use a vision-language model"
        )


def describe_error(e: BaseException) -> str:
    """One line for an output row's error column: our own errors as written, others with their type."""
    from raybooth.models.images import ImageError
    from raybooth.models.vlm_engine import RequestError
    from raybooth.openai.errors import APIError

    if isinstance(e, ImageError | APIError | RequestError):
        return str(e)
    return f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------------------
# The model replica
# --------------------------------------------------------------------------------------------------


def stats_columns(row: dict[str, Any], result: GenerationResult | None, stats: RowStats) -> dict[str, Any]:
    return {
        "prompt_tokens": result.prompt_tokens if result is not None else len(row.get("input_ids") or []),
        "completion_tokens": result.completion_tokens if result is not None else 0,
        "finish_reason": result.finish_reason if result is not None else None,
        "preprocess_ms": row["preprocess_ms"],
        "generate_ms": stats.generate_ms,
        "batch_rows": stats.batch_rows,
        "batch_padding_fraction": stats.batch_padding_fraction,
        "padding_tokens": stats.padding_tokens,
        "decode_steps": stats.decode_steps,
        "idle_slot_steps": stats.idle_slot_steps,
    }


class GenerationWorker:
    """One model replica in the actor pool. Subclasses say what an output row looks like.

    Each call gets `pack_window` prepared rows and returns one output row per input row, in input order.
    `scheduler="continuous"`: the rows go through this replica's continuous-batching scheduler (its own
    thread; `__call__` waits for the rows' last tokens), up to `max_rows` decoding at once and at most
    `max_batch_tokens` prompt tokens admitted per step, a finished row's slot refilled from the call's
    waiting rows at the next step. `"static"`: the rows are packed (`packing`) and each batch decodes to its
    slowest row. Either way a row's refusal or failure is that row's error, never the others'
    (`scheduled_generation.py`). `counter` is the job's progress actor (None: no progress reported).
    """

    output_schema: pa.Schema

    def __init__(
        self,
        model: str,
        device: str,
        dtype: str | None,
        max_rows: int,
        max_batch_tokens: int,
        packing: str,
        counter: Any,
        model_label: str,
        quantization: str | None = None,
        speculative: dict[str, Any] | None = None,
        scheduler: str = "continuous",
        pack_window: int = 64,
    ):
        if scheduler not in ("continuous", "static"):
            raise ValueError(f"scheduler must be continuous or static, not {scheduler!r}")
        self.engine = VLMEngine.from_pretrained(
            model,
            device=device,
            dtype=dtype,
            models_dir=default_models_dir(),
            quantization=quantization,
            speculative=SpeculativeOptions(**speculative) if speculative else None,
        )
        self.max_rows = max_rows
        self.max_batch_tokens = max_batch_tokens
        self.packing = packing
        self.counter = counter
        self.model_label = model_label
        self.pack_window = pack_window
        self.scheduler: Scheduler | None = None
        if scheduler == "continuous":
            self.scheduler = Scheduler(
                self.engine,
                max_rows=max_rows,
                max_queue=pack_window,  # a call queues at most its window (`__call__` splits bigger ones)
                prefill_token_budget=max_batch_tokens,
                # Whole prompts: chunking keeps streams flowing for chat, but a batch job wants throughput.
                prefill_chunk_tokens=0,
            )

    def close(self) -> None:
        """Stop the scheduler's thread (a replica that ends with its process need not)."""
        if self.scheduler is not None:
            self.scheduler.close()

    def format_row(
        self, row: dict[str, Any], result: GenerationResult | None, stats: RowStats
    ) -> dict[str, Any]:
        raise NotImplementedError

    def pack(self, items: list[PackItem]) -> list[PackedBatch]:
        if self.packing == "fifo":
            return pack_fifo(items, self.max_rows)
        return pack_by_token_budget(items, self.max_rows, self.max_batch_tokens)

    def generate(self, prepared: dict[int, PreparedRequest]) -> dict[int, tuple[GenerationResult, RowStats]]:
        """Each row's result and stats, by its index in the call."""
        if self.scheduler is None:
            items = [PackItem(i, p.prompt_tokens, p.num_images) for i, p in prepared.items()]
            return generate_static(self.engine, prepared, self.pack(items))
        outcomes: dict[int, tuple[GenerationResult, RowStats]] = {}
        indices = list(prepared)
        for start in range(0, len(indices), self.pack_window):  # the scheduler's queue holds one window
            window = indices[start : start + self.pack_window]
            outcomes.update(generate_continuous(self.scheduler, {i: prepared[i] for i in window}))
        return outcomes

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        outputs: list[dict[str, Any] | None] = [None] * len(rows)
        prepared: dict[int, PreparedRequest] = {}
        for i, row in enumerate(rows):
            if row["error"] is not None:
                outputs[i] = self.format_row(row, None, RowStats())
                continue
            try:
                prepared[i] = prepared_from_row(row)
            except Exception as e:  # a row that cannot be rebuilt is that row's problem only
                row = {**row, "error": f"bad prepared row: {describe_error(e)}"}
                outputs[i] = self.format_row(row, None, RowStats())
        for i, (result, stats) in self.generate(prepared).items():
            outputs[i] = self.format_row(rows[i], result, stats)
        done = [o for o in outputs if o is not None]
        if self.counter is not None:
            self.counter.add.remote(len(done), sum(1 for o in done if o.get("error") is not None))
        return pa.Table.from_pylist(done, schema=self.output_schema)


def worker_kwargs(cfg: InferenceJobConfig, counter: Any) -> dict[str, Any]:
    return {
        "model": cfg.model,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "quantization": cfg.quantization,
        "speculative": cfg.speculative.model_dump() if cfg.speculative else None,
        "max_rows": cfg.batch_size,
        "max_batch_tokens": cfg.max_batch_tokens,
        "packing": cfg.packing,
        "scheduler": cfg.scheduler,
        "pack_window": cfg.pack_window,
        "counter": counter,
        "model_label": cfg.model,
    }


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------

# Most blocks `from_items` makes: enough for every CPU of a big cluster, few enough to plan quickly.
MAX_ITEM_BLOCKS = 2000
# Memory reserved per prepare task: one full-size decoded photo (25 MP RGB = 75 MB) plus the processed
# tensors of a call, with room to spare. Reserving it keeps a node from running more decode tasks than
# its RAM holds, and (being a different resource shape from the replicas) keeps Ray Data from fusing
# decoding into the model actors, where it would stall the accelerator.
PREPARE_TASK_MEMORY = 512 * 1024**2


def check_cluster_fits(cfg: InferenceJobConfig, embedded: bool) -> None:
    """Refuse a replica pool that leaves no CPU for the decode tasks feeding it: Ray Data would start the
    replicas, then wait forever for a CPU to decode their first rows. Only an embedded Ray is fixed in
    size; on a real cluster the autoscaler may still add nodes, so there it is only a warning."""
    import ray

    resources = ray.cluster_resources()
    low, _ = cfg.replica_range()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    problems = []
    if low * cfg.num_cpus_per_replica + 1 > cpus:
        problems.append(
            f"{low} replicas x {cfg.num_cpus_per_replica:g} CPUs leave no CPU for decoding on a cluster "
            f"with {cpus:g} CPUs; lower replicas MIN or num_cpus_per_replica (e.g. num_cpus_per_replica=0.5)"
        )
    if low * cfg.num_gpus_per_replica > gpus:
        problems.append(
            f"{low} replicas x {cfg.num_gpus_per_replica:g} GPUs need more than the cluster's {gpus:g} GPUs; "
            "lower replicas MIN or num_gpus_per_replica"
        )
    if problems and embedded:
        raise UserError("; ".join(problems))
    for problem in problems:
        log.warning("%s (waiting for the autoscaler to add nodes)", problem)


@dataclass
class JobPlan:
    """What one run of a batch inference job has to do, as the job module worked it out."""

    label: str  # "caption" | "batch": the progress bar's and the summary's name
    items: list[dict[str, Any]]  # work items for the prepare stage (empty: nothing left to do)
    rows: int  # rows those items hold
    prepare_fn: Callable[..., pa.Table]
    prepare_kwargs: dict[str, Any]
    items_per_prepare_call: int
    worker_cls: type[GenerationWorker]
    parts_uri: str


def require_input_output(cfg: InferenceJobConfig, job: str, input_help: str, output_help: str) -> None:
    if not cfg.input:
        raise UserError(f"{job} needs --input ({input_help})")
    if not cfg.output:
        raise UserError(f"{job} needs --output ({output_help})")


FIRST_ERRORS = 3  # failed rows' errors a summary shows: enough to see a pattern, few enough to read


def first_errors(table: pa.Table | None, limit: int = FIRST_ERRORS) -> list[str]:
    """The first `limit` distinct errors among output rows, in row order."""
    seen: list[str] = []
    for error in table.column("error").to_pylist() if table is not None else []:
        if error is not None and error not in seen:
            seen.append(error)
            if len(seen) == limit:
                break
    return seen


def run_inference_job(
    cfg: InferenceJobConfig, plan: JobPlan, verbose: bool = False
) -> tuple[dict[str, int], float, list[str]]:
    """Run the plan on Ray (started or connected for this job) and count what this run wrote:
    `(counts of the new parts' rows, wall seconds, their first errors)`. Nothing to do: no Ray at all."""
    from raybooth.cluster.runtime import ray_session

    before = set(list_parts(plan.parts_uri))
    seconds = 0.0
    if plan.items:
        with ray_session(cfg.cluster, verbose=verbose) as info:
            seconds = run_generation_pipeline(cfg, plan, verbose=verbose, embedded=info.embedded)
    written = read_parts(plan.parts_uri, SUMMARY_COLUMNS, skip=before)
    return run_counts(written), seconds, first_errors(written)


def run_generation_pipeline(
    cfg: InferenceJobConfig, plan: JobPlan, verbose: bool = False, embedded: bool = False
) -> float:
    """Run the four stages on the connected Ray cluster; returns the wall time in seconds."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from raybooth.cluster.runtime import quiet_ray_logging
    from raybooth.pipelines.progress import ProgressBar, ProgressCounter

    check_cluster_fits(cfg, embedded)
    counter = ProgressCounter.remote()
    quiet_ray_logging(verbose)  # again: importing ray.data resets its loggers to INFO
    # Ray Data warns once that its bars are off; that is on purpose (ours replaces them).
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    # Our own bar shows rows done/failed; Ray Data's per-operator bars would interleave with it.
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    started = time.perf_counter()
    try:
        blocks = max(1, min(MAX_ITEM_BLOCKS, -(-len(plan.items) // plan.items_per_prepare_call)))
        ds = ray.data.from_items(plan.items, override_num_blocks=blocks)
        ds = ds.map_batches(
            plan.prepare_fn,
            fn_kwargs=plan.prepare_kwargs,
            batch_size=plan.items_per_prepare_call,
            batch_format="pyarrow",
            num_cpus=1,
            memory=PREPARE_TASK_MEMORY,
            # More tasks than blocks cannot run anyway (and Ray Data warns about asking for them).
            concurrency=min(cfg.max_prepare_tasks, blocks) if cfg.max_prepare_tasks else None,
        )
        if cfg.limit is not None:
            ds = ds.limit(cfg.limit)
        low, high = cfg.replica_range()
        resources: dict[str, Any] = {"num_cpus": cfg.num_cpus_per_replica}
        if cfg.num_gpus_per_replica > 0:
            resources["num_gpus"] = cfg.num_gpus_per_replica
        ds = ds.map_batches(
            plan.worker_cls,
            compute=ActorPoolStrategy(min_size=low, max_size=high),
            fn_constructor_kwargs=worker_kwargs(cfg, counter),
            batch_size=cfg.pack_window,
            batch_format="pyarrow",
            **resources,
        )
        fs, path = storage.pyarrow_filesystem(plan.parts_uri)
        total = min(plan.rows, cfg.limit) if cfg.limit else plan.rows
        with ProgressBar(counter, total, plan.label):
            ds.write_parquet(path, filesystem=fs)
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved
        ray.kill(counter)
    return time.perf_counter() - started
