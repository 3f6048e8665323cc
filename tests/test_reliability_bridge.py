"""Closing a connection never lets an asyncio exception out, whatever nats-py's close does.

Uses a stand-in for the nats-py client (a fake, on purpose: the state that makes nats-py's
close raise asyncio.CancelledError, a stream torn down mid-reconnect, is a race that the
kill-and-restart scenario in test_reliability.py hit about once in six runs)."""

from __future__ import annotations

import asyncio

import trio
import trio_asyncio

from trionats import _bridge


class _ClientWhoseCloseIsCancelled:
    _transport = None

    async def close(self) -> None:
        raise asyncio.CancelledError  # what StreamWriter.wait_closed() raised


async def test_force_close_swallows_asyncio_cancelled() -> None:
    async with trio_asyncio.open_loop():
        start = trio.current_time()
        await _bridge.force_close(_ClientWhoseCloseIsCancelled(), 1.0)  # type: ignore[arg-type]
        assert trio.current_time() - start < 1.0
