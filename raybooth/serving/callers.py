"""What a `@serve.batch` function knows of its callers: their argument, and whether they still wait.

    with attending(job) as caller:
        return await self.generate_batch(caller)   # the batch reads caller.item, checks caller.gone

A caller whose request is cancelled (the client disconnected, the ingress timed out) leaves the `with`
block, which marks it gone; a batch whose callers are gone stops working for them at its next step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(eq=False)
class Caller(Generic[T]):
    item: T
    gone: bool = False  # set when the caller stops waiting (and, harmlessly, when it got its answer)


@contextmanager
def attending(item: T) -> Iterator[Caller[T]]:
    caller = Caller(item)
    try:
        yield caller
    finally:
        caller.gone = True
