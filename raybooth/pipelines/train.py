"""`raybooth train`: DreamBooth fine-tuning of Stable Diffusion on Ray Train, tracked in MLflow.

    raybooth train --config configs/dreambooth.yaml steps=400 num_workers=4 gpus_per_worker=1
    raybooth train --config configs/dreambooth.yaml resume=<mlflow run id> steps=800
    raybooth train --config configs/dreambooth.yaml resume=s3://bucket/raybooth/dreambooth/<run>/checkpoint_000200

The launcher, in order:
  1. checks everything a user can get wrong, before anything is written (no images, a corrupt image,
     a prompt without its identifier, a resolution not divisible by 8, more GPUs or CPUs than the cluster
     has, a resume id or URI that does not exist) -> `UserError`, exit 2, nothing in MLflow;
  2. makes the class images (Ray Data, cached in storage);
  3. opens (or reopens) the MLflow run, then runs `TorchTrainer(train_func)` from `train_worker.py` with
     checkpoints under `<storage>/dreambooth/<run name>/checkpoint_<step>` (the last K kept) and
     `FailureConfig(max_failures)`: a dead worker restarts the group from the last checkpoint;
  4. registers the final model (logged by rank 0 under the run's `model/` artifacts) in the registry.

Resuming: `resume=<run id>` relaunches that run's Ray Train run (same name and storage), whose latest
checkpoint Ray hands back to `ray.train.get_checkpoint()`; `resume=<checkpoint URI>` starts a new Ray
run from exactly that checkpoint. Both continue the same MLflow run when it exists.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient

from raybooth.cluster import storage, tracking
from raybooth.cluster.config import DreamBoothConfig
from raybooth.cluster.workdir import default_models_dir
from raybooth.errors import UserError
from raybooth.models import checkpoint as ckpt
from raybooth.models.dreambooth_data import IMAGE_SUFFIXES, INSTANCE_IMAGE_LIMITS
from raybooth.models.images import ImageError, decode_image
from raybooth.pipelines.train_worker import (
    TAG_LAST_CHECKPOINT,
    TAG_LAST_STEP,
    TAG_RAY_RUN,
    TAG_STORAGE,
    ConceptFiles,
    WorkerJob,
    checkpoint_dir_name,
    train_func,
)

RUN_ID = re.compile(r"^[0-9a-f]{32}$")  # MLflow run ids; anything else given to resume= is a URI
# Files a subject folder may hold besides its photos (captions, notes); every other file must be an image.
NOT_IMAGES = (".txt", ".json", ".jsonl", ".md", ".csv", ".yaml", ".yml", ".parquet")


@dataclass
class ResumePoint:
    """Where a resumed run continues from."""

    run_id: str | None  # the MLflow run to continue (None: the checkpoint's run is not in this store)
    experiment: str | None
    ray_run_name: str | None  # resume=<run id>: relaunch this Ray run; None: a new one
    storage_path: str | None
    checkpoint: str | None  # resume=<URI>: load exactly this checkpoint
    step: int


@dataclass
class TrainResult:
    run_id: str
    model_name: str
    version: int
    checkpoint: str | None  # URI of the last checkpoint
    steps: int
    loss: float | None
    seconds: float

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}/{self.version}"


# --------------------------------------------------------------------------------------------------
# 1. Checks before anything starts
# --------------------------------------------------------------------------------------------------


def find_instance_images(uri: str, concept: int) -> list[str]:
    """The concept's photos; every file must open with PIL (a corrupt one is named) and there must be one."""
    files = [f for f in storage.list_files(uri) if not f.lower().endswith(NOT_IMAGES)]
    if not files:
        raise UserError(
            f"concepts.{concept}.instance_data: no images under {uri} (looked for {', '.join(IMAGE_SUFFIXES)}); "
            "put 3-5 photos of the subject there or fix the path"
        )
    for f in files:
        try:
            decode_image(storage.read_bytes(f), INSTANCE_IMAGE_LIMITS, name=f)
        except ImageError as e:
            raise UserError(f"concepts.{concept}.instance_data: {e}; replace or remove that file") from e
    return files


def check_resources(cfg: DreamBoothConfig) -> None:
    """More GPUs or CPUs than the cluster has would leave Ray Train waiting forever: refuse now."""
    from raybooth.cluster.runtime import cluster_info

    info = cluster_info()
    gpus = cfg.num_workers * cfg.gpus_per_worker
    if gpus > info.gpus:
        raise UserError(
            f"num_workers={cfg.num_workers} x gpus_per_worker={cfg.gpus_per_worker:g} asks for {gpus:g} GPUs but the "
            f"cluster has {info.gpus:g}; lower num_workers or gpus_per_worker (0 trains on CPUs)"
        )
    cpus = cfg.num_workers * cfg.cpus_per_worker
    if cpus > info.cpus:
        raise UserError(
            f"num_workers={cfg.num_workers} x cpus_per_worker={cfg.cpus_per_worker:g} asks for {cpus:g} CPUs but the "
            f"cluster has {info.cpus:g}; lower num_workers or cpus_per_worker"
        )


def resolve_resume(cfg: DreamBoothConfig) -> ResumePoint | None:
    """Check that `resume=` names a run with a checkpoint, or a checkpoint folder; say where to continue."""
    if not cfg.resume:
        return None
    if RUN_ID.match(cfg.resume):
        run = tracking.get_run(cfg.resume)  # TrackingError (a UserError) names a run that does not exist
        tags = run.data.tags
        if TAG_LAST_CHECKPOINT not in tags or TAG_RAY_RUN not in tags:
            raise UserError(
                f"resume={cfg.resume}: that MLflow run has no DreamBooth checkpoint to continue from"
            )
        step = int(tags.get(TAG_LAST_STEP, "0"))
        experiment = MlflowClient().get_experiment(run.info.experiment_id).name
        point = ResumePoint(cfg.resume, experiment, tags[TAG_RAY_RUN], tags[TAG_STORAGE], None, step)
    else:
        try:
            meta = json.loads(storage.read_text(storage.join(cfg.resume, ckpt.META)))
        except UserError as e:
            raise UserError(
                f"resume={cfg.resume}: not a checkpoint folder ({e}); pass an MLflow run id or a "
                "<storage>/dreambooth/<run>/checkpoint_<step> URI"
            ) from e
        run_id, experiment = meta.get("mlflow_run_id"), None
        try:
            run = tracking.get_run(run_id) if run_id else None
            experiment = MlflowClient().get_experiment(run.info.experiment_id).name if run else None
        except UserError:
            run_id = None  # the checkpoint came from another tracking store: continue in a new run
        point = ResumePoint(run_id, experiment, None, None, cfg.resume, int(meta["step"]))
    if point.step >= cfg.steps:
        raise UserError(
            f"resume={cfg.resume}: the checkpoint is at step {point.step} and steps={cfg.steps}; raise steps to train on"
        )
    return point


@dataclass
class Preflight:
    concepts: list[ConceptFiles]
    resume: ResumePoint | None
    tracking_uri: str


def preflight(cfg: DreamBoothConfig) -> Preflight:
    """Every check a user can fail, in the order they are cheapest; nothing is written (Ray must be up)."""

    if not cfg.concepts:
        raise UserError(
            "no concepts: add one under `concepts:` with instance_data pointing at the subject's photos"
        )
    check_resources(cfg)
    concepts = [
        ConceptFiles(
            instance_images=find_instance_images(c.instance_data, i),
            instance_prompt=c.resolved_instance_prompt,
            class_images=[],
            class_prompt=c.resolved_class_prompt,
        )
        for i, c in enumerate(cfg.concepts)
    ]
    # ModelError for an unknown preset, a bad folder, or a pipeline family raybooth does not train.
    check_family(cfg)
    tracking_uri = tracking.configure(cfg.tracking)
    return Preflight(concepts, resolve_resume(cfg), tracking_uri)


def check_family(cfg: DreamBoothConfig) -> DreamBoothConfig:
    """The base model's family, its folder checked, and the run's train_mode resolved against it: the
    config with `train_mode` set (the family's default when null). UserError when the family cannot
    train that way."""
    from raybooth.models.loaders import sd_family
    from raybooth.models.train_memory import optimizer_problem

    # 8-bit Adam needs bitsandbytes and CUDA: a CPU run or a missing package is one line now, not a
    # traceback from every Ray worker after the cluster started.
    problem = optimizer_problem(cfg.optimizer, cuda=cfg.gpus_per_worker > 0)
    if problem:
        raise UserError(problem)
    family = sd_family(cfg.base_model, models_dir=default_models_dir())
    mode = cfg.train_mode or family.default_train_mode
    if mode == "full" and not family.supports_full_finetune:
        raise UserError(
            f"train_mode=full: {cfg.base_model} is a {family.pipeline_class_name} ({family.name}), which "
            "raybooth trains with LoRA only; set train_mode=lora (or leave it unset)"
        )
    if cfg.resolution % family.resolution_multiple:
        step = family.resolution_multiple
        lower = cfg.resolution - cfg.resolution % step
        raise UserError(
            f"resolution {cfg.resolution}: a {family.pipeline_class_name} trains on sides divisible by {step}; "
            f"use {lower or step} or {lower + step}"
        )
    return cfg.model_copy(update={"train_mode": mode})


# --------------------------------------------------------------------------------------------------
# 2-4. Class images, the trainer, the registry
# --------------------------------------------------------------------------------------------------


def make_class_images(cfg: DreamBoothConfig, concepts: list[ConceptFiles], root: str) -> None:
    """Fill each concept's class_images from the cache (generating what is missing)."""
    from raybooth.pipelines.class_images import ClassImageRequest, ensure_class_images

    if not cfg.with_prior_preservation:
        return
    for concept, files in zip(cfg.concepts, concepts, strict=True):
        request = ClassImageRequest(
            base_model=cfg.base_model,
            prompt=files.class_prompt,
            resolution=cfg.resolution,
            count=concept.num_class_images,
            seed=cfg.seed,
            steps=cfg.sample_steps,
            guidance_scale=cfg.sample_guidance_scale,
        )
        result = ensure_class_images(
            request, root, gpus_per_actor=min(cfg.gpus_per_worker, 1.0), max_actors=cfg.num_workers
        )
        files.class_images = result.uris
        print(
            f"class images for {files.class_prompt!r}: {result.reused} cached, {result.generated} generated "
            f"({result.folder})",
            flush=True,
        )


def build_trainer(cfg: DreamBoothConfig, job: WorkerJob):
    """The TorchTrainer: N workers with their resources, checkpoints kept in storage, failures retried."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.gpus_per_worker > 0:
        resources["GPU"] = cfg.gpus_per_worker
    fs, path = storage.pyarrow_filesystem(job.storage_path)
    return TorchTrainer(
        train_func,
        train_loop_config=job.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=job.ray_run_name,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )


def launch_training(cfg: DreamBoothConfig, fault: dict | None = None) -> TrainResult:
    """Check, make class images, train on Ray Train, register; Ray must already be initialised.

    `fault` is a test hook passed to the workers ({"rank", "step", "marker", "delay_s"}): that rank's
    process exits once at that step, as a crashed worker would.
    """
    started = time.time()
    checked = preflight(cfg)
    cfg = check_family(cfg)  # train_mode resolved for the family (the workers and MLflow see it set)
    root = storage.storage_root(cfg.storage)
    make_class_images(cfg, checked.concepts, root)

    resume = checked.resume
    experiment = (resume.experiment if resume and resume.run_id else None) or cfg.tracking.experiment
    run_id = resume.run_id if resume else None
    run_name = None if run_id else cfg.run_name or cfg.model_name  # a continued run keeps its name
    with tracking.start_run(experiment, run_name=run_name, run_id=run_id) as run:
        run_id = run.info.run_id
        if resume and resume.ray_run_name:
            ray_run_name, storage_path = resume.ray_run_name, resume.storage_path
        else:
            suffix = f"-resume-{uuid.uuid4().hex[:6]}" if resume else ""
            ray_run_name, storage_path = (
                f"{cfg.model_name}-{run_id[:8]}{suffix}",
                storage.join(root, "dreambooth"),
            )
        tracking_tags = {
            TAG_RAY_RUN: ray_run_name,
            TAG_STORAGE: storage_path,
            "raybooth.job": "dreambooth",
            "raybooth.model_name": cfg.model_name,
        }
        mlflow.set_tags(tracking_tags)
        job = WorkerJob(
            config=cfg.model_dump(mode="json"),
            concepts=checked.concepts,
            tracking_uri=checked.tracking_uri,
            registry_uri=cfg.tracking.registry_uri,
            experiment=experiment,
            run_id=run_id,
            storage_path=storage_path,
            ray_run_name=ray_run_name,
            resume_checkpoint=resume.checkpoint if resume else None,
            fault=fault,
        )
        try:
            result = build_trainer(cfg, job).fit()
        except Exception as e:
            e.add_note(f"raybooth train: continue this run with resume={run_id} (from its last checkpoint)")
            raise
        version = tracking.register_model(
            run_id, "model", cfg.model_name, tags={"base_model": cfg.base_model, "train_mode": cfg.train_mode}
        )
    metrics = result.metrics or {}
    last = storage.join(storage_path, ray_run_name, checkpoint_dir_name(cfg.steps))
    return TrainResult(
        run_id, cfg.model_name, version, last, cfg.steps, metrics.get("loss"), time.time() - started
    )


def run_train(cfg: DreamBoothConfig, verbose: bool = False) -> int:
    """CLI entry (the config loaded from YAML, overrides and flags): start or join Ray, train, print where
    everything went."""
    from raybooth.cluster.runtime import ray_session

    # The base model's family first: an unsupported pipeline is one line before a cluster starts.
    check_family(cfg)
    with ray_session(cfg.cluster, verbose=verbose):
        result = launch_training(cfg)
    loss = f"{result.loss:.4f}" if result.loss is not None else "n/a"
    print(f"raybooth train: {result.steps} steps in {result.seconds:.0f}s, final loss {loss}")
    print(f"  mlflow run:        {result.run_id}")
    print(f"  registered model:  {result.model_uri}")
    print(f"  last checkpoint:   {result.checkpoint}")
    print(
        f"  try it:            raybooth generate --model {result.model_uri} --prompt "
        f"{json.dumps(cfg.concepts[0].resolved_instance_prompt)}"
    )
    return 0
