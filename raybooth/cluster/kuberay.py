"""Check raybooth's KubeRay manifests before `kubectl apply`, and keep the RayService's Serve config in sync.

    python -m raybooth.cluster.kuberay check          # validate every manifest under infra/k8s/
    python -m raybooth.cluster.kuberay sync           # copy infra/serve/serve_config.yaml into the RayService

The models below hold the fields the KubeRay operator (ray.io/v1) needs to create pods, the ones a typo
turns into a cluster that never starts: head/worker group specs with their pod templates, worker group
sizes, RayJob entrypoints, RayService serveConfigV2. Other fields are allowed through untouched (the
operator's CRD validates them); Kubernetes kinds other than Ray's only need apiVersion, kind and a name.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

RAY_API_VERSION = "ray.io/v1"
DEFAULT_MANIFEST_DIR = Path("infra/k8s")
DEFAULT_SERVE_CONFIG = Path("infra/serve/serve_config.yaml")
DEFAULT_RAYSERVICE = DEFAULT_MANIFEST_DIR / "serve" / "rayservice.yaml"

# Kubernetes object names: lowercase RFC 1123 labels (KubeRay appends suffixes, so keep them short).
_K8S_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class _Open(BaseModel):
    """Known fields are checked; the rest of the Kubernetes object passes through."""

    model_config = ConfigDict(extra="allow")


class Metadata(_Open):
    name: str = Field(..., pattern=_K8S_NAME, max_length=48)


class Container(_Open):
    name: str = Field(..., pattern=_K8S_NAME)
    image: str = Field(..., min_length=1)
    resources: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def gpus(self) -> int:
        """nvidia.com/gpu in limits (Kubernetes requires GPUs in limits; requests must equal them)."""
        return int(self.resources.get("limits", {}).get("nvidia.com/gpu", 0))


class PodSpec(_Open):
    containers: list[Container] = Field(..., min_length=1)


class PodTemplate(_Open):
    spec: PodSpec


def _string_params(params: dict[str, Any]) -> dict[str, Any]:
    # KubeRay's rayStartParams is map[string]string: `num-cpus: 0` (an int) is rejected by the API server.
    bad = [k for k, v in params.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"rayStartParams values must be quoted strings: {', '.join(bad)}")
    return params


class HeadGroupSpec(_Open):
    rayStartParams: dict[str, Any] = Field(default_factory=dict)
    template: PodTemplate

    _params = field_validator("rayStartParams")(_string_params)


class WorkerGroupSpec(_Open):
    groupName: str = Field(..., pattern=_K8S_NAME)
    replicas: int = Field(..., ge=0)
    minReplicas: int = Field(..., ge=0)
    maxReplicas: int = Field(..., ge=1)
    rayStartParams: dict[str, Any] = Field(default_factory=dict)
    template: PodTemplate

    _params = field_validator("rayStartParams")(_string_params)

    @model_validator(mode="after")
    def _replicas_in_range(self) -> WorkerGroupSpec:
        if not self.minReplicas <= self.replicas <= self.maxReplicas:
            raise ValueError(
                f"worker group {self.groupName}: need minReplicas <= replicas <= maxReplicas "
                f"(got {self.minReplicas} <= {self.replicas} <= {self.maxReplicas})"
            )
        return self

    def gpus_per_pod(self) -> int:
        return sum(c.gpus() for c in self.template.spec.containers)


class AutoscalerOptions(_Open):
    upscalingMode: Literal["Default", "Aggressive", "Conservative"] | None = None
    idleTimeoutSeconds: int | None = Field(None, ge=0)


class RayClusterSpec(_Open):
    rayVersion: StrictStr | None = None
    enableInTreeAutoscaling: bool = False
    autoscalerOptions: AutoscalerOptions | None = None
    headGroupSpec: HeadGroupSpec
    workerGroupSpecs: list[WorkerGroupSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_groups(self) -> RayClusterSpec:
        names = [g.groupName for g in self.workerGroupSpecs]
        if len(names) != len(set(names)):
            raise ValueError(f"worker groupName values must be unique, got {names}")
        return self

    def images(self) -> list[str]:
        pods = [self.headGroupSpec.template, *(g.template for g in self.workerGroupSpecs)]
        return [c.image for pod in pods for c in pod.spec.containers]


class RayCluster(_Open):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayCluster"]
    metadata: Metadata
    spec: RayClusterSpec


class RayJobSpec(_Open):
    entrypoint: str = Field(..., min_length=1)
    runtimeEnvYAML: str | None = None
    rayClusterSpec: RayClusterSpec | None = None
    clusterSelector: dict[str, str] | None = None
    shutdownAfterJobFinishes: bool = False
    ttlSecondsAfterFinished: int = Field(0, ge=0)
    activeDeadlineSeconds: int | None = Field(None, gt=0)
    submissionMode: Literal["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"] | None = None

    @field_validator("runtimeEnvYAML")
    @classmethod
    def _runtime_env_is_a_mapping(cls, text: str | None) -> str | None:
        if text is not None and not isinstance(yaml.safe_load(text) or {}, dict):
            raise ValueError("runtimeEnvYAML must be a YAML mapping (working_dir, env_vars, ...)")
        return text

    @model_validator(mode="after")
    def _one_cluster(self) -> RayJobSpec:
        if (self.rayClusterSpec is None) == (self.clusterSelector is None):
            raise ValueError(
                "a RayJob needs exactly one of rayClusterSpec (its own cluster) or clusterSelector"
            )
        return self


class RayJob(_Open):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayJob"]
    metadata: Metadata
    spec: RayJobSpec


class RayServiceSpec(_Open):
    serveConfigV2: str = Field(..., min_length=1)
    rayClusterConfig: RayClusterSpec

    @field_validator("serveConfigV2")
    @classmethod
    def _serve_config_has_applications(cls, text: str) -> str:
        config = yaml.safe_load(text)
        if not isinstance(config, dict) or not config.get("applications"):
            raise ValueError("serveConfigV2 must be a Serve config YAML with an `applications` list")
        return text


class RayService(_Open):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayService"]
    metadata: Metadata
    spec: RayServiceSpec


class K8sObject(_Open):
    """Any other Kubernetes object (ConfigMap, Deployment, Service, ...)."""

    apiVersion: str = Field(..., min_length=1)
    kind: str = Field(..., min_length=1)
    metadata: Metadata


RAY_KINDS: dict[str, type[_Open]] = {"RayCluster": RayCluster, "RayJob": RayJob, "RayService": RayService}


def validate_manifest(doc: dict[str, Any]) -> _Open:
    """The typed object for one YAML document; raises pydantic's ValidationError with the bad field."""
    return RAY_KINDS.get(doc.get("kind", ""), K8sObject).model_validate(doc)


def load_manifests(root: Path = DEFAULT_MANIFEST_DIR) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(file, document) for every non-empty YAML document under `root`, recursively."""
    for path in sorted(root.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def cluster_spec(obj: _Open) -> RayClusterSpec | None:
    """The RayClusterSpec inside a RayCluster, RayJob (own cluster) or RayService."""
    if isinstance(obj, RayCluster):
        return obj.spec
    if isinstance(obj, RayJob):
        return obj.spec.rayClusterSpec
    if isinstance(obj, RayService):
        return obj.spec.rayClusterConfig
    return None


# --------------------------------------------------------------------------------------------------
# serveConfigV2 <-> infra/serve/serve_config.yaml
# --------------------------------------------------------------------------------------------------

_SERVE_BLOCK = re.compile(
    r"^(?P<indent>[ ]*)serveConfigV2:[ ]*\|[^\n]*\n(?P<body>(?:(?:(?P=indent)[ ]+[^\n]*)?\n)*)", re.M
)


def embed_serve_config(rayservice_text: str, serve_config_text: str) -> str:
    """The RayService YAML with its `serveConfigV2: |` block replaced by `serve_config_text`, verbatim."""
    match = _SERVE_BLOCK.search(rayservice_text)
    if match is None:
        raise ValueError("no `serveConfigV2: |` block found in the RayService manifest")
    indent = match.group("indent") + "  "
    body = "".join(f"{indent}{line}\n" if line.strip() else "\n" for line in serve_config_text.splitlines())
    old_body = match.group("body")
    trailing_blank = "\n" * (len(old_body) - len(old_body.rstrip("\n")) - 1) if old_body.strip() else ""
    return rayservice_text[: match.start("body")] + body + trailing_blank + rayservice_text[match.end() :]


def check(root: Path = DEFAULT_MANIFEST_DIR, serve_config: Path = DEFAULT_SERVE_CONFIG) -> list[str]:
    """Every problem found under `root` (empty when all manifests are valid and the Serve config is in sync)."""
    problems = []
    for path, doc in load_manifests(root):
        try:
            obj = validate_manifest(doc)
        except ValidationError as e:
            problems.append(f"{path}: {doc.get('kind')} {e.errors()[0]['loc']}: {e.errors()[0]['msg']}")
            continue
        if isinstance(obj, RayService) and obj.spec.serveConfigV2 != serve_config.read_text():
            problems.append(
                f"{path}: serveConfigV2 differs from {serve_config}; run `python -m {__name__} sync`"
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["check", "sync"])
    parser.add_argument("--manifests", type=Path, default=DEFAULT_MANIFEST_DIR)
    parser.add_argument("--serve-config", type=Path, default=DEFAULT_SERVE_CONFIG)
    parser.add_argument("--rayservice", type=Path, default=DEFAULT_RAYSERVICE)
    args = parser.parse_args(argv)
    if args.command == "sync":
        text = embed_serve_config(args.rayservice.read_text(), args.serve_config.read_text())
        args.rayservice.write_text(text)
        print(f"{args.rayservice}: serveConfigV2 = {args.serve_config}")
    problems = check(args.manifests, args.serve_config)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
