"""DreamBooth on Ray Train, end to end on the shared embedded cluster with tiny-sd at 32 px.

    .venv/bin/python -m pytest tests/pipelines/test_dreambooth.py

- two workers: class images generated then reused, checkpoints in storage and MLflow, a registered
  version that StableDiffusionPipeline loads and `raybooth generate` samples from;
- a worker process killed mid-run: Ray Train restarts from the last checkpoint, one MLflow run with
  every step exactly once, and the same weights as the uninterrupted run (within 1e-6);
- (resume=<checkpoint URI> / resume=<run id> on one worker is in test_fleet.py, whose fleet trains the
  straight and the stopped run side by side);
- bad input fails before any worker starts, with a message naming the problem and nothing in MLflow.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from mlflow import MlflowClient
from safetensors.torch import load_file

from raybooth.cli import main
from raybooth.cluster import storage, tracking
from raybooth.cluster.config import DreamBoothConfig, TrackingSection
from raybooth.errors import UserError
from raybooth.pipelines.train import launch_training
from raybooth.samples import write_sample_images

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def tiny_config(subject: Path, name: str, **overrides) -> DreamBoothConfig:
    """A few steps of tiny-sd at 32 px with 3 photos: the smallest run that exercises every part."""
    values = dict(
        concepts=[{"instance_data": str(subject), "class_name": "dog", "num_class_images": 4}],
        resolution=32,
        steps=4,
        checkpoint_every=2,
        checkpoints_to_keep=2,
        learning_rate=1e-4,
        sample_steps=2,
        sample_guidance_scale=2.0,
        validation_prompts=[],
        num_workers=2,
        model_name=name,
        tracking={"experiment": name},
    )
    values.update(overrides)
    return DreamBoothConfig.model_validate(values)


def final_weights(result, name: str = "unet.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(storage.local_path(storage.join(result.checkpoint, name))))


def runs_of(experiment: str) -> list:
    tracking.configure(TrackingSection())
    exp = MlflowClient().get_experiment_by_name(experiment)
    return [] if exp is None else MlflowClient().search_runs([exp.experiment_id])


def loss_steps(run_id: str) -> list[int]:
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, "loss"))


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("subject")
    write_sample_images(folder, 3, size=48)
    return folder


@pytest.fixture(scope="module")
def two_worker_run(ray_cluster, subject):
    """The reference run: 2 workers, 4 steps, validation images every 2 steps, class images generated."""
    cfg = tiny_config(
        subject, "db-two-workers", validation_prompts=["a photo of sks dog on the moon"], validation_every=2
    )
    return cfg, launch_training(cfg)


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


def test_two_workers_train_checkpoint_register_and_generate(two_worker_run, tmp_path):
    cfg, result = two_worker_run
    assert result.version >= 1 and result.steps == 4 and result.loss is not None

    # Checkpoints: the last two kept in storage, each with safetensors weights and the training state.
    run_folder = storage.join(
        storage.storage_root(cfg.storage), "dreambooth", Path(result.checkpoint).parent.name
    )
    kept = sorted({Path(f).parent.name for f in storage.list_files(run_folder, ["meta.json"])})
    assert kept == ["checkpoint_000002", "checkpoint_000004"]
    assert {"unet.safetensors", "training_state.pt", "meta.json"} <= set(os.listdir(result.checkpoint))

    # MLflow: one finished run, every step once, params, checkpoints, validation images, the model.
    (run,) = runs_of(cfg.tracking.experiment)
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
    assert loss_steps(run.info.run_id) == [1, 2, 3, 4]
    assert run.data.params["world_size"] == "2" and run.data.params["train_mode"] == "full"
    client = MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "validation", "model"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {
        "checkpoints/checkpoint_000002",
        "checkpoints/checkpoint_000004",
    }
    assert len(client.list_artifacts(run.info.run_id, "validation")) == 2  # step 2 and the end

    # The registered version is a diffusers folder as the Hub publishes them: fp32 plus an fp16 variant,
    # and README's CPU load call, as written, loads one dtype and draws an image.
    folder = tracking.download_model(result.model_uri)
    stored = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float32}
    half = load_file(str(folder / "text_encoder" / "model.fp16.safetensors"))
    assert {t.dtype for t in half.values()} == {torch.float16}
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    assert pipe("a photo of sks dog", height=32, width=32, num_inference_steps=2).images[0].size == (32, 32)
    trained = final_weights(result)
    exported = dict(pipe.unet.named_parameters())
    assert torch.equal(exported["conv_in.weight"], trained["conv_in.weight"])  # fp32: the trained weights

    # `raybooth generate` samples from it.
    out = tmp_path / "generated"
    code = main(
        [
            "generate",
            "--model",
            result.model_uri,
            "--prompt",
            "a photo of sks dog",
            "--out",
            str(out),
            "--n",
            "2",
            "--steps",
            "2",
        ]
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "a-photo-of-sks-dog-seed0.png",
        "a-photo-of-sks-dog-seed1.png",
    ]
    # `--seed 1 --n 1` is the second image of `--seed 0 --n 2`, byte for byte.
    alone = tmp_path / "alone"
    args = ["--model", result.model_uri, "--prompt", "a photo of sks dog", "--steps", "2", "--seed", "1"]
    assert main(["generate", *args, "--out", str(alone)]) == 0
    name = "a-photo-of-sks-dog-seed1.png"
    assert (alone / name).read_bytes() == (out / name).read_bytes()


def test_killed_worker_resumes_from_last_checkpoint_with_one_continuous_run(
    two_worker_run, subject, tmp_path, capsys
):
    reference_cfg, reference = two_worker_run
    marker = tmp_path / "killed"
    cfg = tiny_config(subject, "db-killed")
    # Rank 1 dies 5 s into step 3: after Ray's controller (polling every 2 s) registered checkpoint 2.
    result = launch_training(cfg, fault={"rank": 1, "step": 3, "marker": str(marker), "delay_s": 5.0})

    assert marker.exists()  # rank 1 really died at step 3, after the step-2 checkpoint
    assert "4 cached, 0 generated" in capsys.readouterr().out  # class images from the reference run's cache
    (run,) = runs_of(cfg.tracking.experiment)
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
    assert run.data.tags["raybooth.restored_from_step"] == "2"
    assert loss_steps(run.info.run_id) == [1, 2, 3, 4]  # no gap, no step logged twice
    # The restart redid step 3 from checkpoint 2 and landed on the uninterrupted run's weights.
    expected, got = final_weights(reference), final_weights(result)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Bad input: refused before any worker starts, nothing written to MLflow
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def broken_subject(tmp_path) -> Path:
    folder = tmp_path / "broken"
    write_sample_images(folder, 2)
    (folder / "img_00001.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return folder


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "no images under"),
        ("corrupt", "img_00001.png: corrupt image"),
        ("not_an_image", "notes.heic: corrupt image"),
        ("gpus", "asks for 4 GPUs but the cluster has 0"),
        ("cpus", "asks for 2000 CPUs"),
        ("unknown_run", "not found"),
        ("missing_checkpoint", "not a checkpoint folder"),
        ("no_concepts", "no concepts"),
    ],
)
def test_bad_input_is_refused_before_training(ray_cluster, subject, broken_subject, tmp_path, case, message):
    name = f"db-bad-{case.replace('_', '-')}"
    folder = {"empty": tmp_path / "empty", "corrupt": broken_subject}.get(case, subject)
    overrides = {
        "gpus": {"num_workers": 2, "gpus_per_worker": 2},
        "cpus": {"num_workers": 2, "cpus_per_worker": 1000},
        "unknown_run": {"resume": "0123456789abcdef0123456789abcdef"},
        "missing_checkpoint": {"resume": str(tmp_path / "nowhere" / "checkpoint_000002")},
        "no_concepts": {"concepts": []},
    }.get(case, {})
    if case == "empty":
        folder.mkdir()
    if case == "not_an_image":
        folder = tmp_path / "heic"
        write_sample_images(folder, 1)
        (folder / "notes.heic").write_bytes(b"ftypheic....")
    with pytest.raises(UserError, match=message):
        launch_training(tiny_config(folder, name, **overrides))
    assert runs_of(name) == []  # no experiment, no run


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("resolution=36", "not divisible by 8"),
        (
            "concepts=[{instance_data: x, instance_prompt: a photo of a dog}]",
            "does not contain the identifier 'sks'",
        ),
    ],
)
def test_cli_bad_config_exits_2_naming_the_key(ray_cluster, override, message, capsys):
    assert main(["train", "--config", str(REPO / "configs" / "dreambooth.yaml"), override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
