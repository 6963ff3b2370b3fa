"""ray_cluster.yaml: valid for Ray's own cluster launcher, on the pinned Ray, and wired the way README says.

.venv/bin/python -m pytest tests/infra/test_cluster_launcher.py
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _image_tags(raw: dict) -> list[str]:
    docker = raw["docker"]
    tags = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    tags += [t["docker"]["worker_image"] for t in raw["available_node_types"].values() if "docker" in t]
    return tags


def test_passes_rays_own_schema_and_launcher_validation(raw):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # what the file says, before Ray fills in its defaults
    prepared = prepare_config(
        copy.deepcopy(raw)
    )  # what `ray up` does next: merge defaults.yaml, docker checks
    validate_config(prepared)
    assert (
        prepared["setup_commands"] == [] and prepared["head_setup_commands"] == []
    )  # Ray's pip defaults replaced


def test_images_run_the_pinned_ray(raw, pinned_ray):
    tags = _image_tags(raw)
    assert tags
    for tag in tags:
        match = re.search(r":ray(\d+\.\d+\.\d+)-py311-(cpu|gpu)$", tag)
        assert match, f"{tag}: expected a tag like raybooth:ray{pinned_ray}-py311-gpu"
        assert match.group(1) == pinned_ray, (
            f"{tag} runs Ray {match.group(1)}, constraints.txt pins {pinned_ray}"
        )
    assert raw["docker"]["head_image"].endswith("-cpu") and raw["docker"]["worker_image"].endswith("-gpu")


def test_head_is_cpu_only_and_runs_mlflow(raw):
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # nothing scheduled next to the GCS and MLflow
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    start = " ".join(raw["head_start_ray_commands"])
    assert "start_mlflow.sh" in start and "ray start --head" in start
    assert "MLFLOW_ARTIFACTS_DESTINATION=s3://" in " ".join(raw["docker"]["head_run_options"])


def test_worker_groups_split_on_demand_gpus_from_spot_batch_nodes(raw):
    types = {k: v for k, v in raw["available_node_types"].items() if k != raw["head_node_type"]}
    on_demand_gpu = [t for t in types.values() if "gpu_on_demand" in t["resources"]]
    spot = [
        t
        for t in types.values()
        if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    ]
    assert on_demand_gpu and all("InstanceMarketOptions" not in t["node_config"] for t in on_demand_gpu)
    assert all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in on_demand_gpu)
    assert spot and all("gpu_on_demand" not in t["resources"] for t in spot)
    assert all(t["min_workers"] == 0 for t in types.values())  # idle clusters cost only the head
    assert raw["max_workers"] >= sum(t["max_workers"] for t in types.values())
    assert 0 < raw["idle_timeout_minutes"] <= 30


def test_serve_gpu_deployments_ask_for_a_resource_the_gpu_group_offers(raw):
    serve = yaml.safe_load((REPO / "infra/serve/serve_config.yaml").read_text())
    offered = {r for t in raw["available_node_types"].values() for r in t["resources"]}
    for deployment in serve["applications"][0]["deployments"]:
        for resource in deployment.get("ray_actor_options", {}).get("resources", {}):
            assert resource in offered, f"{deployment['name']} needs {resource}, which no node type offers"


def test_mounted_scripts_exist_and_start_commands_use_them(raw):
    for remote, local in raw["file_mounts"].items():
        assert (REPO / local).is_dir(), f"file_mounts {remote}: {local} is not a folder of the repo"
    commands = " ".join(raw["head_start_ray_commands"] + raw["worker_start_ray_commands"])
    for script in re.findall(r"/home/ray/raybooth-infra/(\S+?\.(?:sh|py))", commands):
        remote_dir, name = script.rsplit("/", 1)
        local = raw["file_mounts"][f"/home/ray/raybooth-infra/{remote_dir}"]
        assert (REPO / local / name).is_file(), f"start commands run {script}, missing from {local}"


def test_every_top_level_key_says_why():
    lines = CLUSTER_YAML.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+:", line):
            commented = "#" in line or (i > 0 and lines[i - 1].lstrip().startswith("#"))
            nested_comment = any(ln.strip().startswith("#") or " # " in ln for ln in lines[i + 1 : i + 4])
            assert commented or nested_comment, (
                f"ray_cluster.yaml line {i + 1}: `{line}` has no comment saying why"
            )
