"""Scenario 6: 1,000 concurrent connections through the pool against one local server, and
1,000 concurrent borrowers on a pool capped at 100. Prints time, RSS per connection and
fds per connection (for docs/reliability.md: ``pytest -s tests/test_reliability_scale.py``).
"""

from __future__ import annotations

import os

import trio

import trionats
from trionats.testing import leak_probe, wait_for_connections

N = 1000


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")  # pragma: no cover


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_thousand_concurrent_connections(nats_server: trionats.NatsServer) -> None:
    config = trionats.PoolConfig(
        servers=[nats_server.url], idle_per_server=N, dial_timeout=30.0, close_timeout=30.0
    )
    held = 0
    all_held = trio.Event()
    release = trio.Event()
    failures: list[BaseException] = []

    async def borrower(pool: trionats.Pool[trionats.Connection]) -> None:
        nonlocal held
        try:
            async with pool.borrow(timeout=60) as nc:
                await nc.flush(timeout=30)
                held += 1
                if held == N:
                    all_held.set()
                await release.wait()
        except trionats.TrionatsError as exc:  # pragma: no cover - reported below
            failures.append(exc)
            all_held.set()

    async with leak_probe(nats_server, settle_timeout=30) as probe:
        rss0, fds0 = _rss_kib(), _fds()
        async with trionats.open_pool(config) as pool:
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(N):
                    nursery.start_soon(borrower, pool)
                with trio.fail_after(120):
                    await all_held.wait()
                took = trio.current_time() - start
                assert not failures, failures[:3]
                await wait_for_connections(nats_server, N, timeout=30)
                rss1, fds1 = _rss_kib(), _fds()
                release.set()
            stats = pool.stats()
            assert stats.created == N
            assert stats.idle == N
    probe.assert_no_leaks()
    per_conn_kib = (rss1 - rss0) / N
    per_conn_fds = (fds1 - fds0) / N
    print(
        f"\nRELIABILITY scale: {N} concurrent connections borrowed in {took:.2f} s; "
        f"RSS +{(rss1 - rss0) / 1024:.1f} MiB = {per_conn_kib:.1f} KiB per connection; "
        f"fds +{fds1 - fds0} = {per_conn_fds:.2f} per connection"
    )
    assert per_conn_fds <= 1.05  # one socket each


async def test_thousand_borrowers_on_a_pool_capped_at_100(
    nats_server: trionats.NatsServer,
) -> None:
    config = trionats.PoolConfig(
        servers=[nats_server.url], idle_per_server=100, max_per_server=100, dial_timeout=30.0
    )
    done = 0
    peak = 0

    async def borrower(pool: trionats.Pool[trionats.Connection]) -> None:
        nonlocal done, peak
        async with pool.borrow(timeout=60) as nc:
            peak = max(peak, pool.stats().borrowed)
            await nc.publish("scale.capped", b"x")
            await nc.flush(timeout=30)
        done += 1

    async with (
        leak_probe(nats_server, settle_timeout=30) as probe,
        trionats.open_pool(config) as pool,
    ):
        start = trio.current_time()
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for _ in range(N):
                    nursery.start_soon(borrower, pool)
        took = trio.current_time() - start
        stats = pool.stats()
    probe.assert_no_leaks()
    assert done == N
    assert stats.created <= 100
    assert peak <= 100
    assert stats.waits > 0
    print(
        f"\nRELIABILITY scale capped: {N} borrowers on max_per_server=100 in {took:.2f} s; "
        f"created {stats.created}, reused {stats.reused}, waits {stats.waits}, "
        f"longest wait {stats.wait_time_max * 1000:.0f} ms"
    )
