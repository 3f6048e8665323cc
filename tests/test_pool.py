"""The pool against real nats-servers on 127.0.0.1 (plus a few fake-dial scenarios)."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from trionats._config import PoolConfig
from trionats._connection import Connection
from trionats._errors import LeaseExpiredError, PoolClosedError, PoolTimeoutError
from trionats._pool import BORROW_YIELD_EVERY, LeasedConnection, Pool, open_pool
from trionats._server import NatsServer, free_port


async def connz(server: NatsServer) -> int:
    """``num_connections`` from the server's /connz, with a minimal HTTP/1.0 GET."""
    assert server.monitor_port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", server.monitor_port)
    async with stream:
        await stream.send_all(b"GET /connz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        chunks = []
        while chunk := await stream.receive_some(65536):
            chunks.append(chunk)
    body = b"".join(chunks).split(b"\r\n\r\n", 1)[1]
    return int(json.loads(body)["num_connections"])


def pooled(nc: Connection) -> Connection:
    """The pooled connection behind a borrower's handle (each borrow gets its own handle)."""
    assert isinstance(nc, LeasedConnection)
    assert nc._borrow._conn is not None
    return nc._borrow._conn


async def wait_until(cond: Callable[[], object], timeout: float = 10.0) -> None:
    """Bounded polling: ``cond()`` must become true within ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not cond():  # noqa: ASYNC110 - bounded polling of external state
            await trio.sleep(0.01)


async def wait_connz(server: NatsServer, expected: int, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while await connz(server) != expected:  # noqa: ASYNC110 - bounded polling
            await trio.sleep(0.02)


async def test_reuse_keeps_connz_at_idle_size(nats_server: NatsServer) -> None:
    config = PoolConfig(servers=[nats_server.url], idle_per_server=4)
    done = 0
    seen: list[int] = []

    async with open_pool(config) as pool:

        async def worker() -> None:
            nonlocal done
            for _ in range(250):
                async with pool.borrow(timeout=5) as nc:
                    await nc.publish("pool.reuse", b"x")
                done += 1
                if done % 250 == 0:
                    seen.append(await connz(nats_server))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(worker)
        stats = pool.stats()
        assert done == 1000
        assert stats.created <= 4
        assert stats.reused + stats.created == 1000
        assert stats.reuse_rate >= 0.99
        assert stats.idle == stats.created
        assert stats.borrowed == 0
        assert await connz(nats_server) == stats.idle
        assert max(seen) <= 4
    await wait_connz(nats_server, 0)


async def test_dead_server_in_the_list(nats_server: NatsServer) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    config = PoolConfig(
        servers=[dead, nats_server.url], dial_timeout=2.0, backoff_min=30.0, backoff_max=60.0
    )
    async with open_pool(config, rng=random.Random(1)) as pool:
        holding = trio.Event()
        release = trio.Event()
        count = 0

        async def hold() -> None:
            nonlocal count
            async with pool.borrow(timeout=10) as nc:
                await nc.flush()
                count += 1
                if count == 10:
                    holding.set()
                await release.wait()

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(hold)
            await holding.wait()
            stats = pool.stats()
            release.set()
        dead_stats, live_stats = stats.servers
        assert stats.dial_failures >= 1
        assert dead_stats.in_backoff
        assert dead_stats.next_retry_at is not None
        assert dead_stats.borrowed == dead_stats.idle == 0
        assert live_stats.borrowed == 10
        assert stats.timeouts == 0


async def test_all_servers_dead_times_out() -> None:
    config = PoolConfig(servers=[f"127.0.0.1:{free_port()}"], backoff_min=5.0, backoff_max=5.0)
    async with open_pool(config) as pool:
        with pytest.raises(PoolTimeoutError, match="last dial error") as info:
            async with pool.borrow(timeout=1.0):
                pass  # pragma: no cover
        assert info.value.__cause__ is not None
        stats = pool.stats()
        assert stats.timeouts == 1
        assert stats.dial_failures == 1
        assert stats.servers[0].in_backoff


async def test_restart_while_idle(nats_server: NatsServer) -> None:
    config = PoolConfig(servers=[nats_server.url], idle_per_server=2)
    async with open_pool(config) as pool:
        async with pool.borrow() as a, pool.borrow() as b:
            assert pooled(a) is not pooled(b)
        assert pool.stats().idle == 2
        idle = pool._core.idle_connections(0)
        await nats_server.stop()
        await wait_until(lambda: not any(c.is_connected for c in idle))
        await nats_server.start()
        for _ in range(3):
            async with pool.borrow(timeout=10) as nc:
                assert nc.is_connected
                await nc.publish("after.restart", b"x")
                await nc.flush(timeout=5)
        stats = pool.stats()
        assert stats.borrowed == 0
        assert stats.closed.unhealthy + stats.reused >= 1


async def test_cancel_while_waiting_leaves_no_slot(nats_server: NatsServer) -> None:
    config = PoolConfig(servers=[nats_server.url], max_per_server=1)
    async with open_pool(config) as pool:
        async with pool.borrow() as held_handle:
            held = pooled(held_handle)
            with trio.CancelScope() as scope:

                async def cancel_when_queued() -> None:
                    await wait_until(lambda: pool.stats().waiting == 1)
                    scope.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel_when_queued)
                    async with pool.borrow(timeout=30):
                        pytest.fail("got a second connection past max_per_server")
            assert scope.cancelled_caught
            stats = pool.stats()
            assert stats.waiting == 0
            assert stats.waits == 1
            assert stats.borrowed == 1
        # the slot is free: the next borrow gets the same connection at once
        with trio.fail_after(2):
            async with pool.borrow() as nc:
                assert pooled(nc) is held
        assert pool.stats().created == 1


async def test_cancel_during_dial_and_during_use(nats_server: NatsServer) -> None:
    config = PoolConfig(servers=[nats_server.url])
    async with open_pool(config) as pool:
        with trio.move_on_after(0.001):
            async with pool.borrow():
                await trio.sleep_forever()
        stats = pool.stats()
        assert stats.dialing == 0
        assert stats.borrowed == 0
        # cancelled mid-request: the connection is healthy and reused
        async with pool.borrow() as nc, nc.subscribe("never.answers"):
            with trio.move_on_after(0.2) as scope:
                async with pool.borrow() as nc2:
                    conn2 = pooled(nc2)
                    await nc2.request("never.answers", b"?", timeout=30)
            assert scope.cancelled_caught
            async with pool.borrow() as nc3:
                assert pooled(nc3) is conn2
                await nc3.flush()
        stats = pool.stats()
        assert stats.closed.unhealthy == 0
        assert stats.borrowed == 0
    await wait_connz(nats_server, 0)


async def test_error_from_the_connection_closes_it(nats_server: NatsServer) -> None:
    from trionats._errors import ConnectionClosedError

    config = PoolConfig(servers=[nats_server.url])
    async with open_pool(config) as pool:

        async def use_closed() -> None:
            async with pool.borrow() as nc:
                await nc.aclose()
                await nc.publish("x.y", b"")

        with pytest.raises(ConnectionClosedError):
            await use_closed()
        conns: list[Connection] = []

        async def user_error() -> None:
            async with pool.borrow() as nc2:
                conns.append(pooled(nc2))
                raise ValueError("user error")

        with pytest.raises(ValueError, match="user"):
            await user_error()
        conn2 = conns[0]
        stats = pool.stats()
        assert stats.closed.unhealthy == 1
        assert stats.idle == 1
        async with pool.borrow() as nc3:
            assert pooled(nc3) is conn2


async def test_leak_is_reported_with_task_and_stack(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trionats.pool")
    config = PoolConfig(servers=[nats_server.url], leak_timeout=0.2)
    async with open_pool(config) as pool:
        async with pool.borrow():
            await wait_until(lambda: pool.stats().leaks_detected == 1)
            assert pool.stats().borrowed == 1
        messages = [r.getMessage() for r in caplog.records if r.name == "trionats.pool"]
        assert len(messages) == 2
        assert "held for" in messages[0]
        assert "test_leak_is_reported_with_task_and_stack" in messages[0]
        assert "async with pool.borrow():" in messages[0]
        assert "returned after" in messages[1]
        assert pool.stats().idle == 1


async def test_leak_cancel_raises_lease_expired_and_reclaims(nats_server: NatsServer) -> None:
    config = PoolConfig(servers=[nats_server.url], leak_timeout=0.2, leak_action="cancel")
    async with open_pool(config) as pool:
        with pytest.raises(LeaseExpiredError):
            async with pool.borrow():
                await trio.sleep_forever()
        stats = pool.stats()
        assert stats.leaks_detected == 1
        assert stats.borrowed == 0
        assert stats.idle == 1


@pytest.mark.parametrize("leak_action", ["cancel", "report"])
async def test_shutdown_with_borrowed_connections(
    nats_server: NatsServer, leak_action: str
) -> None:
    from trionats._errors import ConnectionClosedError

    config = PoolConfig(
        servers=[nats_server.url],
        close_timeout=0.3,
        leak_action=leak_action,  # type: ignore[arg-type]
    )
    outcome: list[str] = []
    got = trio.Event()
    polite_out = trio.Event()

    async def stubborn(pool: Pool[Any]) -> None:
        try:
            async with pool.borrow() as nc:
                got.set()
                while True:  # uses the connection until something stops it
                    # (publish, not flush: a flush in flight when the connection is closed
                    # under it waits for its own timeout, see the report of issue 4)
                    await nc.publish("stubborn.work", b"x")
                    await trio.sleep(0.01)
        except PoolClosedError:
            outcome.append("stubborn: PoolClosedError")  # cancelled by the pool
        except ConnectionClosedError:
            outcome.append("stubborn: ConnectionClosedError")  # closed under it

    async def polite(pool: Pool[Any]) -> None:
        async with pool.borrow():
            polite_out.set()
            await wait_until(lambda: pool.stats().closing)
        outcome.append("polite: returned")

    async with trio.open_nursery() as outer:
        async with open_pool(config) as pool:
            outer.start_soon(stubborn, pool)
            await got.wait()
            outer.start_soon(polite, pool)
            await polite_out.wait()
            assert await connz(nats_server) == 2
        stats = pool.stats()
        assert stats.borrowed == 0
        assert stats.closed.shutdown == 2
        with pytest.raises(PoolClosedError):
            async with pool.borrow():
                pass  # pragma: no cover
    expected = "PoolClosedError" if leak_action == "cancel" else "ConnectionClosedError"
    assert sorted(outcome) == ["polite: returned", f"stubborn: {expected}"]
    await wait_connz(nats_server, 0)


async def test_exception_in_block_is_not_wrapped(nats_server: NatsServer) -> None:
    with pytest.raises(KeyError):
        async with open_pool(PoolConfig(servers=[nats_server.url])):
            raise KeyError("mine")


# -- fake-dial scenarios with exact virtual times ------------------------------------------


class _Conn:
    def __init__(self) -> None:
        self.is_connected = True
        self.is_closed = False
        self.is_draining = False

    async def aclose(self) -> None:
        self.is_closed = True
        self.is_connected = False
        await trio.lowlevel.checkpoint()


async def test_backoff_and_maxlife_virtual_times(autojump_clock: trio.testing.MockClock) -> None:
    attempts: list[float] = []
    fail = [True, True, True, False]

    async def dial(url: str) -> _Conn:
        attempts.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        if fail.pop(0):
            raise OSError("refused")
        return _Conn()

    class Top(random.Random):
        def random(self) -> float:
            return 1.0

        def uniform(self, a: float, b: float) -> float:
            return b

    config = PoolConfig(
        servers=["a:1"], backoff_min=1.0, backoff_max=30.0, max_life=100.0, max_life_jitter=0.1
    )
    async with open_pool(config, dial=dial, rng=Top()) as pool:
        start = trio.current_time()
        async with pool.borrow(timeout=None) as conn:
            pass
        # ceilings 2, 4, 8 (doubling once per failure) at the top of the jitter
        assert [t - start for t in attempts] == [0.0, 2.0, 6.0, 14.0]
        assert pool.stats().idle == 1
        born = attempts[-1]
        await trio.sleep(110.0 - (trio.current_time() - born) - 0.001)
        assert pool.stats().idle == 1
        await trio.sleep(0.002)  # MaxLife is 100 * 1.1 from birth
        assert pool.stats().idle == 0
        assert pool.stats().closed.expired == 1
        assert conn.is_closed


async def test_borrow_checkpoints_and_is_cancellable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def dial(url: str) -> _Conn:
        await trio.sleep(1)
        return _Conn()

    config = PoolConfig(servers=["a:1"], max_per_server=1)
    async with open_pool(config, dial=dial) as pool:
        with trio.testing.assert_checkpoints():
            async with pool.borrow():
                pass
        with trio.testing.assert_checkpoints():  # idle hits: a full yield in N of them
            for _ in range(BORROW_YIELD_EVERY):
                async with pool.borrow():
                    pass
        with trio.CancelScope() as scope:
            scope.cancel()
            async with pool.borrow():
                pytest.fail("a cancelled borrow must not enter")  # pragma: no cover
        assert pool.stats().borrowed == 0
        assert pool.stats().idle == 1


async def test_long_lived_lease_is_never_a_leak(autojump_clock: trio.testing.MockClock) -> None:
    async def dial(url: str) -> _Conn:
        await trio.lowlevel.checkpoint()
        return _Conn()

    config = PoolConfig(servers=["a:1"], leak_timeout=5.0, leak_action="cancel")
    async with open_pool(config, dial=dial) as pool:
        async with pool.borrow(long_lived=True):
            await trio.sleep(60)  # 12 leak timeouts, virtual time
        assert pool.stats().leaks_detected == 0
        with pytest.raises(LeaseExpiredError):
            async with pool.borrow():
                await trio.sleep(60)
        assert pool.stats().leaks_detected == 1
