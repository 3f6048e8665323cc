"""Scenario 2: a cluster. A connection on a node that is killed fails over to another node
within a stated bound; queue-group work continues; a pool given one node grows to the
servers the cluster announces (``PoolConfig.discover_servers``, on by default; off keeps
exactly the listed servers), spreads over the remaining nodes when one dies and returns
to it once it is back. Real 3-node nats-server clusters on 127.0.0.1."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import trio

import trionats
from trionats.testing import NatsCluster

FAILOVER_BOUND = 2.0  # reconnect_time_wait 0.1 s + a connect to a live node, with margin


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Bounded polling (the pool's stats have no event to wait on)."""
    with trio.fail_after(timeout):
        while True:
            if condition():
                return
            await trio.sleep(0.02)


async def _wait_for(events: trionats.EventStream, kind: trionats.EventKind) -> None:
    async for event in events:
        if event.kind is kind:
            return
    raise AssertionError(f"no {kind}")  # pragma: no cover


async def test_killed_node_fails_over_and_queue_work_continues(
    nats_cluster: NatsCluster,
) -> None:
    options = {"reconnect_time_wait": 0.1, "connect_timeout": 5.0}
    answered: dict[int, int] = {0: 0, 1: 0, 2: 0}
    subscribed = [trio.Event() for _ in range(3)]
    async with (
        trionats.open_connection(nats_cluster[0].url, **options) as w0,
        trionats.open_connection(nats_cluster[1].url, **options) as w1,
        trionats.open_connection(nats_cluster[2].url, **options) as w2,
        trionats.open_connection(nats_cluster[0].url, **options) as client,
        w1.events() as w1_events,
        trio.open_nursery() as nursery,
    ):

        async def worker(index: int, nc: trionats.Connection) -> None:
            async with nc.subscribe("work", queue="workers") as sub:
                subscribed[index].set()
                async for msg in sub:
                    answered[index] += 1
                    with contextlib.suppress(trionats.TrionatsError):
                        await msg.respond(b"done")

        for index, nc in enumerate((w0, w1, w2)):
            nursery.start_soon(worker, index, nc)
        # every worker's SUB was flushed to its node before any node dies (a kill during
        # that flush is a ConnectionClosedError by contract, not what this test is about)
        with trio.fail_after(10):
            for event in subscribed:
                await event.wait()
        # the queue subscriptions have propagated over the routes when requests succeed
        with trio.fail_after(10):
            while True:
                with contextlib.suppress(trionats.TrionatsError):
                    await client.request("work", b"", timeout=0.5)
                    break
        await nats_cluster.kill(1)
        killed_at = trio.current_time()
        with trio.fail_after(FAILOVER_BOUND + 5):
            await _wait_for(w1_events, trionats.EventKind.RECONNECTED)
        failover = trio.current_time() - killed_at
        assert nats_cluster.index_of(w1.connected_url) in (0, 2)
        ok = failed = 0
        for _ in range(60):
            try:
                await client.request("work", b"", timeout=1.0)
                ok += 1
            except trionats.TrionatsError:
                failed += 1
        answered_after = dict(answered)
        nursery.cancel_scope.cancel()
    print(
        f"\nRELIABILITY cluster: connection failed over in {failover * 1000:.0f} ms; "
        f"queue work after the kill: {ok} answered, {failed} failed; per worker "
        f"{answered_after}"
    )
    assert failover <= FAILOVER_BOUND, failover
    assert failed == 0
    assert ok == 60


async def test_pool_discovers_the_cluster(nats_cluster: NatsCluster) -> None:
    config = trionats.PoolConfig(servers=[nats_cluster[0].url], idle_per_server=30)
    async with trionats.open_pool(config) as pool:
        async with pool.borrow(timeout=10) as nc:
            await nc.flush(timeout=5)
        ports = sorted(int(s.url.rsplit(":", 1)[1]) for s in pool.stats().servers)
        assert ports == sorted(s.port for s in nats_cluster)
        # concurrent borrowers spread over the whole cluster
        release = trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(30):

                async def hold() -> None:
                    async with pool.borrow(timeout=10) as leased:
                        await leased.flush(timeout=5)
                        await release.wait()

                nursery.start_soon(hold)
            await _until(lambda: pool.stats().borrowed == 30)
            per_server = [s.borrowed for s in pool.stats().servers]
            release.set()
        assert all(n > 0 for n in per_server), per_server


async def test_pool_discovery_off_keeps_the_listed_servers(nats_cluster: NatsCluster) -> None:
    config = trionats.PoolConfig(servers=[nats_cluster[0].url], discover_servers=False)
    async with trionats.open_pool(config) as pool:
        for _ in range(3):
            async with pool.borrow(timeout=10) as nc:
                await nc.flush(timeout=5)
        assert [s.url for s in pool.stats().servers] == [nats_cluster[0].url]
    with pytest.raises(TypeError, match="discover_servers"):
        trionats.PoolConfig(servers=[nats_cluster[0].url], discover_servers=1)  # type: ignore[arg-type]


async def test_pool_spreads_over_remaining_nodes_and_returns(nats_cluster: NatsCluster) -> None:
    config = trionats.PoolConfig(
        servers=[nats_cluster[0].url],
        idle_per_server=4,
        max_life=0.5,
        max_life_jitter=0.2,
        backoff_min=0.1,
        backoff_max=0.3,
        dial_timeout=1.0,
    )
    errors = 0
    slowest = 0.0
    async with trionats.open_pool(config) as pool:
        async with pool.borrow(timeout=10) as nc:
            await nc.flush(timeout=5)  # discovery

        def opened(index: int) -> int:
            port = nats_cluster[index].port
            for s in pool.stats().servers:
                if s.url.endswith(f":{port}"):
                    return s.idle + s.borrowed
            raise AssertionError(port)  # pragma: no cover

        async def traffic(stop: trio.Event) -> None:
            nonlocal errors, slowest
            while not stop.is_set():
                start = trio.current_time()
                try:
                    async with pool.borrow(timeout=1.0) as leased:
                        await leased.publish("spread", b"x")
                        await leased.flush(timeout=1.0)
                except trionats.TrionatsError:
                    errors += 1
                    await trio.sleep(0.02)
                slowest = max(slowest, trio.current_time() - start)
                await trio.sleep(0.005)

        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(traffic, stop)
            await _until(lambda: all(opened(i) for i in range(3)))  # every node is used
            await nats_cluster.kill(1)
            errors_at_kill = errors
            await _until(lambda: not opened(1))  # node 1's connections are gone
            await nats_cluster.start(1)
            back_at = trio.current_time()
            await _until(lambda: opened(1) > 0)
            returned = trio.current_time() - back_at
            stop.set()
    print(
        f"\nRELIABILITY cluster pool: back on the restarted node {returned * 1000:.0f} ms "
        f"after its restart; borrow errors {errors} ({errors - errors_at_kill} after the "
        f"kill); slowest borrow + flush {slowest * 1000:.0f} ms"
    )
    assert slowest < 2.0 + 0.75
