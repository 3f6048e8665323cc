"""The real async pool (``_pool.py``) driven by hypothesis with fake connections.

Each example runs ``trio.run`` under ``MockClock(autojump_threshold=0)``: a plan of
borrowers (hold times, timeouts, how their block ends), cancellations at arbitrary
moments, servers going down and up and slow dials is executed in virtual time, then the
pool's statistics are checked against what the borrowers saw, and every fake connection
must be closed exactly once when ``open_pool`` returns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import trio
import trio.testing
from hypothesis import given, note
from hypothesis import strategies as st

from property_tests.fakes import FakeConn, FakeNetwork
from trionats._config import PoolConfig
from trionats._errors import (
    ConnectionClosedError,
    LeaseExpiredError,
    PoolTimeoutError,
)
from trionats._pool import open_pool

HOLDS = [0.0, 0.5, 2.0, 7.0, 60.0]
EPS = 1e-6


@dataclass
class Record:
    outcome: str = "pending"
    held: float | None = None
    conn: FakeConn | None = None


@dataclass
class World:
    in_use: set[int] = field(default_factory=set)
    records: list[Record] = field(default_factory=list)
    scopes: list[trio.CancelScope] = field(default_factory=list)


actions = st.one_of(
    st.tuples(
        st.just("borrow"),
        st.sampled_from(HOLDS),
        st.sampled_from([None, 0.3, 3.0, 30.0]),
        st.sampled_from(["ok", "ok", "user_error", "conn_error", "break"]),
    ),
    st.tuples(st.just("cancel"), st.integers(0, 30)),
    st.tuples(st.just("down"), st.integers(0, 2)),
    st.tuples(st.just("up"), st.integers(0, 2)),
    st.tuples(st.just("sleep"), st.sampled_from([0.0, 0.2, 1.0, 5.0, 40.0])),
)


@given(
    data=st.data(),
    n_servers=st.integers(1, 3),
    idle_per_server=st.integers(0, 3),
    max_per_server=st.none() | st.integers(1, 3),
    max_life=st.sampled_from([4.0, 30.0, 3600.0]),
    leak_timeout=st.sampled_from([5.0, 50.0]),
    leak_action=st.sampled_from(["report", "cancel"]),
    dial_times=st.lists(st.sampled_from([0.0, 0.1, 20.0]), min_size=3, max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_pool_against_fakes(
    data: st.DataObject,
    n_servers: int,
    idle_per_server: int,
    max_per_server: int | None,
    max_life: float,
    leak_timeout: float,
    leak_action: str,
    dial_times: list[float],
    seed: int,
) -> None:
    urls = [f"nats://127.0.0.1:{4222 + i}" for i in range(n_servers)]
    config = PoolConfig(
        servers=urls,
        idle_per_server=idle_per_server,
        max_per_server=max_per_server,
        max_life=max_life,
        max_life_jitter=0.1,
        dial_timeout=5.0,
        backoff_min=1.0,
        backoff_max=8.0,
        leak_timeout=leak_timeout,
        leak_action=leak_action,  # type: ignore[arg-type]
        close_timeout=1.0,
    )
    plan = data.draw(st.lists(actions, max_size=25), label="plan")
    net = FakeNetwork()
    for url, t in zip(urls, dial_times, strict=False):
        net.dial_time[url] = t
    world = World()

    async def borrower(pool: object, hold: float, timeout: float | None, how: str) -> None:
        from trionats._pool import Pool

        assert isinstance(pool, Pool)
        record = Record()
        world.records.append(record)
        scope = trio.CancelScope()
        world.scopes.append(scope)
        with scope:
            b = pool.borrow(timeout=timeout)
            try:
                async with b as conn:
                    lease = b._lease
                    assert lease is not None
                    now = trio.current_time()
                    assert isinstance(conn, FakeConn)
                    assert not conn.closed, "handed a closed connection"
                    assert conn.is_connected, "handed a broken connection"
                    assert now < lease.expires_at, "handed a connection past its life"
                    assert conn.id not in world.in_use, "handed to two borrowers"
                    world.in_use.add(conn.id)
                    record.conn = conn
                    try:
                        await trio.sleep(hold)
                        if how == "user_error":
                            raise ValueError("user code failed")
                        if how == "conn_error":
                            raise ConnectionClosedError("the connection failed")
                        if how == "break":
                            conn.broken = True
                    finally:
                        world.in_use.discard(conn.id)
                        record.held = trio.current_time() - lease.borrowed_at
                record.outcome = "ok"
            except ValueError:
                record.outcome = "user_error"
            except ConnectionClosedError:
                record.outcome = "conn_error"
            except PoolTimeoutError:
                record.outcome = "timeout"
            except LeaseExpiredError:
                record.outcome = "expired"
        if scope.cancelled_caught:
            record.outcome = "cancelled"

    async def main() -> None:
        async with open_pool(config, dial=net.dial, rng=random.Random(seed)) as pool:
            async with trio.open_nursery() as nursery:
                for action in plan:
                    kind = action[0]
                    if kind == "borrow":
                        _, hold, timeout, how = action
                        nursery.start_soon(borrower, pool, hold, timeout, how)
                    elif kind == "cancel":
                        if world.scopes:
                            world.scopes[action[1] % len(world.scopes)].cancel()
                    elif kind == "down":
                        net.down.add(urls[action[1] % n_servers])
                    elif kind == "up":
                        net.down.discard(urls[action[1] % n_servers])
                    else:
                        await trio.sleep(action[1])
                    await trio.testing.wait_all_tasks_blocked()
                # Bring everything up so borrowers without a timeout can finish.
                await trio.sleep(100.0)
                net.down.clear()
                net.dial_time.clear()
            stats = pool.stats()
            note(repr(stats))
            pool._core.check()
            assert stats.borrowed == 0
            assert stats.dialing == 0
            assert stats.waiting == 0
            assert stats.created == len(net.conns)
            assert stats.idle + stats.closed.total == stats.created
            assert stats.idle <= idle_per_server * n_servers
            assert stats.timeouts == sum(r.outcome == "timeout" for r in world.records)
            # a dial timing out at the same instant as its borrow counts as an abort
            assert net.failures <= stats.dial_failures <= net.failures + dial_timeouts(net, stats)
            served = sum(r.conn is not None for r in world.records)
            assert stats.reused + stats.created >= served
            leaked = [
                r for r in world.records if r.held is not None and r.held >= leak_timeout - EPS
            ]
            assert stats.leaks_detected == len(leaked)
            if leak_action == "cancel":
                for r in leaked:
                    assert r.held is not None
                    assert r.held <= leak_timeout + EPS
            assert stats.closed.unhealthy >= sum(r.outcome == "conn_error" for r in world.records)
            if max_per_server is not None:
                for server in stats.servers:
                    assert server.idle <= max_per_server
        for conn in net.conns:
            assert conn.closed, f"{conn} outlived the pool"
            assert conn.close_calls == 1

    def dial_timeouts(net: FakeNetwork, stats: object) -> int:
        # Dials that took longer than dial_timeout count as failures too.
        return net.timeouts

    net.timeouts = 0  # type: ignore[attr-defined]
    original = net.dial

    async def dial(url: str) -> FakeConn:
        start = trio.current_time()
        try:
            return await original(url)
        except trio.Cancelled:
            if trio.current_time() - start >= config.dial_timeout - EPS:
                net.timeouts += 1  # type: ignore[attr-defined]
            raise

    net.dial = dial  # type: ignore[method-assign]
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
