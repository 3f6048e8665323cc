"""Bounded polling for tests, for conditions that depend on the server or on counters
with no event to wait on (never a bare sleep)."""

from __future__ import annotations

from collections.abc import Callable

import trio


async def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Return once ``predicate()`` is true; ``trio.TooSlowError`` after ``timeout`` s."""
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - the condition has no event to wait on
            await trio.sleep(0.005)
