"""The FaultProxy (trionats.testing) against a real nats-server: each fault does what it
says, on current and new connections, and heal() restores a plain pass-through."""

from __future__ import annotations

import math

import pytest
import trio

import trionats
from trionats.testing import FaultProxy, leak_probe, open_fault_proxy, wait_for_connections


async def _next_event(events: trionats.EventStream, kind: trionats.EventKind) -> None:
    async for event in events:
        if event.kind is kind:
            return
    raise AssertionError(f"event stream ended before {kind}")  # pragma: no cover


async def test_pass_through(nats_server: trionats.NatsServer, fault_proxy: FaultProxy) -> None:
    assert fault_proxy.url != nats_server.url
    async with (
        trionats.open_connection(fault_proxy.url) as nc,
        nc.subscribe("p.t") as sub,
    ):
        await nc.publish("p.t", b"hello")
        with trio.fail_after(5):
            assert (await sub.next_msg()).data == b"hello"
        assert fault_proxy.connections == 1
        assert fault_proxy.accepted == 1
        assert fault_proxy.bytes_up > 0
        assert fault_proxy.bytes_down > 0
        await wait_for_connections(nats_server, 1)
        assert "connections=1" in repr(fault_proxy)


async def test_latency_and_jitter(fault_proxy: FaultProxy) -> None:
    async with trionats.open_connection(fault_proxy.url) as nc:
        fault_proxy.latency(0.1)
        start = trio.current_time()
        await nc.flush(timeout=5)
        rtt = trio.current_time() - start
        assert 0.2 <= rtt < 1.5, rtt  # 0.1 s each way
        fault_proxy.latency(0.05, jitter=0.1)
        start = trio.current_time()
        await nc.flush(timeout=5)
        rtt = trio.current_time() - start
        assert 0.1 <= rtt < 0.3 + 1.0, rtt
        fault_proxy.heal()
        start = trio.current_time()
        await nc.flush(timeout=5)
        assert trio.current_time() - start < 0.1


async def test_latency_pipelines(fault_proxy: FaultProxy) -> None:
    """Latency delays each chunk; it does not serialise them (throughput is kept)."""
    async with trionats.open_connection(fault_proxy.url) as nc, nc.subscribe("lat") as sub:
        await nc.flush(timeout=5)
        fault_proxy.latency(0.2)
        writes = fault_proxy.writes
        start = trio.current_time()
        for _ in range(20):
            await nc.publish("lat", b"x" * 100)
            await trio.sleep(0.01)  # a pause between writes: each its own chunk
        with trio.fail_after(10):
            for _ in range(20):
                await sub.next_msg()
        elapsed = trio.current_time() - start
        assert fault_proxy.writes - writes >= 20  # many chunks went through the proxy ...
        assert 0.4 <= elapsed < 2.0, elapsed  # ... in about one round trip, not 20 of them


async def test_bandwidth_cap(fault_proxy: FaultProxy) -> None:
    payload = b"b" * 100_000
    async with trionats.open_connection(fault_proxy.url) as nc, nc.subscribe("bw") as sub:
        fault_proxy.bandwidth(100_000)  # bytes per second, each direction
        start = trio.current_time()
        await nc.publish("bw", payload)
        with trio.fail_after(10):
            assert (await sub.next_msg()).data == payload
        elapsed = trio.current_time() - start
        assert 0.9 <= elapsed < 5, elapsed
        fault_proxy.bandwidth(None)
        start = trio.current_time()
        await nc.publish("bw", payload)
        with trio.fail_after(5):
            await sub.next_msg()
        assert trio.current_time() - start < 0.5


async def test_split_writes_one_byte_each(fault_proxy: FaultProxy) -> None:
    async with trionats.open_connection(fault_proxy.url) as nc, nc.subscribe("split.>") as sub:
        fault_proxy.split_writes()
        before_writes, before_bytes = fault_proxy.writes, fault_proxy.bytes_up
        await nc.publish("split.a", b"0123456789" * 20, headers={"k": "v"})
        with trio.fail_after(10):
            msg = await sub.next_msg()
        assert msg.data == b"0123456789" * 20
        assert msg.headers == {"k": "v"}
        sent = fault_proxy.bytes_up - before_bytes
        assert sent > 200
        # every byte both ways was its own write
        assert fault_proxy.writes - before_writes >= sent + 200
        fault_proxy.split_writes(False)
        await nc.flush(timeout=5)


async def test_blackhole_stalls_then_heal_delivers(fault_proxy: FaultProxy) -> None:
    async with trionats.open_connection(fault_proxy.url) as nc, nc.subscribe("bh") as sub:
        fault_proxy.blackhole()
        await nc.publish("bh", b"held")
        start = trio.current_time()
        with pytest.raises(trionats.TimeoutError):
            await nc.flush(timeout=0.5)
        assert trio.current_time() - start < 0.5 + 0.5
        assert nc.is_connected  # a black hole is silent: nothing tells the client
        fault_proxy.heal()
        await nc.flush(timeout=5)
        with trio.fail_after(5):
            assert (await sub.next_msg()).data == b"held"  # held, not lost


@pytest.mark.parametrize("direction", ["up", "down"])
async def test_blackhole_one_direction(fault_proxy: FaultProxy, direction: str) -> None:
    async with trionats.open_connection(fault_proxy.url) as nc:
        await nc.flush(timeout=5)
        up, down = fault_proxy.bytes_up, fault_proxy.bytes_down
        fault_proxy.blackhole(direction)  # type: ignore[arg-type]
        with pytest.raises(trionats.TimeoutError):
            await nc.flush(timeout=0.3)
        if direction == "up":
            assert fault_proxy.bytes_up == up  # the PING never reached the server
        else:
            assert fault_proxy.bytes_up > up  # the PING went through ...
            assert fault_proxy.bytes_down == down  # ... the PONG never came back
        fault_proxy.heal()
        await nc.flush(timeout=5)


async def test_blackhole_stalls_new_connections(fault_proxy: FaultProxy) -> None:
    fault_proxy.blackhole()
    start = trio.current_time()
    with pytest.raises(trionats.ConnectError):
        async with trionats.open_connection(fault_proxy.url, connect_timeout=1):
            pass  # pragma: no cover
    assert trio.current_time() - start < 1 + 1.0
    assert fault_proxy.accepted >= 1  # accepted, then silent
    fault_proxy.heal()
    async with trionats.open_connection(fault_proxy.url, connect_timeout=5) as nc:
        await nc.flush(timeout=5)


async def test_reset_disconnects_and_client_reconnects(
    nats_server: trionats.NatsServer, fault_proxy: FaultProxy
) -> None:
    async with (
        trionats.open_connection(fault_proxy.url, reconnect_time_wait=0.1) as nc,
        nc.events() as events,
    ):
        await nc.flush(timeout=5)
        fault_proxy.reset()
        with trio.fail_after(10):
            await _next_event(events, trionats.EventKind.DISCONNECTED)
            await _next_event(events, trionats.EventKind.RECONNECTED)
        await nc.flush(timeout=5)
        assert fault_proxy.accepted == 2
        await wait_for_connections(nats_server, 1)  # the server dropped the old one


async def test_half_close_down_is_an_eof_for_the_client(fault_proxy: FaultProxy) -> None:
    async with (
        trionats.open_connection(fault_proxy.url, reconnect_time_wait=0.1) as nc,
        nc.events() as events,
    ):
        await nc.flush(timeout=5)
        fault_proxy.half_close("down")
        with trio.fail_after(10):
            await _next_event(events, trionats.EventKind.DISCONNECTED)
            await _next_event(events, trionats.EventKind.RECONNECTED)
        await nc.flush(timeout=5)


async def test_half_close_up_makes_the_server_close(fault_proxy: FaultProxy) -> None:
    async with (
        trionats.open_connection(fault_proxy.url, reconnect_time_wait=0.1) as nc,
        nc.events() as events,
    ):
        await nc.flush(timeout=5)
        fault_proxy.half_close("up")
        with trio.fail_after(10):
            await _next_event(events, trionats.EventKind.DISCONNECTED)
            await _next_event(events, trionats.EventKind.RECONNECTED)
        await nc.flush(timeout=5)


async def test_upstream_down_is_refused_then_back(nats_server: trionats.NatsServer) -> None:
    async with open_fault_proxy(nats_server.port) as proxy:
        await nats_server.stop()
        with pytest.raises(trionats.ConnectError):
            async with trionats.open_connection(proxy.url, connect_timeout=1):
                pass  # pragma: no cover
        await nats_server.start()
        async with trionats.open_connection(proxy.url, connect_timeout=5) as nc:
            await nc.flush(timeout=5)


async def test_leaving_the_block_closes_everything(nats_server: trionats.NatsServer) -> None:
    async with (
        leak_probe(nats_server) as probe,
        open_fault_proxy(nats_server) as proxy,
        trionats.open_connection(proxy.url, allow_reconnect=False) as via,
    ):
        await via.flush(timeout=5)
        assert proxy.connections == 1
    probe.assert_no_leaks()


@pytest.mark.parametrize(
    ("call", "exc"),
    [
        (lambda p: p.latency(-1), ValueError),
        (lambda p: p.latency(math.nan), ValueError),
        (lambda p: p.latency("1"), TypeError),
        (lambda p: p.latency(0.1, jitter=math.inf), ValueError),
        (lambda p: p.bandwidth(0), ValueError),
        (lambda p: p.bandwidth(math.inf), ValueError),
        (lambda p: p.bandwidth("fast"), TypeError),
        (lambda p: p.blackhole("sideways"), ValueError),
        (lambda p: p.blackhole(1), TypeError),
        (lambda p: p.half_close("left"), ValueError),
        (lambda p: p.split_writes(1), TypeError),
    ],
)
async def test_bad_fault_arguments(fault_proxy: FaultProxy, call: object, exc: type) -> None:
    assert callable(call)
    with pytest.raises(exc):
        call(fault_proxy)


@pytest.mark.parametrize(
    ("upstream", "exc", "words"),
    [
        (0, ValueError, "0"),
        (70000, ValueError, "70000"),
        (1.5, TypeError, "1.5"),
        (True, TypeError, "True"),
        ("nats://", ValueError, "nats://"),
    ],
)
async def test_bad_upstream(upstream: object, exc: type, words: str) -> None:
    with pytest.raises(exc, match=words):
        async with open_fault_proxy(upstream):  # type: ignore[arg-type]
            pass  # pragma: no cover
