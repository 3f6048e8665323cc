"""Scenario 4: a frozen server (SIGSTOP) and a frozen network path (black hole) are found
by ping-based stale-connection detection, and the connection reconnects elsewhere in a
cluster.

nats-py (like nats.go) counts a ping as outstanding when it sends it and declares the
connection stale when, at a ping tick, more than ``max_outstanding_pings`` are
outstanding: after a freeze that is at most ``(max_outstanding_pings + 1) *
ping_interval``, which is the bound asserted here (plus ``MARGIN``).
"""

from __future__ import annotations

import trio

import trionats
from trionats.testing import NatsCluster, open_fault_proxy

PING = 0.3
MAX_PINGS = 2
BOUND = (MAX_PINGS + 1) * PING
MARGIN = 0.75
OPTIONS = {
    "ping_interval": PING,
    "max_outstanding_pings": MAX_PINGS,
    "reconnect_time_wait": 0.1,
    "connect_timeout": 1.0,  # also each reconnect attempt's bound (a frozen node's)
}


async def _wait_for(events: trionats.EventStream, kind: trionats.EventKind) -> float:
    async for event in events:
        if event.kind is kind:
            return trio.current_time()
    raise AssertionError(f"no {kind} event")  # pragma: no cover


async def test_frozen_server_is_detected(nats_server: trionats.NatsServer) -> None:
    async with (
        trionats.open_connection(nats_server.url, **OPTIONS) as nc,
        nc.events() as events,
    ):
        await nc.flush(timeout=5)
        await nats_server.freeze()
        frozen_at = trio.current_time()
        with trio.fail_after(BOUND + 5):
            detected_at = await _wait_for(events, trionats.EventKind.DISCONNECTED)
        await nats_server.thaw()
        with trio.fail_after(10):
            await _wait_for(events, trionats.EventKind.RECONNECTED)
        await nc.flush(timeout=5)
    took = detected_at - frozen_at
    print(f"\nRELIABILITY stale frozen server: detected in {took * 1000:.0f} ms (bound {BOUND} s)")
    assert took <= BOUND + MARGIN, took


async def test_frozen_node_fails_over(nats_cluster: NatsCluster) -> None:
    async with (
        trionats.open_connection(nats_cluster.urls, **OPTIONS) as nc,
        nc.events() as events,
    ):
        await nc.flush(timeout=5)
        first = nats_cluster.index_of(nc.connected_url)
        assert first is not None
        await nats_cluster.freeze(first)
        frozen_at = trio.current_time()
        try:
            with trio.fail_after(BOUND + 10):
                reconnected_at = await _wait_for(events, trionats.EventKind.RECONNECTED)
            now_on = nats_cluster.index_of(nc.connected_url)
            assert now_on is not None
            assert now_on != first
            await nc.flush(timeout=5)
        finally:
            await nats_cluster.thaw(first)
    took = reconnected_at - frozen_at
    print(f"\nRELIABILITY stale frozen node: on node {now_on} after {took * 1000:.0f} ms")
    assert took <= BOUND + 1.0 + MARGIN, took  # + a reconnect attempt to a live node


async def test_blackholed_path_fails_over(nats_cluster: NatsCluster) -> None:
    async with open_fault_proxy(nats_cluster[0]) as proxy:
        servers = [proxy.url, nats_cluster[1].url]
        async with (
            trionats.open_connection(servers, **OPTIONS) as nc,
            nc.events() as events,
        ):
            await nc.flush(timeout=5)
            if nc.connected_url is not None and nc.connected_url.endswith(f":{proxy.port}"):
                proxy.blackhole()
            else:  # nats-py shuffled the list: black-hole the direct node by freezing it
                await nats_cluster.freeze(1)
            frozen_at = trio.current_time()
            try:
                with trio.fail_after(BOUND + 10):
                    reconnected_at = await _wait_for(events, trionats.EventKind.RECONNECTED)
                await nc.flush(timeout=5)
            finally:
                proxy.heal()
                await nats_cluster.thaw(1)
    took = reconnected_at - frozen_at
    print(f"\nRELIABILITY stale black hole: reconnected after {took * 1000:.0f} ms")
    assert took <= BOUND + 1.0 + MARGIN, took
