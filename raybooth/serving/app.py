"""The Serve application: `Ingress` composed with `ChatDeployment` and `ImageDeployment`.

    raybooth serve --config configs/serve.yaml                     # starts Serve and runs this app
    serve run raybooth.serving.app:app config=configs/serve.yaml   # the same app, Serve's own CLI
    serve deploy infra/serve/serve_config.yaml                     # import_path: raybooth.serving.app:app

`app` is an application builder: Serve calls it with the `args` of the Serve config (or the `key=value`
pairs of `serve run`). Accepted args:

    config:    path of a serve YAML (configs/serve.yaml); defaults when absent
    overrides: list of `key.sub=value` strings applied on top (the CLI's trailing overrides)
    settings:  a mapping merged on top of both (what `raybooth serve` and the tests pass)

Resources, replicas and queue limits come from the YAML's sections (`ingress`, `image`, `chat`); a
`deployments:` entry in a Serve config file overrides them again, as Serve always does.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import BackpressureConfig

from raybooth.cluster.config import DeploymentSection, ServeConfig, deep_merge, load_config
from raybooth.serving.auth import key_digests


def load_serve_config(args: dict[str, Any] | None) -> ServeConfig:
    """ServeConfig from builder args: `config` file, then `overrides`, then `settings`."""
    args = dict(args or {})
    overrides = args.pop("overrides", None) or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    cfg = load_config(ServeConfig, args.pop("config", None), list(overrides))
    settings = args.pop("settings", None) or {}
    if args:  # `serve run ... port=8001` style: plain keys are settings too
        settings = deep_merge(settings, args)
    if settings:
        cfg = ServeConfig.model_validate(deep_merge(cfg.model_dump(), settings))
    return cfg


def deployment_options(section: DeploymentSection) -> dict[str, Any]:
    """The one place a deployment's resources, queues and replicas are set (serving/preflight.py sums them)."""
    return {
        "ray_actor_options": {"num_cpus": section.num_cpus, "num_gpus": section.num_gpus},
        "max_ongoing_requests": section.max_ongoing_requests,
        "max_queued_requests": section.max_queued_requests,
        "autoscaling_config": section.autoscaling.to_serve(),
    }


def app_deployments(cfg: ServeConfig) -> dict[str, dict[str, Any]]:
    """Each deployment the app runs, by config section, with its options: `ingress`, `image` and, unless
    `chat.placement: ingress` puts an engine in every ingress replica (with the chat section's CPUs and
    GPUs added to the ingress's), `chat`. What `build_app` deploys and the preflight sums."""
    options = {section: deployment_options(getattr(cfg, section)) for section in ("ingress", "image", "chat")}
    if cfg.chat.placement == "ingress":
        chat = options.pop("chat")["ray_actor_options"]
        actor = options["ingress"]["ray_actor_options"]
        for key in ("num_cpus", "num_gpus"):
            actor[key] = (actor.get(key) or 0) + (chat.get(key) or 0)
    return options


def build_app(args: dict[str, Any] | None = None) -> Application:
    # The deployments' modules import torch and transformers: only here, so the preflight that reads
    # `deployment_options` stays a light import that fails in a second.
    from raybooth.serving.chat_deployment import ChatDeployment
    from raybooth.serving.image_deployment import ImageDeployment
    from raybooth.serving.ingress import Ingress

    cfg = args if isinstance(args, ServeConfig) else load_serve_config(args)
    digests = key_digests(cfg.api_keys_env, cfg.api_keys_file)
    options = app_deployments(cfg)
    chat = None  # chat.placement: ingress: each ingress replica builds its own engine
    if "chat" in options:
        chat = ChatDeployment.options(**options["chat"]).bind(
            cfg.chat.model_dump(), cfg.safety.model_dump(), cfg.chat_model
        )
    images = ImageDeployment.options(**options["image"]).bind(
        cfg.image.model_dump(), cfg.tracking.model_dump(), cfg.image_models
    )
    ingress = options["ingress"]
    # The ingress itself refuses requests over ingress.max_ongoing_requests with the OpenAI JSON 503
    # (upstream.OverloadGuard); Serve's limit sits above it, so a client never gets the proxy's plain text.
    ingress["max_ongoing_requests"] = 2 * cfg.ingress.max_ongoing_requests
    ingress["backpressure_config"] = BackpressureConfig(retry_after_s=cfg.limits.retry_after_s)
    return Ingress.options(**ingress).bind(chat, images, cfg.model_dump(), digests)


def app(args: dict[str, Any]) -> Application:
    """The importable builder for `serve run` / `serve deploy` (Serve passes the config's `args`)."""
    return build_app(args)
