"""Scenario 3: every fault of the FaultProxy during every operation (table-driven).

For each (fault, operation) cell, against a real nats-server behind a FaultProxy: the
operation completes or raises a ``TrionatsError`` within its configured timeout plus a
stated margin (``MARGIN``), never hangs, and the leak probe shows nothing left behind
(Trio tasks, fds, server connections and subscriptions) once the connection is closed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

import trionats
from trionats.testing import FaultProxy, leak_probe, open_fault_proxy

T = 0.5  # every operation's own timeout (and dial_timeout, close_timeout)
MARGIN = 0.75  # what an operation may take beyond its bound, on a loaded 2-core machine

FAULTS: dict[str, Callable[[FaultProxy], None]] = {
    "latency": lambda p: p.latency(0.1, jitter=0.05),
    "bandwidth": lambda p: p.bandwidth(4000),
    "split_writes": lambda p: p.split_writes(),
    "reset": lambda p: p.reset(),
    "half_close_down": lambda p: p.half_close("down"),
    "half_close_up": lambda p: p.half_close("up"),
    "blackhole_both": lambda p: p.blackhole("both"),
    "blackhole_up": lambda p: p.blackhole("up"),
    "blackhole_down": lambda p: p.blackhole("down"),
}


async def _publish(nc: trionats.Connection, pool: Any) -> None:
    await nc.publish("fx.pub", b"x" * 1000)


async def _request(nc: trionats.Connection, pool: Any) -> None:
    await nc.request("fx.svc", b"ping", timeout=T)


async def _subscribe(nc: trionats.Connection, pool: Any) -> None:
    async with nc.subscribe("fx.sub", timeout=T):
        pass


async def _flush(nc: trionats.Connection, pool: Any) -> None:
    await nc.flush(timeout=T)


async def _drain(nc: trionats.Connection, pool: Any) -> None:
    await nc.drain(timeout=T)


async def _borrow(nc: trionats.Connection, pool: Any) -> None:
    async with pool.borrow(timeout=T) as leased:
        await leased.flush(timeout=T)


# operation -> (call, its bound: what it may take at most, before MARGIN)
OPERATIONS: dict[str, tuple[Callable[[trionats.Connection, Any], Awaitable[None]], float]] = {
    "publish": (_publish, 0.0),
    "request": (_request, T),
    "subscribe": (_subscribe, T),
    "flush": (_flush, T),
    "drain": (_drain, T + T),  # its timeout, then the close (close_timeout)
    "borrow": (_borrow, T + T),  # the borrow, then the flush inside
}


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_fault_during_operation(
    nats_server: trionats.NatsServer, fault: str, operation: str
) -> None:
    call, bound = OPERATIONS[operation]
    outcome = "?"
    async with (
        leak_probe(nats_server) as probe,
        trionats.open_connection(nats_server.url, name="svc") as svc,
        svc.subscribe("fx.svc") as service,
        trio.open_nursery() as nursery,
    ):

        async def respond() -> None:
            async for msg in service:
                await msg.respond(b"pong")

        nursery.start_soon(respond)
        async with open_fault_proxy(nats_server) as proxy:
            config = trionats.PoolConfig(
                servers=[proxy.url], dial_timeout=T, close_timeout=T, backoff_min=0.1
            )
            async with (
                trionats.open_pool(config) as pool,
                trionats.open_connection(proxy.url, reconnect_time_wait=0.2, close_timeout=T) as nc,
            ):
                async with pool.borrow(timeout=5) as primed:  # an idle connection waits
                    await primed.flush(timeout=5)
                await nc.flush(timeout=5)
                FAULTS[fault](proxy)
                start = trio.current_time()
                try:
                    await call(nc, pool)
                    outcome = "ok"
                except trionats.TrionatsError as exc:
                    outcome = type(exc).__name__
                took = trio.current_time() - start
                proxy.heal()
                assert took <= bound + MARGIN, (fault, operation, outcome, took)
                exit_start = trio.current_time()
            # leaving the pool and the connection is bounded too
            assert trio.current_time() - exit_start <= 2 * T + MARGIN
        nursery.cancel_scope.cancel()
    probe.assert_no_leaks()
    print(f"\nFAULTS {fault} x {operation}: {outcome} in {took * 1000:.0f} ms")
