"""Order-preserving maps over a pool, with bounded look-ahead (the stage-1 prefetch and encoders)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Executor
from typing import Any, Callable, Iterable, Iterator


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], pool: Executor | None, lookahead: int) -> Iterator[Any]:
    """``map(fn, items)`` computed in ``pool`` (inline when None) with at most ``lookahead`` items
    in flight, results in input order. Closing the generator early cancels what has not started."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= lookahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()
