"""Pool lifecycle edges: lease handles, the close deadline, ``timeout=None``, error groups.

Against real nats-servers on 127.0.0.1, except where a fake dial (no I/O, virtual time)
is enough and says so.
"""

from __future__ import annotations

import os
import signal
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest
import trio

from trionats import _bridge
from trionats._config import PoolConfig
from trionats._connect import connect
from trionats._connection import Connection
from trionats._pool import open_pool
from trionats.testing import wait_for_connections

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from trionats._server import NatsServer


def _process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@asynccontextmanager
async def freezer(server: NatsServer) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Yields ``freeze()``: SIGSTOP the server (it then answers nothing); SIGCONT at exit."""
    assert server._process is not None
    pid = server._process.pid
    frozen = False

    async def freeze() -> None:
        nonlocal frozen
        assert server._process is not None
        server._process.send_signal(signal.SIGSTOP)
        frozen = True
        with trio.fail_after(5):  # bounded polling until the kernel has stopped it
            while _process_state(pid) != "T":  # noqa: ASYNC110
                await trio.sleep(0.001)

    try:
        yield freeze
    finally:
        if frozen and server._process is not None:
            server._process.send_signal(signal.SIGCONT)


# -- the close deadline ---------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc (Linux)")
async def test_closing_many_connections_to_a_frozen_server_takes_one_close_timeout(
    nats_server: NatsServer,
) -> None:
    close_timeout = 1.0
    margin = 1.0  # scheduling and the socket teardown after each bounded close
    n = 20
    config = PoolConfig(servers=[nats_server.url], idle_per_server=n, close_timeout=close_timeout)

    async def dial(url: str) -> Connection:
        # A reconnect buffer large enough to hold the backlog below without blocking.
        return await connect(url, close_timeout=close_timeout, pending_size=64 << 20)

    async with _bridge.loop_scope():
        async with freezer(nats_server) as freeze:
            async with open_pool(config, dial=dial) as pool:
                all_in = trio.Event()

                async def hold(task_status: trio.TaskStatus[None]) -> None:
                    async with pool.borrow(timeout=10) as nc:
                        await nc.flush(timeout=5)
                        task_status.started()
                        await all_in.wait()

                async with trio.open_nursery() as nursery:
                    for _ in range(n):
                        await nursery.start(hold)
                    all_in.set()
                assert pool.stats().idle == n
                await freeze()
                # Each connection gets more unsent data than the socket buffers of a frozen
                # peer take (a few MB on loopback), so its close waits to write it: every
                # close runs into its close_timeout.
                chunk = bytes(64 * 1024)
                for conn in pool._core.idle_connections(0):
                    for _ in range(128):  # 8 MB
                        await conn.publish("frozen.backlog", chunk)
                start = trio.current_time()
            elapsed = trio.current_time() - start
        # Thawed, the server reads the backlog and the sockets finish closing (the bridge
        # closes a hung transport gracefully: with the loop gone first it would leak).
        await wait_for_connections(nats_server, 0)
    assert pool.stats().closed.shutdown == n
    # one after the other they took n x close_timeout; together, one close_timeout in all
    assert elapsed < close_timeout + margin, elapsed
    assert elapsed >= close_timeout * 0.9, elapsed  # the closes did hang: the test bites
