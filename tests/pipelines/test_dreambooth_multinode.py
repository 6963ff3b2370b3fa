"""DreamBooth across two Ray nodes, with storage on the loopback S3 server and MLflow on a real tracking
server (artifacts on that S3 too): what a multi-node cluster needs.

    .venv/bin/python -m pytest tests/pipelines/test_dreambooth_multinode.py

A `ray.cluster_utils.Cluster` with two nodes of 2 CPUs each; two workers of 2 CPUs can only be placed
one per node. The module shuts the shared embedded Ray down first and starts it again afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mlflow import MlflowClient

from raybooth.cluster import storage, tracking
from raybooth.cluster.config import DreamBoothConfig, TrackingSection
from raybooth.pipelines.train import launch_training
from raybooth.samples import draw_sample_image, png_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes(s3_server, request) -> Iterator[object]:
    import ray
    from ray.cluster_utils import Cluster

    # tests/conftest.py's start_test_ray re-creates the suite's shared Ray afterwards (found through pytest:
    # with --import-mode=importlib a conftest is not importable by name).
    conftests = [m for m in request.config.pluginmanager.get_plugins() if hasattr(m, "start_test_ray")]
    start_test_ray = conftests[0].start_test_ray

    ray.shutdown()
    # Started after s3_server, so both nodes' workers inherit the AWS_* variables pointing at it.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    cluster.add_node(num_cpus=2, num_gpus=0)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        start_test_ray()


def test_two_nodes_with_s3_storage_and_a_tracking_server(
    two_nodes, s3_server, s3_bucket, mlflow_server, mlflow_artifacts_root
):
    root = f"s3://{s3_bucket}/raybooth"
    for i in range(3):  # the subject's photos live in S3 too
        storage.write_bytes_atomic(f"{root}/subject/img_{i}.png", png_bytes(draw_sample_image(i, size=48)))
    cfg = DreamBoothConfig.model_validate(
        dict(
            concepts=[{"instance_data": f"{root}/subject", "class_name": "dog", "num_class_images": 2}],
            resolution=32,
            steps=4,
            checkpoint_every=2,
            checkpoints_to_keep=1,
            learning_rate=1e-4,
            sample_steps=2,
            num_workers=2,
            cpus_per_worker=2,  # a node has 2 CPUs: one worker per node
            model_name="db-multinode",
            storage={"root": root},
            tracking={"tracking_uri": mlflow_server, "experiment": "db-multinode"},
        )
    )
    result = launch_training(cfg)

    run = tracking.get_run(result.run_id)
    assert run.data.params["nodes"] == "2" and run.data.params["world_size"] == "2"
    keys = s3_server.list_keys(s3_bucket, "raybooth/")
    # Class images, and only the last checkpoint (checkpoints_to_keep=1), in the bucket.
    assert sum("/class_images/" in k and k.endswith(".png") for k in keys) == 2
    run_prefix = f"raybooth/dreambooth/{result.checkpoint.split('/')[-2]}/"
    checkpoints = {k.split("/")[-2] for k in keys if k.startswith(run_prefix) and k.endswith("/meta.json")}
    assert checkpoints == {"checkpoint_000004"}
    assert f"{run_prefix}checkpoint_000004/unet.safetensors" in keys
    assert result.checkpoint == f"{root}/dreambooth/{run_prefix.split('/')[-2]}/checkpoint_000004"

    # MLflow: the server stored the model's artifacts in its S3 bucket; the registry serves the version.
    bucket, prefix = mlflow_artifacts_root.removeprefix("s3://").split("/", 1)
    artifact_keys = s3_server.list_keys(bucket, prefix)
    assert any(k.endswith("model/unet/diffusion_pytorch_model.safetensors") for k in artifact_keys)
    tracking.configure(TrackingSection(tracking_uri=mlflow_server))
    assert sorted(m.step for m in MlflowClient().get_metric_history(result.run_id, "loss")) == [1, 2, 3, 4]
    assert (tracking.download_model(result.model_uri) / "model_index.json").is_file()
