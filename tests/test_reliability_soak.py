"""Scenario 5: soak. Mixed publish / request / subscribe / borrow traffic with periodic
server restarts and proxy faults; Trio tasks, fds and server connections back to baseline
at the end (asyncio tasks end with each connection's own loop), RSS flat within
``RSS_TOLERANCE_MIB`` (the series is printed).

A short run by default (``SHORT_SECONDS``, for CI); ``pytest --soak-minutes N
tests/test_reliability_soak.py -s`` for a long one.
"""

from __future__ import annotations

import statistics

import pytest
import trio
from test_reliability import Load, borrower, publisher, requester, responder, subscriber

import trionats
from trionats.testing import leak_probe, open_fault_proxy

SHORT_SECONDS = 12.0
RSS_TOLERANCE_MIB = 8.0  # growth allowed between the first and the last third of the run
FAULT_EVERY = 3.0


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")  # pragma: no cover


async def test_soak(nats_server: trionats.NatsServer, request: pytest.FixtureRequest) -> None:
    minutes = request.config.getoption("--soak-minutes")
    duration = SHORT_SECONDS if minutes is None else float(minutes) * 60
    load = Load()
    options = {"reconnect_time_wait": 0.2, "connect_timeout": 5.0, "close_timeout": 1.0}
    samples: list[tuple[float, dict[str, int], float]] = []
    faults_done: list[str] = []
    # Each connection runs its own trio-asyncio loop (the default). With one loop opened
    # around all of them (trio_asyncio.open_loop()), this run crashes on CPython 3.12 with
    # EBADF from Trio's epoll after a proxy reset: see docs/reliability.md, open issues.
    async with (
        leak_probe(nats_server, settle_timeout=10) as probe,
        open_fault_proxy(nats_server) as proxy,
    ):
        config = trionats.PoolConfig(
            servers=[proxy.url], backoff_min=0.1, backoff_max=0.5, dial_timeout=1.0
        )
        async with (
            trionats.open_connection(proxy.url, name="pub", **options) as pub_nc,
            trionats.open_connection(nats_server.url, name="sub", **options) as sub_nc,
            trionats.open_connection(nats_server.url, name="svc", **options) as svc_nc,
            trionats.open_connection(proxy.url, name="req", **options) as req_nc,
            trionats.open_pool(config) as pool,
            sub_nc.subscribe("load.seq") as sub,
            svc_nc.subscribe("load.req") as svc_sub,
            trio.open_nursery() as nursery,
        ):
            stop = trio.Event()
            nursery.start_soon(subscriber, sub, load)
            nursery.start_soon(responder, svc_sub)
            nursery.start_soon(publisher, pub_nc, load, stop)
            nursery.start_soon(requester, req_nc, load, stop)
            for _ in range(4):
                nursery.start_soon(borrower, pool, load, stop)
            start = trio.current_time()
            next_fault = start + FAULT_EVERY
            faults = ["restart", "reset", "latency", "blackhole"]
            while trio.current_time() - start < duration:
                await trio.sleep(1.0)  # the sampling period (a duration)
                counts = await probe.snapshot()
                samples.append((trio.current_time() - start, counts, _rss_mib()))
                if trio.current_time() >= next_fault:
                    fault = faults[len(faults_done) % len(faults)]
                    faults_done.append(fault)
                    if fault == "restart":
                        await nats_server.restart(kill=True)
                    elif fault == "reset":
                        proxy.reset()
                    elif fault == "latency":
                        proxy.latency(0.05, jitter=0.05)
                    else:
                        proxy.blackhole()
                        await trio.sleep(0.5)  # the black hole's length (a duration)
                    if fault != "latency":
                        proxy.heal()
                    next_fault = trio.current_time() + FAULT_EVERY
                elif faults_done and faults_done[-1] == "latency":
                    proxy.heal()
            stop.set()
            proxy.heal()
            nursery.cancel_scope.cancel()
    probe.assert_no_leaks()
    # -- report and RSS --
    third = max(1, len(samples) // 3)
    first = statistics.median(r for _, _, r in samples[:third])
    last = statistics.median(r for _, _, r in samples[-third:])
    print(f"\nRELIABILITY soak: {duration:.0f} s, faults {faults_done}")
    print(
        f"RELIABILITY soak: published {len(load.published)}, delivered {len(load.received)}, "
        f"requests ok {load.requests_ok} failed {load.request_errors}, borrows ok "
        f"{load.borrows_ok} failed {load.borrow_errors}"
    )
    for t, counts, rss in samples:
        print(
            f"RELIABILITY soak t={t:5.1f}s trio_tasks={counts['trio_tasks']} "
            f"asyncio_tasks={counts['asyncio_tasks']} fds={counts.get('fds')} "
            f"connz={counts.get(f'connz[{nats_server.port}]')} rss={rss:.1f} MiB"
        )
    print(f"RELIABILITY soak: RSS median first third {first:.1f} MiB, last third {last:.1f} MiB")
    assert len(faults_done) >= 3
    assert load.requests_ok > 0
    assert load.borrows_ok > 0
    assert last - first <= RSS_TOLERANCE_MIB, (first, last)
    # every operation stayed bounded through the faults
    assert load.slowest["request"] < 0.5 + 0.75, load.slowest
    assert load.slowest["publish"] < 0.75, load.slowest
