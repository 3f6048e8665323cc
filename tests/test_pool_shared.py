"""Shared (multiplexed) pool leases: ``pool.borrow(shared=True)``."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import trio
import trio.testing
from test_cancellation import cancel_at_every_checkpoint
from test_pool import pooled

from property_tests.fakes import FakeConn, FakeNetwork, is_healthy
from trionats._config import PoolConfig
from trionats._errors import (
    ConnectionClosedError,
    LeaseExpiredError,
    PoolClosedError,
)
from trionats._pool import BORROW_YIELD_EVERY, LeasedConnection, open_pool
from trionats._pool_core import CloseReason, DialTicket, Lease, PoolCore, Waiter
from trionats._server import NatsServer

URL = "nats://127.0.0.1:4222"


def core_with(**options: Any) -> tuple[PoolCore[FakeConn], FakeNetwork]:
    return PoolCore(PoolConfig(servers=[URL], **options), is_healthy=is_healthy), FakeNetwork()


def dial_into(
    core: PoolCore[FakeConn], net: FakeNetwork, ticket: Any, now: float
) -> Lease[FakeConn]:
    assert isinstance(ticket, DialTicket)
    conn = FakeConn(URL, net, now)
    lease = core.dial_succeeded(ticket, conn, now)
    assert lease is not None
    return lease


# -- the core, directly ---------------------------------------------------------------------
def test_core_least_loaded_under_a_cap() -> None:
    core, net = core_with(shared_leases_per_connection=3)
    a1 = dial_into(core, net, core.request(0.0, shared=True), 0.0)
    a2, a3 = (core.request(0.0, shared=True) for _ in range(2))
    assert isinstance(a2, Lease)
    assert isinstance(a3, Lease)
    assert a2.conn is a1.conn is a3.conn  # one connection until the cap
    b1 = dial_into(core, net, core.request(0.0, shared=True), 0.0)  # A full: a second one
    assert b1.conn is not a1.conn
    core.release(a2, 0.0)
    core.release(a3, 0.0)  # A: 1, B: 1 (tie: the one that lives longest)
    nxt = core.request(0.0, shared=True)
    assert isinstance(nxt, Lease)
    assert nxt.conn is max((a1, b1), key=lambda le: le.expires_at).conn
    other = b1 if nxt.conn is a1.conn else a1
    again = core.request(0.0, shared=True)  # 2 vs 1: the less loaded one
    assert isinstance(again, Lease)
    assert again.conn is other.conn
    stats = core.stats(0.0)
    assert (stats.shared, stats.shared_leases, stats.borrowed) == (2, 4, 0)
    assert [s.shared_leases for s in stats.servers] == [4]
    core.check()


def test_core_concurrent_shared_borrowers_wait_for_one_dial() -> None:
    core, net = core_with()
    ticket = core.request(0.0, shared=True)
    waiters = [core.request(0.0, shared=True) for _ in range(5)]
    assert all(isinstance(w, Waiter) for w in waiters)
    assert core.dialing == 1
    first = dial_into(core, net, ticket, 0.0)
    assert len(core.to_wake) == 5
    for waiter in core.to_wake:
        assert isinstance(waiter.grant, Lease)
        assert waiter.grant.conn is first.conn
    core.to_wake.clear()
    assert core.stats(0.0).created == 1
    core.check()


def test_core_exclusive_never_gets_a_shared_connection() -> None:
    core, net = core_with(max_per_server=1)
    lease = dial_into(core, net, core.request(0.0, shared=True), 0.0)
    waiter = core.request(0.0)  # the only slot is in shared service
    assert isinstance(waiter, Waiter)
    more = core.request(0.0, shared=True)  # shared borrowers still join it
    assert isinstance(more, Lease)
    assert more.conn is lease.conn
    core.release(more, 0.0)
    assert core.waiting == 1
    core.release(lease, 0.0)  # the last shared lease: the connection is free again
    assert core.waiting == 0
    assert isinstance(waiter.grant, Lease)
    assert waiter.grant.conn is lease.conn
    assert not waiter.grant.shared
    core.check()


def test_core_maxlife_and_suspect_retire_then_close_on_last_return() -> None:
    core, net = core_with(max_life=10.0, max_life_jitter=0.0)
    a = dial_into(core, net, core.request(0.0, shared=True), 0.0)
    b = core.request(1.0, shared=True)
    assert isinstance(b, Lease)
    core.tick(10.0)  # past MaxLife: retired, not closed
    assert not core.to_close
    assert core.shared_connections() == [(a.conn, 2, CloseReason.EXPIRED)]
    c = core.request(10.0, shared=True)  # no new lease on it: a new connection
    assert isinstance(c, DialTicket)
    core.release(a, 10.0)
    assert not core.to_close
    core.release(b, 11.0)
    assert core.to_close == [(a.conn, CloseReason.EXPIRED)]
    core.to_close.clear()
    # a suspect return retires the connection for the others
    d = dial_into(core, net, c, 11.0)
    e = core.request(11.0, shared=True)
    assert isinstance(e, Lease)
    assert e.conn is d.conn
    core.release(d, 11.0, suspect=True)
    assert not core.to_close
    assert core.shared_connections() == [(d.conn, 1, CloseReason.UNHEALTHY)]
    assert isinstance(core.request(11.0, shared=True), DialTicket)
    core.release(e, 11.0)
    assert core.to_close == [(d.conn, CloseReason.UNHEALTHY)]
    stats = core.stats(11.0)
    assert (stats.closed.expired, stats.closed.unhealthy) == (1, 1)


def test_core_unhealthy_shared_connection_is_dropped_from_the_shared_set() -> None:
    core, net = core_with()
    a = dial_into(core, net, core.request(0.0, shared=True), 0.0)
    a.conn.broken = True
    assert core.share_now(0.0) is None  # the hot path never hands out a broken one
    assert isinstance(core.request(0.0, shared=True), DialTicket)
    assert core.shared_connections() == [(a.conn, 1, CloseReason.UNHEALTHY)]
    core.release(a, 0.0)
    assert core.to_close == [(a.conn, CloseReason.UNHEALTHY)]


# -- the async pool with fake connections ---------------------------------------------------
async def test_hundred_shared_borrowers_one_dial(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNetwork()
    net.dial_time[URL] = 0.5
    seen: set[int] = set()
    async with open_pool(PoolConfig(servers=[URL]), dial=net.dial) as pool:

        async def worker() -> None:
            for _ in range(3):
                async with pool.borrow(shared=True) as conn:
                    seen.add(conn.id)
                    await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(worker)
        stats = pool.stats()
        assert net.dials == 1
        assert len(seen) == 1
        assert stats.shared_borrows == 300
        assert stats.shared_leases == 0
        assert stats.idle == 1  # the last lease out: back to the idle list
    assert all(c.closed for c in net.conns)


async def test_shared_borrow_schedule_point_every_n(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNetwork()
    async with open_pool(PoolConfig(servers=[URL]), dial=net.dial) as pool:
        async with pool.borrow(shared=True):
            with trio.testing.assert_checkpoints():  # at least one full yield in N
                for _ in range(BORROW_YIELD_EVERY):
                    async with pool.borrow(shared=True):
                        pass
            with trio.CancelScope() as scope:
                scope.cancel()
                async with pool.borrow(shared=True):  # the hot path checks for a cancel
                    pytest.fail("a cancelled shared borrow must not enter")  # pragma: no cover
        assert pool.stats().shared_leases == 0


@pytest.mark.parametrize("situation", ["hot", "idle", "dial", "wait"])
async def test_shared_borrow_cancelled_at_every_checkpoint(
    situation: str, autojump_clock: trio.testing.MockClock
) -> None:
    net = FakeNetwork()
    net.dial_time[URL] = 1.0
    config = PoolConfig(servers=[URL], max_per_server=1)
    async with open_pool(config, dial=net.dial) as pool:
        holder = trio.Event()
        release = trio.Event()

        async def hold(shared: bool) -> None:
            async with pool.borrow(shared=shared):
                holder.set()
                await release.wait()

        async def operation() -> None:
            if situation == "wait":  # the only slot is lent out exclusively for 1 s
                lent = trio.Event()

                async def exclusive() -> None:
                    async with pool.borrow():
                        lent.set()
                        await trio.sleep(1)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(exclusive)
                    await lent.wait()
                    async with pool.borrow(shared=True) as conn:
                        assert not conn.closed
                return
            async with pool.borrow(shared=True) as conn:
                assert not conn.closed

        async def check() -> None:
            stats = pool.stats()
            assert stats.waiting == 0
            assert stats.dialing == 0
            assert stats.shared_leases == (1 if situation == "hot" else 0)
            assert stats.borrowed == 0
            assert stats.idle + stats.shared + stats.borrowed <= 1
            pool._core.check()

        async with trio.open_nursery() as nursery:
            if situation == "hot":  # a shared connection with room
                nursery.start_soon(hold, True)
                await holder.wait()
            elif situation == "idle":
                async with pool.borrow():
                    pass
            points = await cancel_at_every_checkpoint(operation, check)
            release.set()
        assert points >= (1 if situation in ("hot", "idle") else 2)
        pool._core.check()
    assert all(c.closed for c in net.conns)


async def test_leak_detection_per_shared_lease(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    net = FakeNetwork()
    config = PoolConfig(servers=[URL], leak_timeout=5.0, leak_action="cancel")
    outcomes: list[str] = []
    async with open_pool(config, dial=net.dial) as pool:

        async def short() -> None:
            for _ in range(20):
                async with pool.borrow(shared=True):
                    await trio.sleep(1)
            outcomes.append("short: ok")

        async def stubborn() -> None:
            try:
                async with pool.borrow(shared=True):
                    await trio.sleep(60)
            except LeaseExpiredError:
                outcomes.append("stubborn: LeaseExpiredError")

        with caplog.at_level(logging.WARNING, logger="trionats.pool"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(short)
                nursery.start_soon(stubborn, name="the-stubborn-one")
        assert sorted(outcomes) == ["short: ok", "stubborn: LeaseExpiredError"]
        stats = pool.stats()
        assert stats.leaks_detected == 1
        assert stats.created == 1
        assert stats.closed.total == 0  # the connection outlived the cancelled lease
    text = caplog.text
    assert "shared connection lease" in text
    assert "the-stubborn-one" in text
    assert "test_pool_shared.py" in text  # the stack where it was borrowed


async def test_maxlife_never_closes_under_an_open_shared_lease(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNetwork()
    config = PoolConfig(servers=[URL], max_life=10.0, max_life_jitter=0.0)
    async with open_pool(config, dial=net.dial) as pool:
        async with pool.borrow(shared=True) as first:
            await trio.sleep(15)  # past its life, still lent
            assert not first.closed
            async with pool.borrow(shared=True) as second:  # a new connection
                assert second is not first
            assert not first.closed
        await trio.testing.wait_all_tasks_blocked()
        assert first.closed
        assert pool.stats().closed.expired == 1


async def test_shutdown_cancels_shared_holders(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNetwork()
    config = PoolConfig(servers=[URL], leak_action="cancel", close_timeout=1.0)
    outcomes: list[str] = []

    async def stubborn(pool: Any, task_status: trio.TaskStatus[None]) -> None:
        try:
            async with pool.borrow(shared=True):
                task_status.started()
                await trio.sleep_forever()
        except PoolClosedError:
            outcomes.append("closed")

    async with trio.open_nursery() as nursery, open_pool(config, dial=net.dial) as pool:
        for _ in range(3):
            await nursery.start(stubborn, pool)
        assert pool.stats().shared_leases == 3
    assert outcomes == ["closed"] * 3
    assert len(net.conns) == 1
    assert net.conns[0].closed


def test_bad_shared_argument() -> None:
    async def main() -> None:
        async with open_pool(PoolConfig(servers=[URL]), dial=FakeNetwork().dial) as pool:
            with pytest.raises(TypeError, match="shared"):
                pool.borrow(shared="yes")  # type: ignore[arg-type]

    trio.run(main)
    with pytest.raises(ValueError, match="shared_leases_per_connection"):
        PoolConfig(servers=[URL], shared_leases_per_connection=0)
    with pytest.raises(TypeError, match="shared_leases_per_connection"):
        PoolConfig(servers=[URL], shared_leases_per_connection=2.5)  # type: ignore[arg-type]


# -- a real server ----------------------------------------------------------------------------
async def test_shared_leases_on_a_real_server(nats_server: NatsServer) -> None:
    config = PoolConfig(servers=[nats_server.url])
    async with open_pool(config) as pool:
        async with pool.borrow(shared=True) as sub_nc, sub_nc.subscribe("echo.>") as sub:

            async def respond() -> None:
                async for msg in sub:
                    await msg.respond(msg.data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(respond)
                replies: list[bytes] = []

                async def requester(i: int) -> None:
                    async with pool.borrow(shared=True) as nc:
                        assert pooled(nc) is pooled(sub_nc)
                        reply = await nc.request(f"echo.{i}", b"%d" % i, timeout=5)
                        replies.append(reply.data)

                async with trio.open_nursery() as inner:
                    for i in range(50):
                        inner.start_soon(requester, i)
                assert sorted(replies) == sorted(b"%d" % i for i in range(50))
                stats = pool.stats()
                assert (stats.created, stats.shared, stats.shared_leases) == (1, 1, 1)
                nursery.cancel_scope.cancel()
        kept: list[LeasedConnection] = []
        async with pool.borrow(shared=True) as nc:
            kept.append(nc)  # type: ignore[arg-type]
        with pytest.raises(ConnectionClosedError, match="lease has ended"):
            await kept[0].publish("after.the.lease", b"x")
        assert pool.stats().shared_leases == 0


async def test_shared_dial_failure_backs_off(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNetwork()
    net.down.add(URL)
    config = PoolConfig(servers=[URL], backoff_min=1.0, backoff_max=1.0)
    async with open_pool(config, dial=net.dial) as pool:

        async def heal() -> None:
            await trio.sleep(2.5)
            net.down.clear()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(heal)
            async with pool.borrow(shared=True, timeout=30) as conn:
                assert not conn.closed
        stats = pool.stats()
        assert stats.dial_failures >= 2
        assert stats.created == 1


async def test_borrow_timeout_checks_on_the_fast_path(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNetwork()
    async with open_pool(PoolConfig(servers=[URL]), dial=net.dial) as pool:
        for timeout in (5, 5.0, 0.5, 2**60, 1e300):  # ints and floats, in range or not
            async with pool.borrow(timeout=timeout, shared=True):
                pass
            async with pool.borrow(timeout=timeout):
                pass
        bad: list[tuple[object, type[Exception]]] = [
            (True, TypeError),  # a bool is not a number of seconds
            (False, TypeError),
            (0, ValueError),
            (-1, ValueError),
            (0.0, ValueError),
            (math.inf, ValueError),
            (math.nan, ValueError),
            ("1", TypeError),
        ]
        for timeout, exc in bad:
            with pytest.raises(exc, match="timeout"):
                pool.borrow(timeout=timeout, shared=True)  # type: ignore[arg-type]
        pool._core.check()


def _borrow_in_a_helper(pool: Any) -> Any:
    return pool.borrow(shared=True)  # the borrow site the leak report shows


async def test_leak_report_of_a_borrow_made_outside_the_holding_coroutine(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # The holder's task is found by the frame that called borrow(); a helper's frame is
    # gone by then: the report still names the borrow site and says the task is unknown.
    net = FakeNetwork()
    config = PoolConfig(servers=[URL], leak_timeout=5.0)
    with caplog.at_level(logging.WARNING, logger="trionats.pool"):
        async with open_pool(config, dial=net.dial) as pool:
            # the first lease keeps the connection in shared service
            async with pool.borrow(shared=True), _borrow_in_a_helper(pool):
                await trio.sleep(6)
            assert pool.stats().leaks_detected == 2
    text = caplog.text
    assert "the borrow site the leak report shows" in text
    assert "a task that no longer runs the borrow block" in text
    assert "test_leak_report_of_a_borrow_made_outside_the_holding_coroutine" in text


def test_core_share_into_a_record_of_the_callers() -> None:
    class Record(Lease[FakeConn]):
        pass

    core, net = core_with()
    first = dial_into(core, net, core.request(0.0, shared=True), 0.0)
    record = Record.__new__(Record)
    record.holder = "me"
    assert core.share_into(1.0, record)
    assert (record.conn, record.borrowed_at, record.shared, record.reused) == (
        first.conn,
        1.0,
        True,
        True,
    )
    assert record in core.leases()
    core.check()
    assert core.unshare_now(record)
    assert not core.unshare_now(first)  # the last lease: release() does it
    core.release(first, 2.0)
    with pytest.raises(RuntimeError, match="twice"):
        core.release(record, 2.0)
    core.check()
    assert core.stats(2.0).shared_borrows == 2
