"""infra/k8s: every manifest has the fields KubeRay needs, on the pinned Ray, and the Serve config cannot drift.

.venv/bin/python -m pytest tests/infra/test_kuberay.py
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from raybooth.cluster import jobs, kuberay
from raybooth.cluster.config import ServeConfig, load_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra/k8s"
SERVE_CONFIG = REPO / "infra/serve/serve_config.yaml"
IMAGE_CONFIGS = "/home/ray/raybooth/configs/"  # where the image keeps configs/ (infra/docker/Dockerfile)

MANIFESTS = list(kuberay.load_manifests(K8S))


def _objects(kind: str) -> list[kuberay._Open]:
    return [kuberay.validate_manifest(doc) for _, doc in MANIFESTS if doc["kind"] == kind]


@pytest.mark.parametrize(
    ("path", "doc"),
    MANIFESTS,
    ids=[f"{p.relative_to(K8S)}:{d['kind']}:{d['metadata']['name']}" for p, d in MANIFESTS],
)
def test_every_manifest_has_the_fields_its_kind_requires(path, doc):
    obj = kuberay.validate_manifest(doc)  # raises, naming the field, if one KubeRay needs is missing or wrong
    if doc["kind"] in kuberay.RAY_KINDS:
        assert isinstance(obj, kuberay.RAY_KINDS[doc["kind"]]) and obj.apiVersion == kuberay.RAY_API_VERSION
    else:
        assert doc["kind"] in {
            "ConfigMap",
            "ServiceAccount",
            "PersistentVolumeClaim",
            "Deployment",
            "Service",
        }


def test_the_schema_rejects_what_the_operator_would():
    cluster = next(doc for _, doc in MANIFESTS if doc["kind"] == "RayCluster")
    broken = yaml.safe_load(yaml.safe_dump(cluster))
    broken["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # an int, not a string
    with pytest.raises(Exception, match="quoted strings"):
        kuberay.validate_manifest(broken)
    broken = yaml.safe_load(yaml.safe_dump(cluster))
    broken["spec"]["workerGroupSpecs"][0]["minReplicas"] = 5  # above replicas
    with pytest.raises(Exception, match="minReplicas <= replicas"):
        kuberay.validate_manifest(broken)
    broken = yaml.safe_load(yaml.safe_dump(cluster))
    del broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    with pytest.raises(Exception, match="containers"):
        kuberay.validate_manifest(broken)


def test_there_is_a_cluster_a_train_job_a_caption_job_and_a_service():
    assert len(_objects("RayCluster")) == 1
    entrypoints = {shlex.split(job.spec.entrypoint)[1] for job in _objects("RayJob")}
    assert entrypoints == {"train", "caption"}
    assert len(_objects("RayService")) == 1


def test_rayservice_serves_exactly_the_repo_serve_config():
    (service,) = _objects("RayService")
    assert service.spec.serveConfigV2 == SERVE_CONFIG.read_text(), (
        "infra/k8s/serve/rayservice.yaml drifted from infra/serve/serve_config.yaml: "
        "run `python -m raybooth.cluster.kuberay sync`"
    )
    assert kuberay.check(K8S, SERVE_CONFIG) == []


def test_serve_config_is_a_valid_serve_deploy_config():
    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    (app,) = config.applications
    assert (app.name, app.route_prefix, app.import_path) == ("raybooth", "/", "raybooth.serving.app:app")
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"Ingress", "ChatDeployment", "ImageDeployment"}
    for name in ("ChatDeployment", "ImageDeployment"):
        d = deployments[name]
        assert d.ray_actor_options.num_gpus == 1
        assert 1 <= d.autoscaling_config["min_replicas"] <= d.autoscaling_config["max_replicas"]
        assert d.max_queued_requests > 0  # bounded queues: overload answers 503 instead of piling up
    image = deployments["ImageDeployment"]
    assert image.max_ongoing_requests >= image.user_config["max_batch_size"]  # else batches never fill
    # The builder's args name the image's copy of configs/serve.yaml; with this repo's copy they must load.
    args = app.args
    config = load_config(
        ServeConfig, args["config"].replace(IMAGE_CONFIGS, f"{REPO}/configs/"), args["overrides"]
    )
    assert config.host == "0.0.0.0" and config.chat_model != "tiny-vlm"


def test_clusters_run_the_pinned_ray_and_gpu_pods_get_gpu_images(pinned_ray):
    specs = [kuberay.cluster_spec(kuberay.validate_manifest(doc)) for _, doc in MANIFESTS]
    specs = [s for s in specs if s is not None]
    assert len(specs) == 4
    for spec in specs:
        assert spec.rayVersion == pinned_ray
        groups = [(spec.headGroupSpec.template, 0)] + [
            (g.template, g.gpus_per_pod()) for g in spec.workerGroupSpecs
        ]
        for template, gpus in groups:
            for container in template.spec.containers:
                flavor = "gpu" if gpus else "cpu"
                assert container.image.endswith(f":ray{pinned_ray}-py311-{flavor}"), container.image
                requests = container.resources.get("requests", {})
                assert requests.get("nvidia.com/gpu", 0) == container.gpus()  # Kubernetes needs them equal
    for _, doc in MANIFESTS:  # MLflow and anything else built on the image
        if doc["kind"] == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                assert c["image"].endswith(f":ray{pinned_ray}-py311-cpu")


def test_long_running_cluster_autoscales_every_worker_group():
    (cluster,) = _objects("RayCluster")
    assert cluster.spec.enableInTreeAutoscaling and cluster.spec.autoscalerOptions.idleTimeoutSeconds
    assert cluster.spec.headGroupSpec.rayStartParams["num-cpus"] == "0"
    assert {g.groupName for g in cluster.spec.workerGroupSpecs} == {"gpu", "batch-gpu", "batch-cpu"}
    assert all(g.minReplicas == 0 < g.maxReplicas for g in cluster.spec.workerGroupSpecs)


def test_gpu_deployments_resource_is_offered_where_serve_runs():
    serve = yaml.safe_load(SERVE_CONFIG.read_text())
    needed = {
        r
        for d in serve["applications"][0]["deployments"]
        for r in d["ray_actor_options"].get("resources", {})
    }
    for obj in (*_objects("RayService"), *_objects("RayCluster")):
        spec = kuberay.cluster_spec(obj)
        offered = " ".join(g.rayStartParams.get("resources", "") for g in spec.workerGroupSpecs)
        assert all(f'\\"{r}\\"' in offered for r in needed), f"{obj.metadata.name}: no group offers {needed}"


@pytest.mark.parametrize("job", _objects("RayJob"), ids=lambda j: j.metadata.name)
def test_rayjob_entrypoints_are_valid_raybooth_commands_a_cluster_can_run(job):
    argv = shlex.split(job.spec.entrypoint)
    assert argv[0] == "raybooth" and argv[1] in jobs.JOB_SUBCOMMANDS
    # The configs the entrypoint names inside the image are this repo's configs/ (the Dockerfile copies them).
    args = [a.replace(IMAGE_CONFIGS, f"{REPO}/configs/") for a in argv[2:]]
    assert jobs.cluster_path_problems(argv[1], args) == []  # validates the config and overrides, too
    runtime_env = yaml.safe_load(job.spec.runtimeEnvYAML)
    assert isinstance(runtime_env, dict) and runtime_env.get("env_vars")
    assert job.spec.shutdownAfterJobFinishes and job.spec.ttlSecondsAfterFinished > 0


def test_no_credentials_are_written_into_infra_files():
    files = [REPO / "ray_cluster.yaml", *sorted((REPO / "infra").rglob("*.yaml"))]
    # A value after the name (placeholders like `...`, `<key>` or `$VAR` in comments are fine).
    secret_value = re.compile(
        r"(AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|RAYBOOTH_API_KEYS|HF_TOKEN|password)\s*[:=]\s*[^\s{}<.$]",
        re.I,
    )
    for path in files:
        text = path.read_text()
        assert not secret_value.search(text), f"{path}: a credential value is written in the file"
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{path}: an AWS access key id"
        assert not re.search(r"://[^/\s:@]+:[^/\s@<]+@", text), f"{path}: a URI with a password"
    for (
        _,
        doc,
    ) in MANIFESTS:  # k8s Secrets are created with kubectl from the README, never applied from the repo
        assert doc["kind"] != "Secret"


def test_the_cluster_pods_run_serve_in_the_mode_and_through_the_launcher_the_image_installs():
    from raybooth.serving.high_throughput import SWITCHES

    env = next(
        d["data"]
        for d in yaml.safe_load_all((REPO / "infra/k8s/00-base.yaml").read_text())
        if d and d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "raybooth-env"
    )
    for name in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED"):
        assert env[name] == SWITCHES[name]
    launcher = env["RAY_SERVE_HAPROXY_BINARY_PATH"]
    assert Path(launcher).name == "raybooth-haproxy"
    # the image build fails unless pip put the script exactly there
    assert f"= {launcher}" in (REPO / "infra/docker/Dockerfile").read_text()
