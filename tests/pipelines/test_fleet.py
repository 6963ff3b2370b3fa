"""`raybooth fleet` on the shared embedded cluster, and resume equality on one worker.

    .venv/bin/python -m pytest tests/pipelines/test_fleet.py

The fleet trains five subjects as Ray tasks, two at a time: `straight` (4 steps), `stopped` (the same
training stopped after 2 steps), `broken` (a corrupt photo), and `sd3` and `flux` (the fleet mixing
families: LoRA with prior preservation on 2 Ray Train workers each, on tiny-sd3 and tiny-flux). Four
registered models and one clear failure come out. The two trainings then serve the resume test: `stopped` continues with
resume=<checkpoint URI> to step 3, then resume=<run id> to step 4, and must land bit-identically on
`straight` (one CPU worker, LoRA on UNet and text encoder). The fleet runs them side by side, which
keeps this module fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from raybooth.cluster import storage, tracking
from raybooth.cluster.config import DreamBoothConfig, FleetConfig, TrackingSection
from raybooth.pipelines.fleet import SubjectOutcome, run_subjects, subject_configs, summary_table
from raybooth.pipelines.train import launch_training
from raybooth.samples import write_sample_images

pytestmark = pytest.mark.slow
EXPERIMENT = "fleet-test"
# One CPU worker, LoRA with a trained text encoder, tiny-sd at 32 px, 3 photos, 4 class images.
DEFAULTS = dict(
    resolution=32,
    steps=4,
    checkpoint_every=2,
    num_workers=1,
    train_mode="lora",
    lora_rank=2,
    learning_rate=1e-3,
    text_encoder_lr=1e-3,
    sample_steps=2,
    sample_guidance_scale=2.0,
    validation_prompts=[],
)


def concept(folder: Path, class_images: int = 4) -> list[dict]:
    # The class images of test_dreambooth.py (same class, count and sampler): cached when it ran first.
    return [{"instance_data": str(folder), "class_name": "dog", "num_class_images": class_images}]


def flow_subject(name: str, base_model: str, folder: Path) -> dict:
    """A subject of another family (LoRA, its default there) on 2 workers, 2 steps, 2 class images."""
    return {
        "name": name,
        "overrides": {
            "base_model": base_model, "num_workers": 2, "steps": 2, "text_encoder_lr": None,
            "concepts": concept(folder, class_images=2),
        },
    }  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    good, broken = tmp_path_factory.mktemp("cat"), tmp_path_factory.mktemp("broken_cat")
    write_sample_images(good, 3, size=48, seed=1)
    write_sample_images(broken, 3, size=48, seed=2)
    (broken / "img_00002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return {"good": good, "broken": broken}


@pytest.fixture(scope="module")
def fleet(folders) -> FleetConfig:
    return FleetConfig.model_validate(
        {
            "defaults": {**DEFAULTS, "concepts": concept(folders["good"])},
            "max_concurrent": 2,
            "model_prefix": "fleet",
            "tracking": {"experiment": EXPERIMENT},
            "subjects": [
                {"name": "straight"},
                {"name": "stopped", "overrides": {"steps": 2}},
                {"name": "broken", "overrides": {"concepts": concept(folders["broken"])}},
                flow_subject("sd3", "tiny-sd3", folders["good"]),
                flow_subject("flux", "tiny-flux", folders["good"]),
            ],
        }
    )


@pytest.fixture(scope="module")
def outcomes(ray_cluster, fleet) -> dict[str, SubjectOutcome]:
    return {o.name: o for o in run_subjects(fleet)}


def weights(checkpoint_uri: str, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(storage.local_path(storage.join(checkpoint_uri, name))))


def test_subject_configs_layer_base_defaults_and_overrides(tmp_path, folders):
    base = tmp_path / "base.yaml"
    base.write_text("steps: 100\nlearning_rate: 1.0e-5\nseed: 3\ntracking:\n  experiment: from-base\n")
    fleet = FleetConfig.model_validate(
        {
            "base": str(base),
            "defaults": {"steps": 7, "concepts": concept(folders["good"])},
            "model_prefix": "p",
            "subjects": [
                {"name": "a"},
                {"name": "b", "overrides": {"seed": 9}},
                {"name": "c", "overrides": {"stepz": 1}},
            ],
        }
    )
    (a_name, a), (b_name, b), (c_name, c) = subject_configs(fleet, None)
    assert isinstance(a, DreamBoothConfig) and isinstance(b, DreamBoothConfig)
    assert (a.steps, a.learning_rate, a.seed, a.model_name) == (7, 1e-5, 3, "p-a")
    assert (b.seed, b.model_name, b.run_name) == (9, "p-b", "b")
    assert a.tracking.experiment == "from-base"  # the manifest did not set tracking: the base's stays
    assert c_name == "c" and isinstance(c, str) and "stepz: unknown key" in c


def test_fleet_registers_the_good_subjects_and_reports_the_broken_one(outcomes):
    assert outcomes["straight"].ok and outcomes["stopped"].ok
    assert outcomes["straight"].model_uri == "models:/fleet-straight/1"
    assert outcomes["stopped"].model_uri == "models:/fleet-stopped/1"
    for family in ("sd3", "flux"):  # the other families, side by side with tiny-sd's subjects
        assert outcomes[family].ok, outcomes[family].error
        assert outcomes[family].model_uri == f"models:/fleet-{family}/1"
        run = tracking.get_run(outcomes[family].run_id)
        assert run.data.params["world_size"] == "2"
    broken = outcomes["broken"]
    assert not broken.ok and "img_00002.png: corrupt image" in broken.error

    tracking.configure(TrackingSection())
    exp = MlflowClient().get_experiment_by_name(EXPERIMENT)
    runs = MlflowClient().search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["flux", "sd3", "stopped", "straight"]  # broken: nothing

    table = summary_table(list(outcomes.values()))
    assert "4/5 subjects registered" in table
    broken_line = next(line for line in table.splitlines() if line.startswith("broken"))
    assert "FAILED" in broken_line and "img_00002.png" in broken_line


def test_resume_by_checkpoint_uri_then_run_id_is_bit_identical_on_one_worker(outcomes, fleet, folders):
    straight, stopped = outcomes["straight"], outcomes["stopped"]
    configs = dict(subject_configs(fleet, None))
    cfg = configs["stopped"]
    run_id = stopped.run_id
    first_checkpoint = MlflowClient().get_run(run_id).data.tags["raybooth.last_checkpoint"]
    assert first_checkpoint.endswith("checkpoint_000002")

    # A new Ray run from exactly that checkpoint, continuing the same MLflow run...
    second = launch_training(cfg.model_copy(update={"steps": 3, "resume": first_checkpoint}))
    assert second.run_id == run_id
    # ...then the run id: Ray hands back that run's latest checkpoint (step 3).
    third = launch_training(cfg.model_copy(update={"steps": 4, "resume": run_id}))
    assert third.run_id == run_id and third.version == 3  # each launch registered what it reached

    straight_last = MlflowClient().get_run(straight.run_id).data.tags["raybooth.last_checkpoint"]
    for file in ("unet.safetensors", "text_encoder.safetensors"):
        expected, got = weights(straight_last, file), weights(third.checkpoint, file)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), file
    steps = sorted(m.step for m in MlflowClient().get_metric_history(run_id, "loss"))
    assert steps == [1, 2, 3, 4]

    # A LoRA version holds the adapters and names its base model.
    folder = tracking.download_model(third.model_uri)
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    assert '"base_model": "tiny-sd"' in (folder / "raybooth_lora.json").read_text()
