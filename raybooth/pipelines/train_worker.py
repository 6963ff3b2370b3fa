"""The per-worker DreamBooth loop that Ray Train runs on every rank (`TorchTrainer(train_func, ...)`).

    raybooth train --config configs/dreambooth.yaml num_workers=2     # launches this on 2 workers

Each rank loads the model, its data and (when resuming) the last checkpoint, wraps the trained modules
in DDP, and runs `models.dreambooth.train_step` for every step. Rank 0 alone talks to MLflow (Ray Train V2
has no MLflow callback): params once, per-step metrics at each checkpoint (so MLflow only ever shows
steps that a checkpoint persisted: after a restart no step appears twice), checkpoints, validation images
and the final model. The MLflow run id comes from the launcher and is the same across worker restarts.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from mlflow import MlflowClient

from raybooth.cluster import storage, tracking
from raybooth.cluster.config import DreamBoothConfig, TrackingSection
from raybooth.cluster.workdir import default_models_dir
from raybooth.models import checkpoint as ckpt
from raybooth.models.device import PrecisionPlan, autocast, make_grad_scaler
from raybooth.models.dreambooth import (
    EncodingCache,
    StepSettings,
    TrainModels,
    make_lr_scheduler,
    make_optimizer,
    prepare_for_training,
    train_step,
    unwrap,
)
from raybooth.models.dreambooth_data import DreamBoothData, Example, load_example
from raybooth.models.flow_matching import FlowObjective
from raybooth.models.train_memory import (
    free_frozen_text_encoders,
    reload_freed_text_encoders,
    training_precision,
    wants_text_cache,
)

# MLflow tags on a DreamBooth run: where its checkpoints are, so resume=<run id> can find them.
TAG_RAY_RUN = "raybooth.ray_run_name"  # the Ray Train run (folder under TAG_STORAGE) holding the checkpoints
TAG_STORAGE = "raybooth.storage_path"
TAG_LAST_CHECKPOINT = "raybooth.last_checkpoint"  # URI of the newest checkpoint
TAG_LAST_STEP = "raybooth.last_step"
TAG_RESTORED_FROM = "raybooth.restored_from_step"  # set when a (re)started worker group loaded a checkpoint


@dataclass
class ConceptFiles:
    """One concept's files as the workers read them (URIs every node can reach)."""

    instance_images: list[str]
    instance_prompt: str
    class_images: list[str]
    class_prompt: str


@dataclass
class WorkerJob:
    """Everything a rank needs, resolved by the launcher; travels as a plain dict in train_loop_config."""

    config: dict[str, Any]  # DreamBoothConfig, JSON-dumped
    concepts: list[ConceptFiles]
    tracking_uri: str
    registry_uri: str | None
    experiment: str
    run_id: str
    storage_path: str  # URI of the folder Ray Train writes run folders into
    ray_run_name: str
    resume_checkpoint: str | None = None  # explicit checkpoint URI (resume=<URI>), used when Ray has none
    fault: dict[str, Any] | None = None  # test hook: {"rank", "step", "marker"} exits that rank once
    extra_tags: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> WorkerJob:
        raw = dict(raw)
        raw["concepts"] = [ConceptFiles(**c) for c in raw["concepts"]]
        return cls(**raw)


def checkpoint_dir_name(step: int) -> str:
    """Ray Train stores a checkpoint reported at `step` as `<storage>/<run name>/<this>`."""
    return f"checkpoint_{step:06d}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def load_training_data(job: WorkerJob, cfg: DreamBoothConfig) -> DreamBoothData:
    """Read every instance and class image from storage and build the step-indexed data."""
    instance: list[Example] = []
    classes: list[list[Example]] = []
    for k, concept in enumerate(job.concepts):
        for uri in concept.instance_images:
            instance.append(
                load_example(storage.read_bytes(uri), uri, concept.instance_prompt, k, cfg.resolution)
            )
        classes.append(
            [
                load_example(storage.read_bytes(u), u, concept.class_prompt, k, cfg.resolution)
                for u in concept.class_images
            ]
        )
    return DreamBoothData(
        instance,
        classes if cfg.with_prior_preservation else None,
        resolution=cfg.resolution,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        seed=cfg.seed,
    )


# --------------------------------------------------------------------------------------------------
# MLflow from rank 0
# --------------------------------------------------------------------------------------------------


class RunLogger:
    """Rank 0's MLflow logging; on other ranks every method is a no-op."""

    def __init__(self, job: WorkerJob, rank: int):
        self.job = job
        self.active = rank == 0
        self.pending: list[tuple[int, dict[str, float]]] = []
        self.logged_up_to = 0  # last step whose metrics MLflow already has
        self.has_params = False
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> RunLogger:
        if self.active:
            tracking.configure(
                TrackingSection(tracking_uri=self.job.tracking_uri, registry_uri=self.job.registry_uri)
            )
            self._stack.enter_context(tracking.start_run(self.job.experiment, run_id=self.job.run_id))
            # Steps already in MLflow stay as they are: Ray Train registers a reported checkpoint only when
            # its controller next polls the workers (~2 s), so a worker dying right after a report can
            # restart from the checkpoint before and redo steps whose metrics were already sent.
            client = MlflowClient()
            history = client.get_metric_history(self.job.run_id, "loss")
            self.logged_up_to = max((m.step for m in history), default=0)
            self.has_params = bool(client.get_run(self.job.run_id).data.params)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def log_params(self, params: dict[str, Any]) -> None:
        """Once per MLflow run: a restart or a resume keeps the params the run started with."""
        if self.active and not self.has_params:
            tracking.log_params(params)
            self.has_params = True

    def add_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.active:
            self.pending.append((step, metrics))

    def flush(self) -> None:
        """Send the buffered per-step metrics (called once a checkpoint holds those steps)."""
        if self.active:
            for step, metrics in self.pending:
                if step > self.logged_up_to:
                    tracking.log_metrics(metrics, step=step)
                    self.logged_up_to = step
        self.pending.clear()

    def log_checkpoint(self, folder: str, name: str, upload: bool) -> None:
        if self.active and upload:
            tracking.log_artifacts(folder, f"checkpoints/{name}")

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            import mlflow

            mlflow.set_tags(tags)

    def log_images(self, images: list[Any], step: int) -> None:
        if self.active:
            for i, image in enumerate(images):
                tracking.log_image(image, f"validation/step_{step:06d}_{i}.png")

    def log_model(self, folder: Path) -> None:
        if self.active:
            tracking.log_artifacts(folder, "model")


# --------------------------------------------------------------------------------------------------
# Validation images and the final model
# --------------------------------------------------------------------------------------------------


def load_inference_scheduler(path: str) -> Any:
    """The sampler the base pipeline ships with (model_index.json), for validation and the export."""
    from raybooth.models.diffusion_family import detect_family

    return detect_family(path, check=False).inference_scheduler(path)


def unwrapped_parts(models: TrainModels, scheduler: Any) -> SimpleNamespace:
    """The family's parts outside their DDP wrappers: what sampling and the export read."""
    family = models.family
    names = [family.denoiser_name, "vae", *family.text_encoder_names, *family.tokenizer_names]
    parts = {n: getattr(models, n if n != family.denoiser_name else "denoiser") for n in names}
    return SimpleNamespace(
        **{n: unwrap(p) if isinstance(p, torch.nn.Module) else p for n, p in parts.items()},
        family=models.family,
        scheduler=scheduler,
    )


@torch.no_grad()
def validation_images(
    models: TrainModels, scheduler: Any, cfg: DreamBoothConfig, plan: PrecisionPlan
) -> list[Any]:
    """One image per validation prompt from the model as it is now (fixed seeds, so steps compare)."""
    from raybooth.models.sampling import sample_images

    if not cfg.validation_prompts:
        return []
    parts = unwrapped_parts(models, scheduler)
    denoiser = getattr(parts, models.family.denoiser_name)
    trained = [denoiser, *(getattr(parts, n) for n in models.family.trainable_text_encoder_names)]
    for module in trained:
        module.eval()
    try:
        with autocast(plan):
            return sample_images(
                parts,
                cfg.validation_prompts,
                height=cfg.resolution,
                width=cfg.resolution,
                num_inference_steps=cfg.sample_steps,
                guidance_scale=cfg.sample_guidance_scale,
                seeds=[cfg.seed + i for i in range(len(cfg.validation_prompts))],
            )
    finally:
        denoiser.train()
        if models.train_text_encoder:
            for module in trained[1:]:
                module.train()


def export_final_model(
    folder: Path,
    models: TrainModels,
    scheduler: Any,
    cfg: DreamBoothConfig,
    job: WorkerJob,
    base_path: str | None = None,
) -> Path:
    """The trained model as `raybooth generate` and the server load it: diffusers folder or LoRA weights.

    A full fine-tune is fp32 plus (`export_fp16`) an fp16 variant, as diffusers publishes checkpoints, so
    plain `from_pretrained(folder)` works on a CPU; LoRA adapters are saved in fp16 (`export_fp16`), which
    `load_lora_weights` casts to the base pipeline's dtype."""
    dtype = torch.float16 if cfg.export_fp16 else torch.float32
    parts = unwrapped_parts(models, scheduler)
    if cfg.train_mode == "lora":
        with_text = models.train_text_encoder
        ckpt.save_lora_weights(
            folder,
            getattr(parts, models.family.denoiser_name),
            parts.text_encoder if with_text else None,
            cfg.base_model,
            dtype,
            text_encoder_2=getattr(parts, "text_encoder_2", None) if with_text else None,
            family=models.family,
        )
    else:
        # A full pipeline needs every text encoder's weights: reload those freed after encoding.
        reload_freed_text_encoders(parts, base_path or cfg.base_model)
        ckpt.save_full_pipeline(folder, parts, scheduler, fp16_variant=cfg.export_fp16)
    info = {
        "base_model": cfg.base_model,
        "train_mode": cfg.train_mode,
        "steps": cfg.steps,
        "resolution": cfg.resolution,
        "mlflow_run_id": job.run_id,
        "instance_prompts": [c.instance_prompt for c in job.concepts],
    }
    (folder / "raybooth_train.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def _mean_over_ranks(values: list[float], device: torch.device, world_size: int) -> list[float]:
    """Average logging values over the ranks (one small all-reduce), so MLflow shows the global loss."""
    if world_size == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world_size).tolist()


def _count_nodes(world_size: int) -> int:
    """How many machines the ranks run on (logged, so a multi-node run is visible as one in MLflow)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world_size == 1:
        return 1
    import torch.distributed as dist

    nodes: list[str | None] = [None] * world_size
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


def _maybe_fail(fault: dict[str, Any] | None, rank: int, step: int) -> None:
    """Test hook: kill this worker process once (a marker file says it already happened)."""
    if not fault or fault["rank"] != rank or fault["step"] != step:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    # Give Ray's controller time to register the last reported checkpoint first (it polls every ~2 s).
    time.sleep(fault.get("delay_s", 0.0))
    marker.write_text(f"rank {rank} exited at step {step}\n")
    os._exit(1)  # no clean-up, no exception: what a crashed or OOM-killed process looks like


def _restore(job: WorkerJob, models: TrainModels, optimizer, lr_scheduler, scaler) -> int:
    """Load the checkpoint Ray hands back after a restart, else the one resume= named; the step reached."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            return ckpt.load_checkpoint(folder, models.trainable(), optimizer, lr_scheduler, scaler).step
    if job.resume_checkpoint:
        with tempfile.TemporaryDirectory() as folder:
            storage.download_dir(job.resume_checkpoint, folder)
            return ckpt.load_checkpoint(folder, models.trainable(), optimizer, lr_scheduler, scaler).step
    return 0


def train_func(raw_job: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point."""
    import ray.train
    import ray.train.torch

    from raybooth.models.loaders import load_sd_components

    job = WorkerJob.from_dict(raw_job)
    cfg = DreamBoothConfig.model_validate(job.config)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    seed_everything(cfg.seed)
    components = load_sd_components(cfg.base_model, device=device, models_dir=default_models_dir())
    plan = training_precision(
        cfg.mixed_precision, components.family, device
    )  # auto: bf16 for SD3/Flux on GPUs
    models = prepare_for_training(
        components,
        train_mode=cfg.train_mode or components.family.default_train_mode,
        train_text_encoder=cfg.train_text_encoder,
        plan=plan,
        gradient_checkpointing=cfg.gradient_checkpointing,
        lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        seed=cfg.seed,
    )
    base_path = components.path
    del components  # `models` holds every part from here on: a freed text encoder has no other reference
    data = load_training_data(job, cfg)
    if wants_text_cache(cfg.cache_text_embeddings, models.family):
        # Every prompt this run encodes; sampling's negative prompt is "" (CFG families).
        prompts = [*data.all_prompts(), *cfg.validation_prompts, ""]
        freed = free_frozen_text_encoders(models, prompts, plan)
        if freed and rank == 0:
            print(f"raybooth train: text embeddings cached, {', '.join(freed)} freed", flush=True)
    cache = EncodingCache.build(models, data) if cfg.cache_latents else None
    optimizer = make_optimizer(
        models, cfg.learning_rate, cfg.text_encoder_lr, cfg.adam_weight_decay, optimizer=cfg.optimizer
    )
    lr_scheduler = make_lr_scheduler(optimizer, cfg.lr_warmup_steps)
    scaler = make_grad_scaler(plan)
    start_step = _restore(job, models, optimizer, lr_scheduler, scaler)
    if start_step and rank == 0:
        print(f"raybooth train: resumed at step {start_step}", flush=True)

    # DDP after loading: every rank starts from identical weights, and only the trained modules sync.
    models.denoiser = ray.train.torch.prepare_model(models.denoiser, move_to_device=False)
    if models.train_text_encoder:
        # SDXL reads text_encoder's penultimate layer, so its last layer gets no gradient: DDP must know.
        unused = {"find_unused_parameters": True} if models.family.text_encoder_has_unused_layers else None
        for name in models.family.trainable_text_encoder_names:  # SDXL/SD3: both CLIP encoders sync
            module = ray.train.torch.prepare_model(
                getattr(models, name), move_to_device=False, parallel_strategy_kwargs=unused
            )
            setattr(models, name, module)
    scheduler = load_inference_scheduler(base_path)
    nodes = _count_nodes(world_size)
    settings = StepSettings(
        batch_size=cfg.batch_size,
        accumulation=cfg.gradient_accumulation_steps,
        prior_loss_weight=cfg.prior_loss_weight,
        max_grad_norm=cfg.max_grad_norm,
        snr_gamma=cfg.snr_gamma,
        noise_offset=cfg.noise_offset,
        seed=cfg.seed,
        objective=FlowObjective(
            timestep_density=cfg.timestep_density,
            loss_weighting=cfg.loss_weighting,
            logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std,
            mode_scale=cfg.mode_scale,
        ),
        guidance_scale=cfg.train_guidance_scale,
    )

    with RunLogger(job, rank) as log:
        if start_step:
            log.set_tags({TAG_RESTORED_FROM: str(start_step)})
        log.log_params(
            {
                **cfg.model_dump(mode="json", exclude={"cluster", "storage", "tracking"}),
                "world_size": world_size,
                "nodes": nodes,
                "precision": plan.effective,
            }
        )
        if plan.note and rank == 0:
            print(f"raybooth train: {plan.note}", flush=True)
        for step in range(start_step, cfg.steps):
            stats = train_step(
                models, optimizer, lr_scheduler, scaler, plan, data, cache, settings, step, rank, world_size
            )
            done = step + 1  # steps completed; what MLflow and checkpoints count
            loss, instance, prior = _mean_over_ranks(
                [stats.loss, stats.instance_loss, stats.prior_loss], device, world_size
            )
            metrics = {
                "loss": loss,
                "instance_loss": instance,
                "prior_loss": prior,
                "lr": stats.lr,
                "grad_norm": stats.grad_norm,
                "grad_scale": stats.grad_scale,
            }
            log.add_metrics(done, metrics)
            if rank == 0:
                print(f"step {done}/{cfg.steps} loss {loss:.4f} lr {stats.lr:.2e}", flush=True)
            _maybe_fail(job.fault, rank, done)

            if cfg.validation_every and done % cfg.validation_every == 0 and done < cfg.steps and rank == 0:
                log.log_images(validation_images(models, scheduler, cfg, plan), done)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                _report_checkpoint(
                    done, metrics, models, optimizer, lr_scheduler, scaler, job, cfg, rank, log
                )

        if rank == 0:
            log.log_images(validation_images(models, scheduler, cfg, plan), cfg.steps)
            with tempfile.TemporaryDirectory() as tmp:
                log.log_model(export_final_model(Path(tmp) / "model", models, scheduler, cfg, job, base_path))


def _report_checkpoint(step, metrics, models, optimizer, lr_scheduler, scaler, job, cfg, rank, log) -> None:
    """Rank 0 writes the checkpoint; every rank reports (a barrier); then the steps it covers go to MLflow."""
    import ray.train

    name = checkpoint_dir_name(step)
    uri = storage.join(job.storage_path, job.ray_run_name, name)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            meta = {
                "mlflow_run_id": job.run_id,
                "train_mode": cfg.train_mode,
                "base_model": cfg.base_model,
                "ray_run_name": job.ray_run_name,
            }
            ckpt.save_checkpoint(tmp, models.trainable(), optimizer, lr_scheduler, scaler, step, meta)
            log.log_checkpoint(tmp, name, upload=cfg.log_checkpoints_to_mlflow)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"step": step, **metrics}, checkpoint=checkpoint, checkpoint_dir_name=name)
    log.flush()
    log.set_tags({TAG_LAST_CHECKPOINT: uri, TAG_LAST_STEP: str(step)})
