"""Before deploying: does what the Serve app asks for fit the cluster? One line naming the keys if not.

    from raybooth.serving.preflight import check_app_fits, check_fits, embedded_resources
    check_fits(cfg, embedded_resources(cfg.cluster), can_grow=False)   # `raybooth serve`, before Ray starts
    check_app_fits(cfg)   # against the connected cluster (`raybooth demo`, a remote cluster), before serve.start

Ray Serve places each replica as an actor with its `ray_actor_options`; a replica that does not fit waits
forever ("total resources available: {}"), and the app with it. So the app's ask at start, per deployment
`replicas at start x num_cpus/num_gpus` read from the same `.options(...)` that `build_app` deploys
(`app.deployment_options`), is summed and compared with the cluster's total resources. Serve's controller
and HTTP proxy reserve no CPUs in Ray 2.60 (both are `num_cpus=0` actors), so they add nothing.

On an embedded Ray the cluster cannot grow: a shortfall is a `UserError` (the CLI prints it, exit 2). On a
connected cluster an autoscaler may add nodes, so it is a printed note instead. What `max_replicas` would
ask is a note too: Serve simply stops scaling up where the cluster is full.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from raybooth.cluster.config import ClusterSection, ServeConfig
from raybooth.errors import UserError

RESOURCES = (("CPU", "num_cpus"), ("GPU", "num_gpus"))  # Ray resource name -> ray_actor_options key
_EPS = 1e-9  # fractional CPUs (0.1 + 0.5 + ...) must not fail on float rounding


@dataclass(frozen=True)
class DeploymentAsk:
    """What one deployment reserves: per replica, and how many replicas at start and at most."""

    section: str  # config section: ingress | image | chat
    per_replica: dict[str, float]  # {"CPU": 0.5, "GPU": 0}
    start_replicas: int  # autoscaling initial_replicas, else min_replicas
    max_replicas: int
    owners: tuple[str, ...] = ()  # the sections whose num_cpus/num_gpus add up to it (default: `section`)

    def total(self, resource: str, at_max: bool = False) -> float:
        return self.per_replica.get(resource, 0.0) * (self.max_replicas if at_max else self.start_replicas)


def app_asks(cfg: ServeConfig) -> list[DeploymentAsk]:
    """Each deployment's ask, from exactly the options `build_app` deploys it with."""
    from raybooth.serving.app import app_deployments

    asks = []
    for section, options in app_deployments(cfg).items():
        actor, scaling = options["ray_actor_options"], options["autoscaling_config"]
        start = scaling.get("initial_replicas")
        asks.append(
            DeploymentAsk(
                section=section,
                per_replica={name: float(actor.get(key) or 0) for name, key in RESOURCES},
                start_replicas=int(scaling["min_replicas"] if start is None else start),
                max_replicas=int(scaling["max_replicas"]),
                # chat.placement: ingress: the ingress replicas hold the engines, with the chat's resources
                owners=("ingress", "chat")
                if section == "ingress" and cfg.chat.placement == "ingress"
                else (),
            )
        )
    return asks


def _fmt(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def shortfalls(asks: list[DeploymentAsk], cluster: Mapping[str, float], at_max: bool = False) -> list[str]:
    """One clause per resource the app asks more of than the cluster has; empty when it fits."""
    problems = []
    for resource, key in RESOURCES:
        need = sum(a.total(resource, at_max) for a in asks)
        have = float(cluster.get(resource, 0.0))
        if need <= have + _EPS:
            continue
        askers = sorted((a for a in asks if a.total(resource, at_max) > 0), key=lambda a: -a.total(resource))
        parts = " + ".join(
            f"{a.section}.{key} {_fmt(a.per_replica[resource])} x {a.max_replicas if at_max else a.start_replicas}"
            for a in askers
        )
        lower = ", ".join(f"{owner}.{key}" for a in askers for owner in a.owners or (a.section,))
        # Why fractions are safe: Ray's logical CPUs only place actors, torch's threads are not capped by them.
        hint = (
            " (fractions such as 0.5 are fine: they do not limit torch's threads)"
            if resource == "CPU"
            else ""
        )
        problems.append(
            f"{_fmt(need)} {resource}s ({parts} replicas) but the cluster has {_fmt(have)}; lower {lower}{hint}"
        )
    return problems


def check_fits(cfg: ServeConfig, cluster: Mapping[str, float], can_grow: bool) -> list[str]:
    """Raise `UserError` if the app cannot start on `cluster` (unless it `can_grow`); return notes to print."""
    asks = app_asks(cfg)
    notes = []
    start = shortfalls(asks, cluster)
    if start:
        message = f"the serve app asks {'; and '.join(start)}; or give an embedded Ray more (cluster.num_cpus/num_gpus)"
        if not can_grow:
            raise UserError(message)
        notes.append(f"note: {message}; Serve waits until the autoscaler adds nodes")
    elif at_max := shortfalls(asks, cluster, at_max=True):
        notes.append(
            f"note: at autoscaling max_replicas the app would ask {'; and '.join(at_max)}: Serve stops "
            "scaling up where the cluster is full"
        )
    return notes


def embedded_resources(section: ClusterSection) -> dict[str, float]:
    """What the embedded Ray that `cluster.runtime.init_ray` would start offers (its same defaults)."""
    import os

    import torch

    gpus = section.num_gpus if section.num_gpus is not None else torch.cuda.device_count()
    return {"CPU": float(section.num_cpus or os.cpu_count() or 1), "GPU": float(gpus)}


def check_app_fits(cfg: ServeConfig) -> None:
    """`check_fits` against the connected Ray cluster (an embedded one cannot grow); prints any notes."""
    import ray

    from raybooth.cluster.runtime import resolve_address

    cluster: dict[str, Any] = ray.cluster_resources()
    for note in check_fits(cfg, cluster, can_grow=resolve_address(cfg.cluster) is not None):
        print(note, flush=True)
