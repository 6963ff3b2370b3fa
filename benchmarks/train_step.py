"""Benchmark: the DreamBooth train step: LoRA memory features per family; Ray Train's overhead; SD 1.5's matrix.

    .venv/bin/python benchmarks/train_step.py --preset tiny-flux                 # LoRA table, CPU, 32 px
    .venv/bin/python benchmarks/train_step.py --preset flux-arch --device cuda   # LoRA table, 1024 px bf16
    .venv/bin/python benchmarks/train_step.py --mode overhead                    # tiny-sd: plain vs Ray Train
    .venv/bin/python benchmarks/train_step.py --preset sd15-arch --device cuda   # 512 px fp16 matrix

LoRA mode (the default but for sd15-arch): steps/s and peak memory (GPU: max allocated; CPU: the process's
max RSS) of a LoRA step with text-embedding caching (the frozen text encoders freed after encoding, as
`cache_text_embeddings` does) off/on x gradient checkpointing off/on, each configuration in a fresh
process, with each row's ratio to the first: the sdxl-arch/flux-arch rows at 1024 px are the figures to
set beside those diffusers' READMEs give for train_dreambooth_lora_sdxl.py / _flux.py. Only models/ is
imported (Ray only in overhead mode).

Overhead mode (`--mode overhead`, tiny-sd): the same model, data, batch and `models.dreambooth.train_step`
timed (a) in a plain loop in this process and (b) inside a Ray Train `TorchTrainer` with one worker
(`prepare_model`, a `ray.train.report` every --report-every steps as a training loop between
checkpoints does), the worker given the same number of threads. Printed: steps/s and peak memory of
each, and their ratio: Ray Train's overhead on the step itself (startup is reported apart).

Matrix mode (the default for sd15-arch): steps/s and peak GPU memory of the full UNet fine-tune
at --resolution (512) in fp16 autocast with fp32 master weights and AdamW, batch 1 instance + 1 class
image, for latent/text caching off/on x gradient checkpointing off/on. diffusers publishes ~0.9-1.1 it/s
on a T4 (16 GB) for SD 1.5 DreamBooth with fp16, 8-bit Adam and gradient checkpointing; plain AdamW keeps
fp32 optimizer state (8 bytes/param more than 8-bit Adam's ~2), so compare steps/s, not memory, there.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raybooth.cluster.workdir import default_models_dir
from raybooth.models.device import make_grad_scaler, pick_device
from raybooth.models.dreambooth import (
    EncodingCache,
    StepSettings,
    make_lr_scheduler,
    make_optimizer,
    prepare_for_training,
    train_step,
)
from raybooth.models.dreambooth_data import DreamBoothData, load_example
from raybooth.models.loaders import load_sd_components
from raybooth.models.train_memory import free_frozen_text_encoders, training_precision
from raybooth.samples import draw_sample_image, png_bytes


@dataclass
class Setup:
    preset: str
    device: str
    resolution: int
    mixed_precision: str | None  # None: the family's training default (bf16 for SD3/Flux on a GPU)
    gradient_checkpointing: bool
    cache_latents: bool
    threads: int
    train_mode: str = "full"
    cache_text: bool = False  # frozen text encoders freed after encoding (cache_text_embeddings)


@dataclass
class Timing:
    steps_per_s: float
    peak_memory_mb: float
    setup_s: float
    bare_steps_per_s: float | None = None  # Ray Train: the same steps without any report
    median_steps_per_s: float | None = None  # 1 / the median step time: robust to a busy machine's spikes


def make_data(resolution: int) -> DreamBoothData:
    """3 instance photos + 4 class images drawn locally (no class-image generation in the timing)."""

    def example(i: int, prompt: str):
        image = png_bytes(draw_sample_image(i, size=max(64, resolution)))
        return load_example(image, f"sample_{i}", prompt, 0, resolution)

    instance = [example(i, "a photo of sks dog") for i in range(3)]
    classes = [[example(100 + i, "a photo of dog") for i in range(4)]]
    return DreamBoothData(instance, classes, resolution, center_crop=True, random_flip=False, seed=0)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed_loop(setup: Setup, steps: int, warmup: int, report: Any = None, report_every: int = 0) -> Timing:
    """Build everything, run `warmup` untimed steps, then time `steps`; `report(step)` is called as a loop would."""
    started = time.perf_counter()
    torch.set_num_threads(setup.threads)
    device = pick_device(setup.device)
    components = load_sd_components(setup.preset, device=device, models_dir=default_models_dir())
    plan = training_precision(setup.mixed_precision, components.family, device)
    models = prepare_for_training(
        components,
        train_mode=setup.train_mode,
        train_text_encoder=False,
        plan=plan,
        gradient_checkpointing=setup.gradient_checkpointing,
    )
    del components  # what the worker does: a freed text encoder must have no other reference
    if report is not None:  # inside Ray Train: the step runs on what prepare_model returns
        import ray.train.torch

        models.unet = ray.train.torch.prepare_model(models.unet, move_to_device=False)
    data = make_data(setup.resolution)
    if setup.cache_text:
        free_frozen_text_encoders(models, [*data.all_prompts(), ""], plan)
    cache = EncodingCache.build(models, data) if setup.cache_latents else None
    optimizer = make_optimizer(models, 1e-4 if setup.train_mode == "lora" else 5e-6)
    lr_scheduler, scaler = make_lr_scheduler(optimizer, 0), make_grad_scaler(plan)
    settings = StepSettings()
    setup_s = time.perf_counter() - started

    def step(i: int) -> None:
        train_step(models, optimizer, lr_scheduler, scaler, plan, data, cache, settings, i)
        if report is not None and report_every and (i + 1) % report_every == 0:
            report(i + 1)

    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    begin = time.perf_counter()
    durations = []
    for i in range(warmup, warmup + steps):
        started_step = time.perf_counter()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        durations.append(time.perf_counter() - started_step)
    total = time.perf_counter() - begin
    median = sorted(durations)[len(durations) // 2]
    return Timing(steps / total, peak_memory_mb(device), setup_s, median_steps_per_s=1 / median)


def ray_train_func(config: dict) -> None:
    """The same timed loop on a Ray Train worker; the timing travels back as the last report's metrics."""
    import ray.train

    setup = Setup(**config["setup"])
    # Twice: the bare step (prepare_model, no reports), then with a report every N steps. A report waits
    # until Ray Train's controller has taken the previous one (it polls every ~2 s), so reports much more
    # frequent than that throttle the loop; between checkpoints minutes apart they cost nothing.
    bare = timed_loop(setup, config["steps"], config["warmup"], report=lambda s: None, report_every=0)
    timing = timed_loop(
        setup,
        config["steps"],
        config["warmup"],
        report=lambda s: ray.train.report({"step": s}),
        report_every=config["report_every"],
    )
    timing.bare_steps_per_s = bare.steps_per_s
    # Ray Train V2 keeps the metrics of reports that carry a checkpoint: attach a tiny one.
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "timing.json").write_text(json.dumps(timing.__dict__))
        ray.train.report(
            {"timing": json.dumps(timing.__dict__)}, checkpoint=ray.train.Checkpoint.from_directory(folder)
        )


def run_in_ray_train(setup: Setup, steps: int, warmup: int, report_every: int) -> tuple[Timing, float]:
    """(timing inside the worker, wall seconds of the whole fit including Ray Train startup)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(
        num_cpus=setup.threads + 1,
        num_gpus=1 if setup.device.startswith("cuda") else 0,
        include_dashboard=False,
        log_to_driver=False,
    )
    resources = {"CPU": setup.threads, **({"GPU": 1} if setup.device.startswith("cuda") else {})}
    started = time.perf_counter()
    trainer = TorchTrainer(
        ray_train_func,
        train_loop_config={
            "setup": setup.__dict__,
            "steps": steps,
            "warmup": warmup,
            "report_every": report_every,
        },
        scaling_config=ScalingConfig(
            num_workers=1, use_gpu=setup.device.startswith("cuda"), resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=f"bench-train-step-{int(time.time())}",
            storage_path=tempfile.mkdtemp(prefix="raybooth-bench-"),
        ),
    )
    result = trainer.fit()
    wall = time.perf_counter() - started
    ray.shutdown()
    return Timing(**json.loads(result.metrics["timing"])), wall


def overhead_mode(args: argparse.Namespace) -> None:
    setup = Setup(args.preset, args.device, args.resolution, args.mixed_precision, False, False, args.threads)
    print(
        f"train step, {args.preset} at {args.resolution}px on {args.device}, batch 1+1, {args.threads} thread(s), "
        f"{args.steps} timed steps after {args.warmup} warm-up"
    )
    plain = timed_loop(setup, args.steps, args.warmup)
    print(
        f"  plain loop:           {plain.steps_per_s:8.2f} steps/s   peak {plain.peak_memory_mb:8.0f} MB   "
        f"(setup {plain.setup_s:.1f}s)"
    )
    inside, wall = run_in_ray_train(setup, args.steps, args.warmup, args.report_every)
    print(
        f"  Ray Train, 1 worker:  {inside.bare_steps_per_s:8.2f} steps/s   peak {inside.peak_memory_mb:8.0f} MB   "
        f"(setup {inside.setup_s:.1f}s in the worker; fit() {wall:.1f}s wall with Ray Train startup)"
    )
    print(f"  ... with a report every {args.report_every} steps: {inside.steps_per_s:.2f} steps/s")
    print(
        f"ratio plain / Ray Train steps/s: {plain.steps_per_s / inside.bare_steps_per_s:.3f} "
        f"(with reports every {args.report_every} steps: {plain.steps_per_s / inside.steps_per_s:.3f})"
    )


def matrix_mode(args: argparse.Namespace) -> None:
    print(
        f"train step, {args.preset} full UNet fine-tune at {args.resolution}px on {args.device}, "
        f"{args.mixed_precision} autocast + AdamW, batch 1 instance + 1 class, {args.steps} timed steps"
    )
    rows = []
    for cache in (False, True):
        for checkpointing in (False, True):
            setup = Setup(
                args.preset,
                args.device,
                args.resolution,
                args.mixed_precision,
                checkpointing,
                cache,
                args.threads,
            )
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            t = timed_loop(setup, args.steps, args.warmup)
            rows.append((cache, checkpointing, t))
            print(
                f"  cache_latents={cache!s:<5}  gradient_checkpointing={checkpointing!s:<5}  "
                f"{t.steps_per_s:7.3f} steps/s   peak {t.peak_memory_mb / 1024:7.2f} GB",
                flush=True,
            )
    base = rows[0][2]
    best = max(rows, key=lambda r: r[2].steps_per_s)
    least = min(rows, key=lambda r: r[2].peak_memory_mb)
    print(
        f"ratio caching speed-up (no checkpointing): {rows[2][2].steps_per_s / base.steps_per_s:.3f}; "
        f"checkpointing memory ratio (no caching): {rows[1][2].peak_memory_mb / base.peak_memory_mb:.3f}; "
        f"fastest {best[2].steps_per_s:.2f} steps/s, smallest {least[2].peak_memory_mb / 1024:.2f} GB"
    )


def _row_in_fresh_process(setup: Setup, steps: int, warmup: int) -> Timing:
    """One configuration in its own process: its peak memory is its own (ru_maxrss never goes down)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(timed_loop, (setup, steps, warmup))


def lora_mode(args: argparse.Namespace) -> None:
    print(
        f"train step, {args.preset} LoRA (rank 4) at {args.resolution}px on {args.device}, "
        f"precision {args.mixed_precision or 'auto'}, batch 1 instance + 1 class, median of {args.steps} steps after "
        f"{args.warmup} warm-up, {args.threads} thread(s), each row in a fresh process"
    )
    print(
        f"  {'text cache':<11} {'checkpointing':<14} {'steps/s':>9} {'peak MB':>10} {'speed x':>8} {'memory x':>9}"
    )
    rows = []
    for cache_text in (False, True):
        for checkpointing in (False, True):
            setup = Setup(
                args.preset,
                args.device,
                args.resolution,
                args.mixed_precision,
                checkpointing,
                False,
                args.threads,
                train_mode="lora",
                cache_text=cache_text,
            )
            t = _row_in_fresh_process(setup, args.steps, args.warmup)
            t.steps_per_s = t.median_steps_per_s  # the median step: other load on the machine skews the mean
            rows.append((cache_text, checkpointing, t))
            base = rows[0][2]
            print(
                f"  {'on' if cache_text else 'off':<11} {'on' if checkpointing else 'off':<14} "
                f"{t.steps_per_s:9.3f} {t.peak_memory_mb:10.0f} {t.steps_per_s / base.steps_per_s:8.3f} "
                f"{t.peak_memory_mb / base.peak_memory_mb:9.3f}",
                flush=True,
            )
    base, cached, both = rows[0][2], rows[2][2], rows[3][2]
    print(
        f"ratio text caching: speed {cached.steps_per_s / base.steps_per_s:.3f}, peak memory "
        f"{cached.peak_memory_mb / base.peak_memory_mb:.3f}; caching + checkpointing: speed "
        f"{both.steps_per_s / base.steps_per_s:.3f}, peak memory {both.peak_memory_mb / base.peak_memory_mb:.3f} "
        "(x: each row over the first)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset",
        default="tiny-sd",
        help="tiny-sd | tiny-sdxl | tiny-sd3 | tiny-flux | sdxl-arch | flux-arch (LoRA mode), sd15-arch (matrix)",
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument(
        "--mode",
        choices=["lora", "overhead", "matrix"],
        help="default: matrix for sd15-arch, else lora; overhead: plain loop vs Ray Train (tiny-sd)",
    )
    parser.add_argument("--resolution", type=int, help="default: 32 tiny, 512 sd15-arch, 1024 sdxl/flux-arch")
    parser.add_argument(
        "--mixed-precision",
        help="no | fp16 | bf16 (default on cuda: bf16 for SD3/Flux, fp16 otherwise; on cpu: fp32)",
    )
    parser.add_argument("--steps", type=int, help="timed steps (default: 50 tiny, 20 otherwise)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for both sides")
    parser.add_argument("--report-every", type=int, default=10, help="Ray Train: a report every N steps")
    args = parser.parse_args(argv)
    tiny = args.preset.startswith("tiny-")
    args.mode = args.mode or ("matrix" if args.preset == "sd15-arch" else "lora")
    args.resolution = args.resolution or (32 if tiny else 512 if args.preset == "sd15-arch" else 1024)
    flow = args.preset in ("tiny-sd3", "tiny-flux", "flux-arch")
    if args.mixed_precision is None and args.device.startswith("cuda") and not flow:
        args.mixed_precision = (
            "fp16"  # the SD families' scripts train fp16 on GPUs; flow families: auto (bf16)
        )
    if args.mode != "lora":
        args.mixed_precision = args.mixed_precision or "no"
    args.steps = args.steps or (30 if tiny else 20)
    {"lora": lora_mode, "overhead": overhead_mode, "matrix": matrix_mode}[args.mode](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
