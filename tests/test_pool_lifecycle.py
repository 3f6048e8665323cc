"""Pool lifecycle edges: lease handles, the close deadline, ``timeout=None``, error groups.

Against real nats-servers on 127.0.0.1, except where a fake dial (no I/O, virtual time)
is enough and says so.
"""

from __future__ import annotations

import inspect
import math
import os
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from trionats import _bridge
from trionats._config import PoolConfig
from trionats._connect import connect
from trionats._connection import Connection
from trionats._errors import ConnectionClosedError, PoolTimeoutError
from trionats._pool import LeasedConnection, open_pool
from trionats._subscriber import open_subscriber
from trionats.testing import wait_for_connections

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from trionats._msg import Msg
    from trionats._server import NatsServer

LEASE_ENDED = r"lease has ended \(borrow block exited\)"


@asynccontextmanager
async def freezer(server: NatsServer) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Yields ``freeze()`` (the harness's ``server.freeze``); the server thawed at exit."""
    try:
        yield server.freeze
    finally:
        with trio.CancelScope(shield=True):
            await server.thaw()


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


# -- a lease ends with its block --------------------------------------------------------


def _public_names() -> list[str]:
    return sorted(name for name in dir(Connection) if not name.startswith("_"))


async def test_every_public_name_of_connection_is_forwarded_by_the_handle(
    nats_server: NatsServer,
) -> None:
    names = _public_names()
    assert {"publish", "request", "subscribe", "flush", "drain", "stats", "events"} <= set(names)
    for name in names:
        # generated on the handle's class, not merely inherited from Connection (an
        # inherited method would run Connection's code on the empty handle)
        assert name in vars(LeasedConnection), name
    async with open_pool(PoolConfig(servers=[nats_server.url])) as pool:
        async with pool.borrow(timeout=10) as nc:
            assert isinstance(nc, Connection)
            real = nc._borrow._conn  # type: ignore[attr-defined]
            assert type(real) is Connection
            for name in names:
                mine, theirs = getattr(nc, name), getattr(real, name)
                assert mine == theirs, name  # a method: the connection's own, bound to it
                if inspect.ismethod(theirs):
                    assert mine.__self__ is real, name
            assert nc.name == real.name  # instance attributes too
            assert "leased" in repr(nc)
        assert repr(nc) == "<trionats.Connection lease ended>"
        for name in names:
            with pytest.raises(ConnectionClosedError, match=LEASE_ENDED):  # noqa: PT012
                attr = getattr(nc, name)  # a property raises here,
                attr()  # a method when called, whatever its arguments


async def test_a_stale_handle_raises_even_while_its_connection_is_lent_again(
    nats_server: NatsServer,
) -> None:
    config = PoolConfig(servers=[nats_server.url], max_per_server=1)
    async with open_pool(config) as pool:
        async with pool.borrow(timeout=10) as old:
            await old.flush(timeout=5)
            assert not vars(old)  # nothing cached in the handle: it holds one slot
        async with pool.borrow(timeout=10) as new, new.subscribe("lease.echo") as sub:
            assert pool.stats().created == 1  # the same connection, lent again
            with pytest.raises(ConnectionClosedError, match=LEASE_ENDED):
                await old.publish("lease.echo", b"stale")
            with pytest.raises(ConnectionClosedError, match=LEASE_ENDED):
                await old.request("lease.echo", b"stale", timeout=1)
            with pytest.raises(ConnectionClosedError, match=LEASE_ENDED):
                async with old.subscribe("lease.other"):
                    pass  # pragma: no cover
            with pytest.raises(ConnectionClosedError, match=LEASE_ENDED):
                await old.flush(timeout=1)  # a method used during the lease too
            with pytest.raises(ConnectionClosedError, match=LEASE_ENDED):
                old.stats()
            with pytest.raises(ConnectionClosedError, match=LEASE_ENDED):
                old.name = "x"
            await new.publish("lease.echo", b"fresh")
            with trio.fail_after(5):
                assert (await sub.next_msg()).data == b"fresh"
            assert new.stats().out_msgs == 1  # nothing stale went out
            assert new.is_connected
        stats = pool.stats()
        assert stats.idle == 1
        assert stats.closed.unhealthy == 0


async def test_a_handle_is_accepted_where_a_connection_is(nats_server: NatsServer) -> None:
    async def upper(msg: Msg) -> bytes:
        return msg.data.upper()

    async with (
        open_pool(PoolConfig(servers=[nats_server.url])) as pool,
        pool.borrow(timeout=10) as nc,
    ):
        async with open_subscriber(nc) as subscriber:
            await subscriber.start("lease.upper", upper)
            reply = await nc.request("lease.upper", b"abc", timeout=5)
        assert reply.data == b"ABC"
        assert subscriber.stats().processed == 1


# -- timeout=None: no deadline of its own (fake dial: pure pool logic, virtual time) --------


class _FakeConn:
    def __init__(self) -> None:
        self.is_connected = True
        self.is_closed = False
        self.is_draining = False

    async def aclose(self) -> None:
        self.is_closed = True
        await trio.lowlevel.checkpoint()


async def _fake_dial(url: str) -> _FakeConn:
    await trio.lowlevel.checkpoint()
    return _FakeConn()


async def test_borrow_timeout_none_waits_as_long_as_the_enclosing_scope(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = PoolConfig(servers=["a:1"], max_per_server=1)
    async with open_pool(config, dial=_fake_dial) as pool, pool.borrow():
        start = trio.current_time()
        with trio.move_on_after(10_000) as scope:  # 1,000 x the default timeout
            async with pool.borrow(timeout=None):
                pytest.fail("got a second connection past max_per_server")  # pragma: no cover
        assert scope.cancelled_caught  # cancelled by the enclosing scope, not timed out
        assert trio.current_time() - start == pytest.approx(10_000)
        assert pool.stats().timeouts == 0
        assert pool.stats().waiting == 0
        start = trio.current_time()
        with pytest.raises(PoolTimeoutError):
            async with pool.borrow():  # the default: 10 s
                pass  # pragma: no cover
        assert trio.current_time() - start == pytest.approx(10.0)
        assert pool.stats().timeouts == 1


async def test_borrow_timeout_is_validated_with_the_shared_rules(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_pool(PoolConfig(servers=["a:1"]), dial=_fake_dial) as pool:
        wrong_types: list[object] = ["1", True, [1]]
        for wrong in wrong_types:
            with pytest.raises(TypeError, match=r"timeout must be a number of seconds or None"):
                pool.borrow(timeout=wrong)  # type: ignore[arg-type]
        for value in (0, -1, math.nan, math.inf):
            with pytest.raises(ValueError, match=r"timeout must be a finite number"):
                pool.borrow(timeout=value)


async def test_a_pool_timeout_inside_a_block_does_not_poison_its_connection(
    nats_server: NatsServer,
) -> None:
    config = PoolConfig(servers=[nats_server.url], max_per_server=1)
    async with open_pool(config) as pool:

        async def borrow_twice() -> None:
            async with pool.borrow(timeout=10) as nc:
                await nc.flush(timeout=5)
                async with pool.borrow(timeout=0.05):  # the only slot is ours
                    pass  # pragma: no cover

        with pytest.raises(PoolTimeoutError) as info:
            await borrow_twice()
        assert isinstance(info.value, OSError)  # a builtin TimeoutError is an OSError...
        stats = pool.stats()
        assert stats.closed.unhealthy == 0  # ...but it says nothing about the connection
        assert stats.idle == 1
        assert stats.timeouts == 1


# -- error groups: only our own nursery's level is unwrapped -------------------------------


async def test_a_users_exception_group_comes_out_of_open_pool_intact(
    nats_server: NatsServer,
) -> None:
    async def user_group(fake: bool) -> None:
        if fake:
            async with open_pool(PoolConfig(servers=["a:1"]), dial=_fake_dial):
                raise mine
        async with open_pool(PoolConfig(servers=[nats_server.url])):
            raise mine

    for fake in (False, True):
        mine = ExceptionGroup("mine", [ValueError("only one")])
        with pytest.raises(ExceptionGroup) as info:
            await user_group(fake)
        got = info.value
        # trio re-derives a group that crosses a cancelled scope (a copy, same type,
        # message and members); what matters is that none of its levels was stripped
        assert type(got) is ExceptionGroup
        assert got.message == "mine"
        assert got.exceptions == mine.exceptions  # the very same ValueError
        assert got.exceptions[0] is mine.exceptions[0]
    # a plain exception comes out plain, not in a group our nursery made
    with pytest.raises(KeyError):
        async with open_pool(PoolConfig(servers=["a:1"]), dial=_fake_dial):
            raise KeyError("plain")
