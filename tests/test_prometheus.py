"""trionats.prometheus: the collector's metrics, scraped over HTTP from serve() and parsed
with prometheus_client's own parser."""

from __future__ import annotations

import threading

import pytest
import trio
from polling import wait_until
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import trionats
import trionats.prometheus as tp
from trionats._metrics import Histogram


async def _get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[str, str]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode(), body.decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples[(name, tuple(sorted(labels.items())))]


async def test_scrape_exposes_every_component(nats_url: str) -> None:
    release = trio.Event()

    async def handle(msg: trionats.Msg) -> None:
        if msg.data == b"fail":
            raise ValueError("bad")
        if msg.data == b"block":
            await release.wait()

    config = trionats.PoolConfig(servers=[nats_url])
    limits = trionats.Limits(max_pending_msgs=0, max_failure_rate=None)
    async with (
        trionats.open_pool(config) as pool,
        trionats.open_connection(nats_url) as nc,
        trionats.open_subscriber(nc, trionats.SubscriberConfig(max_workers=1)) as sub,
        trionats.open_resource_manager(interval=60, limits=limits) as rm,
        tp.serve(rm) as server,
    ):
        await sub.start("prom.orders.*", handle)
        rm.register_pool("main", pool)
        rm.register_subscriber("orders", sub)
        rm.register_connection("events", nc)
        for i in range(10):
            async with pool.borrow() as c:
                await c.publish(f"prom.orders.{i}", b"fail" if i < 2 else b"ok")
        await wait_until(lambda: sub.stats().processed == 8)
        await nc.publish("prom.orders.x", b"block")
        await nc.publish("prom.orders.y", b"ok")
        await wait_until(lambda: sub.stats().pending == 1)
        rm.sample_now()  # pending > 0: an alert
        head, body = await _get(server.port)
        release.set()
    assert head.startswith("HTTP/1.1 200 OK")
    assert "Content-Type: text/plain; version=" in head
    assert server.url == f"http://127.0.0.1:{server.port}/metrics"
    s = _samples(body)
    assert _value(s, "trionats_messages_received_total", component="orders") == 12
    for status, n in (("processed", 8), ("failed", 2), ("timed_out", 0), ("dropped", 0)):
        assert (
            _value(s, "trionats_messages_processed_total", component="orders", status=status) == n
        )
    assert _value(s, "trionats_messages_in_flight", component="orders") == 1
    assert _value(s, "trionats_messages_pending", component="orders") == 1
    assert _value(s, "trionats_handler_duration_seconds_count", component="orders") == 10
    assert (
        _value(s, "trionats_handler_duration_seconds_bucket", component="orders", le="+Inf") == 10
    )
    assert _value(s, "trionats_pool_connections", component="main", state="idle") == 1
    assert _value(s, "trionats_pool_connections", component="main", state="borrowed") == 0
    assert _value(s, "trionats_pool_connections_created_total", component="main") == 1
    assert _value(s, "trionats_pool_connections_reused_total", component="main") == 9
    assert _value(s, "trionats_pool_wait_seconds_count", component="main") == 0
    assert _value(s, "trionats_connection_messages_total", component="events", direction="in") == 12
    assert _value(s, "trionats_connection_up", component="events") == 1
    assert _value(s, "trionats_process_resident_memory_bytes") > 1_000_000
    assert _value(s, "trionats_trio_tasks") > 1
    assert _value(s, "trionats_gc_collections_total", generation="0") >= 0
    health = {
        (labels, value)
        for (name, labels), value in s.items()
        if name == "trionats_health" and value == 1
    }
    assert (
        (("component", "orders"), ("kind", "subscriber"), ("status", "degraded")),
        1,
    ) in health
    assert _value(s, "trionats_health_overall", status="degraded") == 1
    assert (
        _value(
            s,
            "trionats_alert_active",
            component="orders",
            kind="subscriber",
            figure="pending_msgs",
            severity="warning",
        )
        == 1
    )
    assert _value(s, "trionats_resource_samples_total") == 1
    assert _value(s, "trionats_alerts_total") == 1
    # No concrete subject anywhere: only the component names and fixed label values.
    assert "prom.orders" not in body


async def test_histograms_are_rebucketed_cumulatively() -> None:
    h = Histogram()
    for value in (0.00005, 0.0003, 0.0003, 0.002, 0.3, 20.0):
        h.record(value)
    pairs = tp.rebucket(h.snapshot(), tp.DEFAULT_BUCKETS)
    counts = dict(pairs)
    assert counts["0.0001"] == 1
    assert counts["0.0005"] == 3  # 0.3 ms is in a bucket ending under 0.5 ms
    assert counts["0.0025"] == 4
    assert counts["0.5"] == 5
    assert counts["10.0"] == 5
    assert counts["+Inf"] == 6
    values = [n for _, n in pairs]
    assert values == sorted(values)
    # A value is never counted under a bound below it.
    exact = tp.rebucket(_one(0.001), (0.001, 0.002))
    assert dict(exact)["0.001"] == 0
    assert dict(exact)["0.002"] == 1


def _one(value: float) -> trionats.LatencySnapshot:
    h = Histogram()
    h.record(value)
    return h.snapshot()


async def test_register_with_a_registry_and_scrape_from_another_thread(nats_url: str) -> None:
    registry = CollectorRegistry()
    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_resource_manager(interval=60) as rm,
    ):
        rm.register_connection("events", nc)
        collector = tp.register(rm, registry)
        # On the Trio thread: read now.
        assert (
            'trionats_connection_up{component="events"} 1.0' in generate_latest(registry).decode()
        )
        # From another thread: nothing sampled yet, then the latest sample.
        assert "trionats_connection_up" not in await trio.to_thread.run_sync(
            lambda: generate_latest(registry).decode()
        )
        rm.sample_now()
        text = await trio.to_thread.run_sync(lambda: generate_latest(registry).decode())
        assert 'trionats_connection_up{component="events"} 1.0' in text
        assert threading.current_thread() is threading.main_thread()
        registry.unregister(collector)
        assert generate_latest(registry) == b""


async def test_serve_a_registry_and_errors() -> None:
    registry = CollectorRegistry()
    async with trionats.open_resource_manager(interval=60) as rm:
        async with tp.serve(rm, registry=registry) as server:
            head, body = await _get(server.port)
            assert "200 OK" in head
            assert "trionats_process_open_fds" in body
            head, body = await _get(server.port, "/other")
            assert "404 Not Found" in head
            head, body = await _get(server.port, method="POST")
            assert "405 Method Not Allowed" in head
            head, body = await _get(server.port, method="HEAD")
            assert "200 OK" in head
            assert body == ""
        assert generate_latest(registry) == b""  # the collector left with the block
        with pytest.raises(OSError, match="connect"):  # the listener is closed
            await _get(server.port)
        async with tp.serve(registry=registry) as bare:
            head, body = await _get(bare.port)
            assert "200 OK" in head
            assert body == ""
    with pytest.raises(TypeError, match="needs a ResourceManager"):
        async with tp.serve():
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="port"):
        async with tp.serve(rm, port=70000):
            pass  # pragma: no cover
    with pytest.raises(TypeError, match="registry"):
        async with tp.serve(rm, registry=object()):  # type: ignore[arg-type]
            pass  # pragma: no cover
    with pytest.raises(TypeError, match="manager"):
        tp.TrionatsCollector(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="buckets"):
        tp.TrionatsCollector(rm, buckets=(0.1, 0.01))


async def test_serve_is_cancellable_and_leaves_no_task() -> None:
    before = trio.lowlevel.current_statistics().tasks_living
    async with trionats.open_resource_manager(interval=60) as rm:
        with trio.move_on_after(0.05) as scope:
            async with tp.serve(rm) as server:
                # a scraper that connects and never sends: cancelled with the block
                stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                await trio.sleep_forever()
        assert scope.cancelled_caught
        await stream.aclose()
    assert trio.lowlevel.current_statistics().tasks_living == before


def test_trionats_prometheus_is_reachable_from_the_package() -> None:
    assert trionats.prometheus is tp  # type: ignore[attr-defined]


async def test_profiler_collector_exports_each_operation_on_the_trio_thread() -> None:
    profiler = trionats.PerformanceProfiler(window=60, windows=3)
    for _ in range(4):
        profiler.record("db.insert", 0.002)
    with pytest.raises(ValueError, match="boom"):
        async with profiler.measure("db.insert"):
            raise ValueError("boom")
    registry = CollectorRegistry()
    registry.register(tp.ProfilerCollector(profiler))
    async with tp.serve(registry=registry) as server:
        head, body = await _get(server.port)
    assert "200 OK" in head
    samples = _samples(body)
    assert _value(samples, "trionats_profiler_operations", operation="db.insert") == 5
    assert _value(samples, "trionats_profiler_errors", operation="db.insert") == 1
    p50 = _value(
        samples, "trionats_profiler_latency_seconds", operation="db.insert", quantile="0.5"
    )
    assert 0.002 <= p50 <= 0.002 * (1 + 1 / 16)
    # off the Trio thread there is no clock to read the windows by: nothing, no error
    from_thread: list[bytes] = []
    await trio.to_thread.run_sync(lambda: from_thread.append(generate_latest(registry)))
    assert b"trionats_profiler" not in from_thread[0]
    with pytest.raises(TypeError, match="PerformanceProfiler"):
        tp.ProfilerCollector(object())  # type: ignore[arg-type]
