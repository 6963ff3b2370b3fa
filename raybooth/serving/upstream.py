"""Calling the model deployments from the ingress: timeouts and backpressure as OpenAI errors.

A deployment whose callers already queue `max_queued_requests` requests rejects the next one with
`BackPressureError`; that becomes a 503 the client may retry, instead of a queue that grows until the
replica runs out of memory. A call still running after the request timeout is cancelled and becomes 504.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentResponse, DeploymentResponseGenerator

from raybooth.openai.errors import APIError


def overloaded(what: str) -> APIError:
    return APIError(
        503, f"the server is overloaded ({what} queue is full); retry with backoff", code="overloaded"
    )


def timed_out(what: str, timeout_s: float) -> APIError:
    return APIError(
        504, f"{what} did not finish within the request timeout of {timeout_s:g}s", code="timeout"
    )


async def call_deployment(response: DeploymentResponse, timeout_s: float, what: str) -> Any:
    try:
        return await asyncio.wait_for(response, timeout=timeout_s)
    except (BackPressureError, DeploymentUnavailableError) as e:
        raise overloaded(what) from e
    except TimeoutError as e:
        response.cancel()
        raise timed_out(what, timeout_s) from e


async def next_item(gen: DeploymentResponseGenerator, deadline: float, what: str, timeout_s: float) -> Any:
    """The next streamed item before `deadline` (loop time); StopAsyncIteration at the end."""
    remaining = deadline - asyncio.get_running_loop().time()
    try:
        return await asyncio.wait_for(gen.__anext__(), timeout=max(remaining, 0.001))
    except (BackPressureError, DeploymentUnavailableError) as e:
        raise overloaded(what) from e
    except TimeoutError as e:
        gen.cancel()
        raise timed_out(what, timeout_s) from e
