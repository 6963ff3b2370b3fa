"""`raybooth serve`: start Ray Serve's HTTP proxy and run the app on the configured cluster.

    raybooth serve --config configs/serve.yaml [port=8001 image_models=[sks-dog@prod]]
    RAYBOOTH_API_KEYS=secret raybooth serve host=0.0.0.0

Refuses a non-loopback `host` without API keys before anything starts, and an app whose replicas cannot
fit the embedded cluster before anything deploys (serving/preflight.py: one line naming the keys to lower,
exit 2). While the model deployments start, `/healthz` answers 503. Ctrl-C shuts the app down.
`start_server` is also what `raybooth demo` uses inside its own Ray session.
"""

from __future__ import annotations

import signal
import time

from raybooth.cluster.config import ServeConfig, load_config
from raybooth.serving.auth import check_bind_allowed, key_digests
from raybooth.serving.high_throughput import high_throughput_env
from raybooth.serving.preflight import check_app_fits, check_fits, embedded_resources

APP_NAME = "raybooth"
ROUTES = (
    "GET  /healthz",
    "GET  /v1/models",
    "POST /v1/chat/completions",
    "POST /v1/images/generations",
    "GET  /v1/internal/stats",
)


def base_url(cfg: ServeConfig) -> str:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}"


def start_server(cfg: ServeConfig, preflight: bool = True) -> str:
    """Start Serve on `cfg.host:cfg.port` in the connected Ray cluster and deploy the app; its URL.

    Refuses first (UserError) what cannot work: no API keys off loopback, replicas that cannot fit."""
    from ray import serve

    from raybooth.serving.app import build_app

    check_bind_allowed(cfg.host, key_digests(cfg.api_keys_env, cfg.api_keys_file))
    if preflight:
        check_app_fits(cfg)
    # Built before the proxy starts: until the controller has the app's route, the proxy answers 404 to
    # every path (healthz included), so that window stays as short as submitting the app.
    application = build_app(cfg)
    serve.start(
        http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.ingress.request_timeout_s}
    )
    # Blocks until every deployment is RUNNING; meanwhile the ingress's /healthz answers 503.
    serve.run(application, name=APP_NAME, route_prefix="/")
    return base_url(cfg)


def metrics_port() -> int | None:
    """Where this node's Ray metrics agent serves Prometheus text (Serve's metrics included)."""
    try:
        import ray

        return ray._private.worker._global_node.metrics_export_port
    except Exception:  # a remote cluster: its nodes' --metrics-export-port
        return None


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_server(config: str | None, overrides: list[str], verbose: bool = False) -> int:
    from ray import serve

    from raybooth.cluster.runtime import ray_session, resolve_address

    cfg = load_config(ServeConfig, config, overrides)
    digests = key_digests(cfg.api_keys_env, cfg.api_keys_file)
    check_bind_allowed(cfg.host, digests)  # before Ray starts: fail in a second, not a minute
    embedded = resolve_address(cfg.cluster) is None
    if embedded:  # an embedded Ray cannot grow: refuse replicas that would never be placed, before it starts
        check_fits(cfg, embedded_resources(cfg.cluster), can_grow=False)
    env = high_throughput_env(cfg.ingress.high_throughput) if embedded else None
    with ray_session(cfg.cluster, verbose=verbose, secret_env=[cfg.api_keys_env], env=env) as info:
        # SIGTERM (Kubernetes, systemd, `kill`) shuts down as cleanly as Ctrl-C; set after ray.init, whose
        # own handler would abort the process.
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        if not embedded:
            check_app_fits(cfg)  # a connected cluster: notes only (its autoscaler may add nodes)
        try:
            print(f"starting Serve on {'embedded Ray' if info.embedded else info.address} ...", flush=True)
            url = start_server(cfg, preflight=False)
            signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # again: starting Serve replaced it
            auth = "API keys" if digests else "none, loopback only"
            print(f"\nraybooth is serving at {url}/v1  (OpenAI-compatible; auth: {auth})")
            for route in ROUTES:
                print(f"  {route}")
            port = metrics_port()
            if port:
                print(f"  Prometheus metrics (Ray Serve's): http://127.0.0.1:{port}/metrics")
            print("Ctrl-C stops the server.", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("\nshutting down ...", flush=True)
        finally:
            serve.shutdown()
    return 0
