"""Calling the model deployments from the ingress: overload, dead replicas and timeouts as OpenAI errors.

    pngs = await call_deployment(handle.generate.remote(job), timeout_s, "image generation")
    event = await next_item(gen, deadline, "chat completion", timeout_s)   # one streamed item
    api.add_middleware(OverloadGuard)                                      # the ingress's own limit

A deployment whose callers already queue `max_queued_requests` requests rejects the next one with
`BackPressureError`; that becomes a 503 `overloaded` the client may retry (with `Retry-After`), instead
of a queue that grows until the replica runs out of memory. A replica that dies under a call (its
process killed, out of memory) is a 503 `replica_failed`: Serve starts a new one, so a retry is the
fix. A call still running after the request timeout is cancelled and becomes 504.

Serve's proxy answers its own 503 in plain text when the ingress's queue is full, so the ingress never
lets it get there: `OverloadGuard` refuses requests beyond `ingress.max_ongoing_requests` per replica
with the same JSON 503, and app.py gives the Ingress deployment room above that limit. The guard also
rewrites any plain-text 503 made inside the ingress (Serve's own handler for its backpressure errors)
into the OpenAI one, so every 503 a client sees has the JSON body and `Retry-After`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentResponse, DeploymentResponseGenerator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from raybooth.openai.errors import APIError

RETRY_AFTER_S = 1  # what a 503 tells clients to wait; Ingress sets it from limits.retry_after_s

# RayActorError covers ActorDiedError (the process was killed, ran out of memory) and
# ActorUnavailableError (it cannot be reached right now): either way Serve replaces the replica.
REPLICA_FAILURES = (RayActorError,)


def overloaded(what: str) -> APIError:
    return APIError(
        503, f"the server is overloaded ({what} queue is full); retry with backoff", code="overloaded"
    )


def replica_failed(what: str) -> APIError:
    return APIError(
        503,
        f"the replica running this {what} failed and is being replaced; retry the request",
        code="replica_failed",
    )


def deployment_failed(what: str) -> APIError:
    # The deployment's own traceback is in its replica's log; the client gets no internal text.
    return APIError(500, f"the {what} failed on the server; the error is logged", code="server_error")


def timed_out(what: str, timeout_s: float) -> APIError:
    return APIError(
        504, f"{what} did not finish within the request timeout of {timeout_s:g}s", code="timeout"
    )


def error_headers(err: APIError) -> dict[str, str] | None:
    """Headers an error response carries: OpenAI's `WWW-Authenticate` on 401, `Retry-After` on 503."""
    if err.status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if err.status == 503:
        return {"Retry-After": str(RETRY_AFTER_S)}
    return None


def _upstream_error(e: BaseException, what: str) -> APIError | None:
    if isinstance(e, BackPressureError | DeploymentUnavailableError):
        return overloaded(what)
    if isinstance(e, REPLICA_FAILURES):
        return replica_failed(what)
    if isinstance(e, RayTaskError):  # the deployment's method raised
        return deployment_failed(what)
    return None


async def call_deployment(response: DeploymentResponse, timeout_s: float, what: str) -> Any:
    try:
        return await asyncio.wait_for(response, timeout=timeout_s)
    except TimeoutError as e:
        response.cancel()
        raise timed_out(what, timeout_s) from e
    except Exception as e:
        err = _upstream_error(e, what)
        if err is None:
            raise
        raise err from e


async def next_item(gen: DeploymentResponseGenerator, deadline: float, what: str, timeout_s: float) -> Any:
    """The next streamed item before `deadline` (loop time); StopAsyncIteration at the end.

    `asyncio.timeout_at` rather than `wait_for`, which on Python 3.11 wraps every item in a task of its own:
    this runs once per streamed chunk of every stream the ingress relays."""
    try:
        async with asyncio.timeout_at(deadline):
            return await gen.__anext__()
    except StopAsyncIteration:
        raise
    except TimeoutError as e:
        gen.cancel()
        raise timed_out(what, timeout_s) from e
    except Exception as e:
        err = _upstream_error(e, what)
        if err is None:
            raise
        raise err from e


class OverloadGuard:
    """ASGI middleware: at most `limit` requests in this ingress replica; the rest get the JSON 503.

    Counted before the body is read, so slow clients count too. `/healthz` is exempt: a load balancer's
    probe must see whether the replica is up, not whether it is busy."""

    limit: ClassVar[int | None] = None  # set by Ingress.__init__ (one value per replica process)
    ongoing: ClassVar[int] = 0

    def __init__(self, app: ASGIApp):
        self.app = app

    @classmethod
    def configure(cls, limit: int, retry_after_s: int) -> None:
        global RETRY_AFTER_S
        cls.limit = limit
        RETRY_AFTER_S = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == "/healthz":
            await self.app(scope, receive, send)
            return
        cls = type(self)
        if cls.limit is not None and cls.ongoing >= cls.limit:
            await send_error(send, overloaded("ingress"))
            return
        cls.ongoing += 1
        try:
            await self.app(scope, receive, json_503s(send))
        finally:
            cls.ongoing -= 1


async def send_error(send: Send, err: APIError) -> None:
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error_headers(err) or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(err.body()).encode()})


def json_503s(send: Send) -> Send:
    """`send` that turns a plain-text 503 into the OpenAI one. Ray Serve registers its own FastAPI
    handler for its backpressure errors, and in the chat route under load (seen in the tests) its
    plain-text 503 won over ours; whatever path makes one, the client still gets the JSON error."""
    replaced = False

    async def send_or_replace(message: Message) -> None:
        nonlocal replaced
        if message["type"] == "http.response.start" and message["status"] == 503:
            content_type = dict(message.get("headers") or []).get(b"content-type", b"")
            if not bytes(content_type).startswith(b"application/json"):
                replaced = True
                await send_error(send, overloaded("model deployment"))
                return
        if replaced:
            return  # the plain-text body of the replaced response
        await send(message)

    return send_or_replace
