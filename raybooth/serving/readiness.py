"""Is the app ready to answer? What the ingress's `GET /healthz` asks before it says 200.

    readiness = Readiness(["ChatDeployment", "ImageDeployment"])
    missing = await readiness.missing()    # [] when each has a RUNNING replica, else the ones that do not

The ingress is cheap and starts in seconds, while the model deployments load their weights (or wait for a
node with a GPU). Until each has a running replica, a request would queue behind them, so a load balancer
must not send traffic yet: `/healthz` answers 503 instead of 200. Serve's own `/-/healthz` only says the
proxy is up. The answer comes from the Serve controller (`serve.status()`, the public API), never from the
model replicas, so it stays quick while they are busy with batches.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

STATUS_TIMEOUT_S = 5.0  # the controller answers in milliseconds; longer means it is itself in trouble
READY_CACHE_S = 1.0  # load balancers poll every few seconds: one controller call per second at most


def serve_replica_counts(app_name: str) -> dict[str, int]:
    """RUNNING replicas per deployment of `app_name`, from the Serve controller (blocking)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {name: int(d.replica_states.get("RUNNING", 0)) for name, d in app.deployments.items()}


class Readiness:
    """Which of `deployments` have no running replica yet; `running_replicas` is injectable for tests."""

    def __init__(
        self,
        deployments: list[str],
        app_name: str | None = None,
        running_replicas: Callable[[str], dict[str, int]] = serve_replica_counts,
    ):
        self.deployments = deployments
        self._app_name = app_name
        self._running_replicas = running_replicas
        self._ready_until = 0.0

    @property
    def app_name(self) -> str:
        if self._app_name is None:
            from ray import serve

            self._app_name = serve.get_replica_context().app_name
        return self._app_name

    async def missing(self) -> list[str]:
        """The deployments without a running replica ([] when ready); raises TimeoutError if Serve is mute."""
        if time.monotonic() < self._ready_until:
            return []
        counts: dict[str, Any] = await asyncio.wait_for(
            asyncio.to_thread(self._running_replicas, self.app_name), STATUS_TIMEOUT_S
        )
        missing = [name for name in self.deployments if not counts.get(name)]
        if not missing:
            self._ready_until = time.monotonic() + READY_CACHE_S
        return missing
