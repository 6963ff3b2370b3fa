"""Benchmark: the Ray Data batch job vs a plain single-process loop over the same engine; packing vs FIFO;
continuous batching vs packed static batches.

    .venv/bin/python benchmarks/batch_inference.py                  # CPU, tiny-vlm, 96 requests
    .venv/bin/python benchmarks/batch_inference.py --schedulers --rows 200   # continuous vs packed, same job
    .venv/bin/python benchmarks/batch_inference.py --device cuda    # GPU, a ~1.4B LLaVA-shaped VLM
    .venv/bin/python benchmarks/batch_inference.py --model tiny-qwen2.5-vl   # one family's batching
    .venv/bin/python benchmarks/batch_inference.py --model all      # every VLM preset, one table

One run measures both sides on the same workload: OpenAI batch request lines whose prompts spread from
~10 to ~1000 tokens (log-uniform: many short, a few long) with 0-2 images each.
- Ray Data: `run_batch` (CPU decode tasks → packed batches on the replica pool → parquet parts → JSONL),
  timed from job start to the assembled results file, replica start and model load included.
- Plain loop: one process parses, fetches images, prepares and calls `VLMEngine.generate` on FIFO batches
  of the same batch size, model load included.
Printed: rows/s of each and their ratio, and the padding fraction of token-budget packing vs FIFO
batches over the workload's real prompt lengths (plus what the Ray job measured in its own batches).

`--schedulers` runs the same `raybooth batch` job twice on one Ray cluster, `scheduler: continuous` and
`scheduler: static` (token-budget packing), on a workload whose requests ask for 1..max_tokens tokens each
(as Batch API requests do), after a small warm-up job so neither pays Ray's first start. Printed: each
one's rows/s and the padding fraction it paid (prompt pads plus decode slots left empty, as the job's
summary counts them: `pipelines/scheduled_generation.py`), and the ratios.

`--model <preset>` (or `all`) measures each family's batching instead, in one process: the same kind of
workload shaped for the family (no images for a text-only LLM; one image and a `<CAPTION>` task prompt
for Florence-2), prepared once, then generated in token-budget packed batches and in FIFO batches.
Printed per preset: rows/s of both and the padding fraction of both, so a regression in one family's
batching (rows run alone, padding that grew) shows as its own row.

The GPU model is built here from configs (random weights, bf16): CLIP-L/14-336 vision tower + a
TinyLlama-sized decoder, with tiny-vlm's tokenizer and chat template; its answers are noise, its cost is
real. Product code only ships the tiny preset.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from raybooth.cluster.config import BatchConfig, ClusterSection
from raybooth.cluster.runtime import init_ray
from raybooth.cluster.workdir import default_models_dir
from raybooth.models.packing import PackedBatch, PackItem, pack_by_token_budget, pack_fifo, padding_fraction
from raybooth.models.presets import PRESETS
from raybooth.models.vlm_engine import PreparedRequest, VLMEngine
from raybooth.models.vlm_requests import takes_images, takes_task_prompts
from raybooth.openai.chat import ChatLimits, generation_request_from_chat
from raybooth.openai.protocol import BatchRequestLine
from raybooth.pipelines.batch import run_batch
from raybooth.samples import draw_sample_image, png_bytes

WORDS = [
    "a",
    "photo",
    "of",
    "a",
    "dog",
    "on",
    "the",
    "beach",
    "with",
    "a",
    "red",
    "ball",
    "and",
    "a",
    "cat",
    "sleeping",
    "on",
    "the",
    "sofa",
]


def build_bench_vlm(dest: Path, device: str) -> Path:
    """A LLaVA-1.5-shaped model of realistic size (random bf16 weights) next to tiny-vlm's tokenizer."""
    from transformers import (
        AutoProcessor,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from raybooth.models.presets import resolve_model

    if (dest / "config.json").exists():
        return dest
    tiny = AutoProcessor.from_pretrained(resolve_model("tiny-vlm", models_dir=default_models_dir()))
    tokenizer = tiny.tokenizer
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
        ),
        tokenizer=tokenizer,
        patch_size=14,  # 336 / 14 = 24 → 576 image tokens per image, as LLaVA-1.5
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tiny.chat_template,
    )
    vision = CLIPVisionConfig(  # CLIP ViT-L/14-336
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )  # fmt: skip
    text = LlamaConfig(  # TinyLlama-1.1B's shape
        vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        image_seq_length=576,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1.4B weights on the GPU takes seconds, on a CPU minutes
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return dest


VLM_PRESETS = [p.name for p in PRESETS.values() if p.kind == "vlm"]


def make_requests(
    rows: int,
    max_tokens: int,
    seed: int = 0,
    image_counts: tuple[int, ...] = (0, 1, 1, 2),
    max_words: int = 650,
    task_prompt: str | None = None,
    image_sizes: tuple[int, ...] = (64, 64, 64, 64),
    vary_max_tokens: bool = False,
) -> list[str]:
    """Batch request lines: prompts log-uniform over 5..max_words words (~1.3 tokens each; most short),
    a count of images drawn from `image_counts` (of `image_sizes`: sizes that vary give tile and patch
    counts that vary), greedy. A task
    prompt replaces the text (a Florence-2-style model reads only that). `vary_max_tokens`: each request
    asks for 1..max_tokens tokens (uniform) instead of max_tokens."""
    rng = random.Random(seed)
    images = [
        "data:image/png;base64," + base64.b64encode(png_bytes(draw_sample_image(i, size=size))).decode()
        for i, size in enumerate(image_sizes)
    ]
    lines = []
    for i in range(rows):
        words = int(5 * (max_words / 5) ** rng.random())
        text = task_prompt or " ".join(rng.choice(WORDS) for _ in range(words))
        content = [
            {"type": "image_url", "image_url": {"url": rng.choice(images)}}
            for _ in range(rng.choice(image_counts))
        ]
        content.append({"type": "text", "text": text})
        body = {
            "messages": [{"role": "user", "content": content}],
            "max_tokens": rng.randint(1, max_tokens) if vary_max_tokens else max_tokens,
            "temperature": 0,
        }
        lines.append(
            json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        )
    return lines


def plain_loop(
    lines: list[str], model: str, device: str, dtype: str | None, batch_size: int
) -> tuple[float, list]:
    """The baseline: one process, FIFO batches, same engine. Returns (seconds, prepared requests)."""
    started = time.perf_counter()
    engine = VLMEngine.from_pretrained(model, device=device, dtype=dtype, models_dir=default_models_dir())
    limits = ChatLimits(default_max_tokens=64, max_tokens_cap=4096)
    prepared = []
    for line in lines:
        body = BatchRequestLine.model_validate_json(line).body
        prepared.append(engine.prepare(generation_request_from_chat(body, limits)))
    for i in range(0, len(prepared), batch_size):
        for result in engine.generate(prepared[i : i + batch_size]):
            assert result.error is None, result.error
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, prepared


def run_batches(engine: VLMEngine, prepared: list[PreparedRequest], batches: list[PackedBatch]) -> float:
    """Seconds to generate every batch (rows must all succeed: a failed row would flatter the rate)."""
    started = time.perf_counter()
    for batch in batches:
        for result in engine.generate([prepared[i] for i in batch.indices]):
            assert result.error is None, result.error
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def family_benchmark(
    preset: str, rows: int, max_tokens: int, batch_size: int, device: str
) -> dict[str, float | str]:
    """One preset's rows/s and padding fraction with token-budget packing and with FIFO batches."""
    engine = VLMEngine.from_pretrained(preset, device=device, models_dir=default_models_dir())
    if not takes_images(engine.processor):
        shape: dict = {"image_counts": (0,)}
    elif takes_task_prompts(engine.processor):
        shape = {"image_counts": (1,), "task_prompt": "<CAPTION>"}
    else:
        shape = {"image_counts": (0, 1, 1, 2)}
    # Short prompts: the tiny presets' context is 1024 positions, image tokens included.
    lines = make_requests(rows, max_tokens, max_words=200, image_sizes=(32, 48, 64, 80), **shape)
    limits = ChatLimits(default_max_tokens=max_tokens, max_tokens_cap=4096)
    prepared = [
        engine.prepare(generation_request_from_chat(BatchRequestLine.model_validate_json(line).body, limits))
        for line in lines
    ]
    items = [PackItem(i, p.prompt_tokens, p.num_images) for i, p in enumerate(prepared)]
    packed = pack_by_token_budget(items, batch_size, batch_size * 1024)
    fifo = pack_fifo(items, batch_size)
    run_batches(engine, prepared, fifo)  # warm-up: first-call allocations of each shape stay out of the rates
    # Best of three, the two interleaved: a tiny model's batch takes milliseconds, so a busy moment of the
    # box (or whichever ran first) would otherwise decide.
    times = {"packed": [], "fifo": []}
    for _ in range(3):
        times["packed"].append(run_batches(engine, prepared, packed))
        times["fifo"].append(run_batches(engine, prepared, fifo))
    return {
        "preset": preset,
        "family": engine.family.name,
        "packed_rows_s": rows / min(times["packed"]),
        "fifo_rows_s": rows / min(times["fifo"]),
        "packed_padding": padding_fraction(packed),
        "fifo_padding": padding_fraction(fifo),
        "batches": f"{len(packed)}/{len(fifo)}",
    }


def print_family_table(results: list[dict], rows: int, max_tokens: int, batch_size: int) -> None:
    print(f"per-family batching: {rows} requests, {max_tokens} new tokens, batch size {batch_size}")
    header = (
        f"{'preset':<20} {'rows/s packed':>13} {'rows/s FIFO':>11} {'pad packed':>10} {'pad FIFO':>8} "
        f"{'batches p/F':>11}  family"
    )
    print(header)
    print("-" * (len(header) + 30))
    for r in results:
        print(
            f"{r['preset']:<20} {r['packed_rows_s']:>13.2f} {r['fifo_rows_s']:>11.2f} "
            f"{r['packed_padding']:>10.3f} {r['fifo_padding']:>8.3f} {r['batches']:>11}  {r['family']}"
        )


def compare_schedulers(work: Path, rows: int, max_tokens: int, batch_size: int, replicas: str) -> None:
    """The same batch job with `scheduler: continuous` and `scheduler: static`: rows/s and paid padding."""
    lines = make_requests(rows, max_tokens, vary_max_tokens=True)
    requests = work / "requests.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    init_ray(ClusterSection(num_cpus=max(4, os.cpu_count() or 1)))

    def job(name: str, scheduler: str, limit: int | None = None):
        cfg = BatchConfig(
            input=str(requests), output=str(work / f"{name}.jsonl"), model="tiny-vlm", batch_size=batch_size,
            max_batch_tokens=batch_size * 1024, pack_window=batch_size * 8, replicas=replicas,
            max_new_tokens=max_tokens, max_tokens_cap=4096, scheduler=scheduler, limit=limit,
        )  # fmt: skip
        summary = run_batch(cfg)
        if summary.failed:
            raise SystemExit(f"{name}: {summary.text()}\n{summary.error_text()}")
        return summary

    job("warm-up", "static", limit=2 * batch_size)  # Ray Data's and the replicas' first start stay out
    results = {s: job(s, s) for s in ("continuous", "static")}
    print(
        f"workload: {rows} requests, 1..{max_tokens} new tokens each, batch size {batch_size}, replicas {replicas}"
    )
    for name, summary in results.items():
        print(
            f"{name:<10}: {summary.rows_per_s:8.2f} rows/s ({summary.seconds:.1f}s), "
            f"paid padding fraction {summary.padding_fraction:.3f}"
        )
    continuous, static = results["continuous"], results["static"]
    print(f"ratio rows/s continuous/static: {continuous.rows_per_s / static.rows_per_s:.2f}x")
    print(
        f"ratio padding static/continuous: {static.padding_fraction / max(continuous.padding_fraction, 1e-9):.2f}x"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rows", type=int, default=None, help="requests (default: 96 on cpu, 512 on cuda)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="rows per batch (default: 8 cpu, 32 cuda)"
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    parser.add_argument(
        "--replicas", default=None, help="MIN:MAX replicas (default: 2:2 on cpu, 1:1 on cuda)"
    )
    parser.add_argument(
        "--model",
        choices=[*VLM_PRESETS, "all"],
        default=None,
        help="measure one preset's batching (or every VLM preset: all) in one process instead of Ray vs plain",
    )
    parser.add_argument(
        "--schedulers", action="store_true", help="the same batch job continuous vs static (packed), on CPU"
    )
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("--device cuda: torch sees no GPU here", file=sys.stderr)
        return 2
    if args.model is not None:
        torch.set_num_threads(1)  # tiny models are all overhead: threads only wait on each other
        rows, batch_size = args.rows or (256 if cuda else 24), args.batch_size or (32 if cuda else 8)
        presets = VLM_PRESETS if args.model == "all" else [args.model]
        results = [family_benchmark(p, rows, args.max_tokens, batch_size, args.device) for p in presets]
        print_family_table(results, rows, args.max_tokens, batch_size)
        return 0
    rows = args.rows or (512 if cuda else 96)
    batch_size = args.batch_size or (32 if cuda else 8)
    replicas = args.replicas or ("1:1" if cuda else "2:2")
    if args.schedulers:
        with tempfile.TemporaryDirectory(prefix="raybooth-bench-") as tmp:
            compare_schedulers(Path(tmp), rows, args.max_tokens, batch_size, replicas)
        return 0

    with tempfile.TemporaryDirectory(prefix="raybooth-bench-") as tmp:
        work = Path(tmp)
        model = str(build_bench_vlm(work / "bench-vlm", "cuda")) if cuda else "tiny-vlm"
        dtype = "bf16" if cuda else None
        lines = make_requests(rows, args.max_tokens)
        requests = work / "requests.jsonl"
        requests.write_text("\n".join(lines) + "\n")
        print(
            f"workload: {rows} requests, {args.max_tokens} new tokens each, batch size {batch_size}, device {args.device}"
        )

        # On a small CPU box, offer at least 4 logical CPUs so two single-thread replicas and the decode
        # tasks all run (the plain loop gets the same cores through torch's intra-op threads).
        init_ray(ClusterSection(num_cpus=None if cuda else max(4, os.cpu_count() or 1)))
        cfg = BatchConfig(
            input=str(requests),
            output=str(work / "results.jsonl"),
            model=model,
            dtype=dtype,
            batch_size=batch_size,
            max_batch_tokens=batch_size * 1024,  # the row cap binds first; the budget only stops outliers
            pack_window=batch_size * 8,
            replicas=replicas,
            num_gpus_per_replica=1 if cuda else 0,
            max_new_tokens=args.max_tokens,
        )
        ray_summary = run_batch(cfg)
        if ray_summary.rows != rows or ray_summary.failed:
            errors = [o["response"] for o in map(json.loads, Path(cfg.output).read_text().splitlines())]
            raise SystemExit(
                f"{ray_summary.text()}; first failure: {next(e for e in errors if e['status_code'] != 200)}"
            )

        plain_seconds, prepared = plain_loop(lines, model, args.device, dtype, batch_size)

    items = [PackItem(i, p.prompt_tokens, p.num_images) for i, p in enumerate(prepared)]
    lengths = sorted(p.prompt_tokens for p in prepared)
    packed = padding_fraction(pack_by_token_budget(items, batch_size, cfg.max_batch_tokens))
    fifo = padding_fraction(pack_fifo(items, batch_size))
    plain_rate = rows / plain_seconds
    print(f"prompt tokens: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
    print(
        f"ray data job : {ray_summary.rows_per_s:8.2f} rows/s ({ray_summary.seconds:.1f}s, replicas {replicas})"
    )
    print(f"plain loop   : {plain_rate:8.2f} rows/s ({plain_seconds:.1f}s, FIFO batches)")
    print(f"ratio ray/plain: {ray_summary.rows_per_s / plain_rate:.2f}x")
    print(
        f"padding fraction: packed {packed:.3f} vs FIFO {fifo:.3f} ({fifo / max(packed, 1e-9):.1f}x less padding)"
    )
    print(f"padding fraction measured in the ray job's own batches: {ray_summary.padding_fraction:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
