"""A request's items as a stage's domain service reads them: converted as read, run on a pool.

A stage's domain service checks counts, names and scalars before it reads any item, so that an
absurd request is refused in microseconds whoever sends it. Its servicer hands it the items as
a ``LazySequence``: the length is the message's, and no item is converted (tensors decoded,
detections built) until the service reads it, so that order holds over gRPC too. ``map_items``
reads each item on the worker thread that processes it, so that only the items in flight are
converted at any time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar, overload

from inferline.common.telemetry import in_context

T = TypeVar("T")


class LazySequence(Sequence[T]):
    """``convert(message)`` at each read, and nothing kept: a bytes field's value is a fresh
    copy at every access (upb), so a reader that needs the items twice makes a list once, and
    one that needs each once holds only those in flight.

    A converter that returns an exception instead of raising it (a tensor that fails to decode)
    fails that item alone; one that raises fails the read, as eager code would.
    """

    def __init__(self, messages: Sequence[Any], convert: Callable[[Any], T]):
        self._messages = messages
        self._convert = convert

    def __len__(self) -> int:
        return len(self._messages)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            return [self._convert(message) for message in self._messages[index]]
        return self._convert(self._messages[index])

    def __iter__(self) -> Iterator[T]:
        return (self._convert(message) for message in self._messages)


async def map_items(pool: Executor, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T | Exception]:
    """``fn(item)`` for every item on ``pool``, in order; an item that fails (being read or in
    ``fn``) gives its exception in its place. Spans and logs there keep the caller's request."""
    loop = asyncio.get_running_loop()

    def run(index: int) -> T:
        return fn(items[index])

    return await asyncio.gather(
        *(loop.run_in_executor(pool, in_context(run), index) for index in range(len(items))), return_exceptions=True
    )
