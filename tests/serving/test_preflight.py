"""Preflight and readiness without a cluster: the app's resource asks against a resources dict, and what
`/healthz` decides from the controller's replica counts.

    .venv/bin/python -m pytest tests/serving/test_preflight.py

The end-to-end checks (a real 2-CPU embedded Ray, the CLI's exit 2, `/healthz` 503 on a live app) are in
test_serve_startup.py and tests/test_serve_command.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from raybooth.cluster.config import ServeConfig, load_config
from raybooth.errors import UserError
from raybooth.serving.preflight import app_asks, check_fits
from raybooth.serving.readiness import Readiness

REPO = Path(__file__).resolve().parents[2]
TWO_CORES = {"CPU": 2.0, "memory": 8e9, "object_store_memory": 2e9}


def committed() -> ServeConfig:
    return load_config(ServeConfig, str(REPO / "configs" / "serve.yaml"), [])


def test_committed_serve_yaml_fits_a_two_core_embedded_ray_with_room():
    cfg = committed()
    asks = {a.section: a for a in app_asks(cfg)}
    start = sum(a.total("CPU") for a in asks.values())
    at_max = sum(a.total("CPU", at_max=True) for a in asks.values())
    assert start <= 1.5 and at_max <= 2.0  # room beside the app, even with every replica scaled up
    assert check_fits(cfg, TWO_CORES, can_grow=False) == []


def test_the_defaults_fit_too():
    assert check_fits(ServeConfig(), TWO_CORES, can_grow=False) == []


def test_asks_come_from_the_deployed_options_replicas_at_start_times_resources():
    cfg = ServeConfig.model_validate(
        {
            "chat": {"num_cpus": 1.5, "num_gpus": 1, "autoscaling": {"min_replicas": 1, "max_replicas": 3}},
            "image": {
                "num_cpus": 0.5,
                "autoscaling": {"min_replicas": 0, "initial_replicas": 2, "max_replicas": 2},
            },
        }
    )
    asks = {a.section: a for a in app_asks(cfg)}
    assert asks["chat"].per_replica == {"CPU": 1.5, "GPU": 1.0}
    assert (asks["chat"].start_replicas, asks["chat"].max_replicas) == (1, 3)
    assert asks["image"].start_replicas == 2  # initial_replicas wins over min_replicas
    assert asks["image"].total("CPU") == 1.0


def test_an_engine_in_every_ingress_replica_asks_for_its_resources_there():
    cfg = ServeConfig.model_validate(
        {
            "ingress": {"num_cpus": 0.5, "autoscaling": {"min_replicas": 2, "max_replicas": 4}},
            "chat": {"placement": "ingress", "num_cpus": 1.5, "num_gpus": 1},
        }
    )
    asks = {a.section: a for a in app_asks(cfg)}
    assert set(asks) == {"ingress", "image"}  # no ChatDeployment runs
    assert asks["ingress"].per_replica == {"CPU": 2.0, "GPU": 1.0}
    assert (asks["ingress"].start_replicas, asks["ingress"].max_replicas) == (2, 4)
    with pytest.raises(UserError) as info:  # two engines want two GPUs
        check_fits(cfg, {"CPU": 64.0, "GPU": 1.0}, can_grow=False)
    assert "2 GPUs (ingress.num_gpus 1 x 2 replicas)" in str(info.value)
    assert "lower ingress.num_gpus, chat.num_gpus" in str(info.value)


def test_a_shortfall_is_one_line_naming_the_keys_to_lower_with_the_numbers():
    cfg = ServeConfig.model_validate(
        {"ingress": {"num_cpus": 0.25}, "image": {"num_cpus": 1}, "chat": {"num_cpus": 1}}
    )
    with pytest.raises(UserError) as info:
        check_fits(cfg, TWO_CORES, can_grow=False)
    message = str(info.value)
    assert "\n" not in message
    assert "2.25 CPUs" in message and "the cluster has 2" in message
    assert "lower image.num_cpus, chat.num_cpus, ingress.num_cpus" in message
    assert "image.num_cpus 1 x 1" in message and "ingress.num_cpus 0.25 x 1" in message


def test_gpus_asked_on_a_cluster_without_gpus_name_the_gpu_keys_only():
    cfg = ServeConfig.model_validate({"image": {"num_gpus": 1}})
    with pytest.raises(
        UserError,
        match=r"1 GPUs \(image.num_gpus 1 x 1 replicas\) but the cluster has 0; lower image.num_gpus; or give",
    ):
        check_fits(cfg, TWO_CORES, can_grow=False)


def test_a_cluster_that_can_grow_gets_a_note_instead_of_an_error():
    cfg = ServeConfig.model_validate({"image": {"num_gpus": 1}})
    (note,) = check_fits(cfg, TWO_CORES, can_grow=True)
    assert note.startswith("note:") and "image.num_gpus" in note and "autoscaler" in note


def test_max_replicas_over_the_cluster_is_a_note_not_an_error():
    cfg = ServeConfig.model_validate({"chat": {"autoscaling": {"max_replicas": 4}}})
    (note,) = check_fits(cfg, TWO_CORES, can_grow=False)
    assert "max_replicas" in note and "chat.num_cpus 0.5 x 4" in note


def test_fractional_cpus_that_add_up_exactly_fit():
    cfg = ServeConfig.model_validate(
        {"ingress": {"num_cpus": 0.1}, "image": {"num_cpus": 0.7}, "chat": {"num_cpus": 0.2}}
    )  # 0.1 + 0.7 + 0.2 is 0.9999999999999999 or 1.0000000000000002 depending on the order
    assert check_fits(cfg, {"CPU": 1.0}, can_grow=False) == []


def test_readiness_names_the_deployments_without_a_running_replica():
    counts = {"ChatDeployment": 0, "ImageDeployment": 1, "Ingress": 1}
    readiness = Readiness(["ChatDeployment", "ImageDeployment"], "raybooth", lambda app: counts)
    assert asyncio.run(readiness.missing()) == ["ChatDeployment"]
    counts["ChatDeployment"] = 1
    assert asyncio.run(readiness.missing()) == []


def test_readiness_of_an_app_the_controller_does_not_know_is_everything_missing():
    readiness = Readiness(["ChatDeployment", "ImageDeployment"], "raybooth", lambda app: {})
    assert asyncio.run(readiness.missing()) == ["ChatDeployment", "ImageDeployment"]


def test_readiness_times_out_instead_of_hanging(monkeypatch):
    import time

    from raybooth.serving import readiness as module

    monkeypatch.setattr(module, "STATUS_TIMEOUT_S", 0.1)
    stuck = Readiness(["ChatDeployment"], "raybooth", lambda app: time.sleep(1) or {})
    with pytest.raises(TimeoutError):
        asyncio.run(stuck.missing())
