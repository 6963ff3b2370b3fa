"""`LocalHandle`: a deployment's class run inside the calling replica, behind the part of Serve's handle API
the ingress uses, so `chat.placement: ingress` changes no caller.

    chat = LocalHandle(ChatDeployment.func_or_class(chat_cfg, safety_cfg, model), "ChatDeployment")
    gen = chat.options(stream=True).generate.remote(request)     # async iterator with .cancel()
    stats = await chat.stats.remote()                            # awaitable with .cancel()

Why: with the engine in its own deployment every request is a Ray call (routing, gRPC, the replica's request
wrapping) and every streamed chunk a message back, on top of the HTTP work. At 32 tiny-llm streams on 2 CPUs
the ingress process used 46 % of a core of the box's 170 %, most of it relaying chunks. Here a call is a plain
method call on the same event loop: `benchmarks/serve_load.py --configs continuous,in-ingress` measured 26 %
less CPU per token and 1.55x the tokens/s with two ingress replicas (README, Serving). The price is that
ingress replicas each hold a model: they scale with the chat load, and an image request shares the process
of a busy engine.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any


class LocalHandle:
    """`instance`'s methods, called the way a `DeploymentHandle` calls a deployment's."""

    def __init__(self, instance: Any, deployment_name: str):
        self.instance = instance
        self.deployment_name = deployment_name

    def options(self, **_: Any) -> LocalHandle:
        """Handle options (`stream=True`) need nothing here: a method that is an async generator streams."""
        return self

    def __getattr__(self, name: str) -> _LocalMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _LocalMethod(getattr(self.instance, name))


class _LocalMethod:
    def __init__(self, method: Any):
        self.method = method

    def remote(self, *args: Any, **kwargs: Any) -> LocalStream | LocalResponse:
        if inspect.isasyncgenfunction(self.method):
            return LocalStream(self.method(*args, **kwargs))
        return LocalResponse(self.method, args, kwargs)


class LocalStream:
    """An async generator's items, with `cancel()`: it is closed (its `finally` blocks run, so the row it
    streams is cancelled) as a Serve stream's replica call is cancelled."""

    def __init__(self, items: AsyncIterator[Any]):
        self._items = items
        self._closing: asyncio.Task[None] | None = None

    def __aiter__(self) -> LocalStream:
        return self

    async def __anext__(self) -> Any:
        return await self._items.__anext__()

    def cancel(self) -> None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())

    async def _close(self) -> None:
        try:
            await self._items.aclose()  # type: ignore[attr-defined]
        except RuntimeError:  # still running (an awaiting caller was cancelled): it ends by that cancel
            pass


class LocalResponse:
    """A method's result as an awaitable with `cancel()`, as `DeploymentResponse` is (a sync method runs
    when awaited; a coroutine method is awaited)."""

    def __init__(self, method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self._method, self._args, self._kwargs = method, args, kwargs

    def __await__(self):
        return self._result().__await__()

    async def _result(self) -> Any:
        result = self._method(*self._args, **self._kwargs)
        return await result if inspect.isawaitable(result) else result

    def cancel(self) -> None:
        """Nothing runs until awaited, and the awaiting task's own cancel stops it."""
