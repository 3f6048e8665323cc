"""Prometheus export of a :class:`trionats.ResourceManager` (extra ``prometheus``).

:class:`TrionatsCollector` is a ``prometheus_client`` custom collector: at each scrape it
reads every component registered with the resource manager, the process's figures and
the active alerts, and exposes them with low-cardinality labels (``component``: the name
a component was registered under; ``status``, ``state``, ``reason``, ``direction``: a
handful of fixed values; never a concrete subject). :func:`serve` runs a scrape endpoint
in the caller's nursery (a small Trio HTTP server: structured, cancellable, and the
collector reads the components on the Trio thread, where their figures live).

Latency histograms are exported as Prometheus histograms: each log-linear bucket of a
:class:`trionats.LatencySnapshot` is counted under the first ``le`` bound at or above its
upper bound, so a value may be counted under a bound up to 6.25 % (one source bucket)
above itself, never under one below it.

Example::

    async with trionats.open_resource_manager() as rm:
        rm.register_pool("main", pool)
        async with trionats.prometheus.serve(rm, port=9464) as server:
            print(f"scrape {server.url}")
            await trio.sleep_forever()
"""

from __future__ import annotations

import bisect
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, final

import trio

from . import _errors
from ._profiler import PerformanceProfiler
from ._resources import HealthStatus, ResourceManager, SystemStats
from ._validate import check_int, check_number, check_str

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
    from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry
except ImportError as exc:  # pragma: no cover - the extra is installed in the tests
    raise ImportError(
        "trionats.prometheus needs prometheus-client: pip install 'trionats[prometheus]'"
    ) from exc

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Sequence

    from ._metrics import LatencySnapshot

__all__ = [
    "DEFAULT_BUCKETS",
    "MetricsServer",
    "ProfilerCollector",
    "TrionatsCollector",
    "register",
    "serve",
]

log = logging.getLogger("trionats.prometheus")

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""The ``le`` bounds of the exported histograms, in seconds (``+Inf`` is added)."""


def rebucket(snapshot: LatencySnapshot, bounds: Sequence[float]) -> list[tuple[str, float]]:
    """Prometheus' cumulative ``(le, count)`` pairs for ``snapshot`` over ``bounds``.

    Each source bucket is counted under the first bound at or above its upper bound
    (``+Inf`` when none is).
    """
    counts = [0] * (len(bounds) + 1)
    for upper, n in snapshot.buckets:
        counts[bisect.bisect_left(bounds, upper * (1 - 1e-12))] += n
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip((*bounds, float("inf")), counts, strict=True):
        total += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
    return out


@final
class TrionatsCollector(Collector):
    """A ``prometheus_client`` collector of a resource manager's components.

    Register it with ``registry.register(TrionatsCollector(rm))`` or :func:`register`.
    Scraped on the resource manager's Trio thread (as :func:`serve` does), it reads every
    figure now; scraped from another thread (``prometheus_client.start_http_server``), it
    reports the manager's latest sample.

    Args:
        manager: the resource manager whose components to export.
        buckets: the histograms' ``le`` bounds in seconds, increasing
            (:data:`DEFAULT_BUCKETS` by default).

    Raises:
        TypeError: ``manager`` is not a ResourceManager, ``buckets`` not a sequence of
            numbers.
        ValueError: ``buckets`` is empty, not strictly increasing, or holds a bound that
            is not finite and > 0 (``+Inf`` is always added).
    """

    def __init__(
        self, manager: ResourceManager, *, buckets: Sequence[float] = DEFAULT_BUCKETS
    ) -> None:
        if not isinstance(manager, ResourceManager):
            raise TypeError(
                f"manager must be a trionats.ResourceManager, got {type(manager).__name__}"
            )
        if isinstance(buckets, str | bytes) or not hasattr(buckets, "__iter__"):
            raise TypeError(
                "buckets must be a sequence of numbers of seconds, "
                f"got {type(buckets).__name__}: {buckets!r}"
            )
        # finite (+Inf is added: a second one would repeat the le="+Inf" sample), > 0
        bounds = tuple(
            check_number(f"buckets[{i}]", b, exclusive_minimum=0) for i, b in enumerate(buckets)
        )
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(
                f"buckets must be increasing numbers of seconds > 0, got {tuple(buckets)!r}"
            )
        self._manager = manager
        self._bounds = bounds

    def describe(self) -> list[Metric]:
        """Nothing: the metrics depend on what is registered at scrape time."""
        return []

    def _stats(self) -> SystemStats | None:
        manager = self._manager
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            token = None
        if token is manager._token and not manager.closed:
            return manager.system_stats()
        return manager.last_sample()

    def collect(self) -> Iterator[Metric]:
        """The metric families of every registered component, the process and the alerts."""
        snap = self._stats()
        manager = self._manager
        if snap is not None:
            yield from self._subscribers(snap)
            yield from self._pools(snap)
            yield from self._connections(snap)
            yield from self._process(snap)
            yield from self._health(snap)
        yield CounterMetricFamily(
            "trionats_resource_samples_total",
            "Samples the resource manager took.",
            value=manager.samples,
        )
        yield CounterMetricFamily(
            "trionats_alerts_total",
            "Alerts the resource manager emitted (raised and cleared).",
            value=manager.alerts_emitted,
        )
        yield CounterMetricFamily(
            "trionats_alerts_dropped_total",
            "Alerts dropped because an alert consumer fell behind.",
            value=manager.alerts_dropped,
        )

    def _histogram(
        self, name: str, doc: str, label: str, items: list[tuple[str, LatencySnapshot]]
    ) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=[label])
        for component, snap in items:
            family.add_metric([component], rebucket(snap, self._bounds), snap.sum)
        return family

    def _subscribers(self, snap: SystemStats) -> Iterator[Metric]:
        subs = snap.subscribers
        if not subs:
            return
        received = CounterMetricFamily(
            "trionats_messages_received_total",
            "Messages delivered to a subscriber's subscriptions.",
            labels=["component"],
        )
        processed = CounterMetricFamily(
            "trionats_messages_processed_total",
            "Messages a subscriber finished with, by outcome "
            "(processed, failed, timed_out, dropped).",
            labels=["component", "status"],
        )
        in_flight = GaugeMetricFamily(
            "trionats_messages_in_flight", "Handlers running now.", labels=["component"]
        )
        pending = GaugeMetricFamily(
            "trionats_messages_pending",
            "Messages buffered, waiting for a free worker.",
            labels=["component"],
        )
        pending_bytes = GaugeMetricFamily(
            "trionats_messages_pending_bytes",
            "Payload bytes of the messages buffered.",
            labels=["component"],
        )
        workers = GaugeMetricFamily(
            "trionats_subscriber_max_workers",
            "The subscriber's max_workers.",
            labels=["component"],
        )
        active = GaugeMetricFamily(
            "trionats_subscriptions_active", "Running subscriptions.", labels=["component"]
        )
        for s in subs:
            st = s.stats
            received.add_metric([s.name], st.received)
            for status, value in (
                ("processed", st.processed),
                ("failed", st.failed),
                ("timed_out", st.timed_out),
                ("dropped", st.dropped),
            ):
                processed.add_metric([s.name, status], value)
            in_flight.add_metric([s.name], st.in_flight)
            pending.add_metric([s.name], st.pending)
            pending_bytes.add_metric([s.name], st.pending_bytes)
            workers.add_metric([s.name], s.max_workers)
            active.add_metric([s.name], st.active)
        yield from (received, processed, in_flight, pending, pending_bytes, workers, active)
        yield self._histogram(
            "trionats_handler_duration_seconds",
            "How long handler runs took (every outcome).",
            "component",
            [(s.name, s.stats.handler_duration) for s in subs],
        )

    def _pools(self, snap: SystemStats) -> Iterator[Metric]:
        pools = snap.pools
        if not pools:
            return
        connections = GaugeMetricFamily(
            "trionats_pool_connections",
            "A pool's connections by state (idle, borrowed, dialing).",
            labels=["component", "state"],
        )
        waiting = GaugeMetricFamily(
            "trionats_pool_waiting_borrowers",
            "Borrowers queued for a connection now.",
            labels=["component"],
        )
        reuse = GaugeMetricFamily(
            "trionats_pool_reuse_ratio",
            "reused / (reused + created) since the pool opened.",
            labels=["component"],
        )
        counters = {
            field: CounterMetricFamily(name, doc, labels=["component"])
            for field, name, doc in (
                ("created", "trionats_pool_connections_created_total", "Connections dialed."),
                (
                    "reused",
                    "trionats_pool_connections_reused_total",
                    "Borrows served from an idle connection.",
                ),
                ("dial_failures", "trionats_pool_dial_failures_total", "Dials that failed."),
                ("waits", "trionats_pool_waits_total", "Borrows that had to queue."),
                (
                    "timeouts",
                    "trionats_pool_borrow_timeouts_total",
                    "Borrows that failed with PoolTimeoutError.",
                ),
                (
                    "leaks_detected",
                    "trionats_pool_leaks_detected_total",
                    "Leases held past leak_timeout.",
                ),
            )
        }
        closed = CounterMetricFamily(
            "trionats_pool_connections_closed_total",
            "Connections the pool closed, by reason.",
            labels=["component", "reason"],
        )
        for p in pools:
            st = p.stats
            for state, value in (
                ("idle", st.idle),
                ("borrowed", st.borrowed),
                ("dialing", st.dialing),
            ):
                connections.add_metric([p.name, state], value)
            waiting.add_metric([p.name], st.waiting)
            reuse.add_metric([p.name], st.reuse_rate)
            for field, family in counters.items():
                family.add_metric([p.name], getattr(st, field))
            for reason in ("expired", "unhealthy", "overflow", "shutdown"):
                closed.add_metric([p.name, reason], getattr(st.closed, reason))
        yield from (connections, waiting, reuse, *counters.values(), closed)
        yield self._histogram(
            "trionats_pool_wait_seconds",
            "How long queued borrows waited for a connection.",
            "component",
            [(p.name, p.stats.wait_time) for p in pools],
        )

    def _connections(self, snap: SystemStats) -> Iterator[Metric]:
        conns = snap.connections
        if not conns:
            return
        messages = CounterMetricFamily(
            "trionats_connection_messages_total",
            "Messages a connection received (in) and published (out).",
            labels=["component", "direction"],
        )
        payload = CounterMetricFamily(
            "trionats_connection_bytes_total",
            "Payload bytes a connection received (in) and published (out).",
            labels=["component", "direction"],
        )
        reconnects = CounterMetricFamily(
            "trionats_connection_reconnects_total",
            "Successful reconnections.",
            labels=["component"],
        )
        dropped = CounterMetricFamily(
            "trionats_connection_dropped_messages_total",
            "Messages dropped at a subscription's pending limits (slow consumer).",
            labels=["component"],
        )
        up = GaugeMetricFamily(
            "trionats_connection_up", "1 while connected to a server.", labels=["component"]
        )
        for c in conns:
            st = c.stats
            messages.add_metric([c.name, "in"], st.in_msgs)
            messages.add_metric([c.name, "out"], st.out_msgs)
            payload.add_metric([c.name, "in"], st.in_bytes)
            payload.add_metric([c.name, "out"], st.out_bytes)
            reconnects.add_metric([c.name], st.reconnects)
            dropped.add_metric([c.name], st.dropped)
            up.add_metric([c.name], 1 if c.connected else 0)
        yield from (messages, payload, reconnects, dropped, up)

    def _process(self, snap: SystemStats) -> Iterator[Metric]:
        p = snap.process
        yield GaugeMetricFamily(
            "trionats_process_resident_memory_bytes", "Resident memory.", value=p.rss_bytes
        )
        yield GaugeMetricFamily(
            "trionats_process_open_fds", "Open file descriptors.", value=p.open_fds
        )
        if p.max_fds is not None:
            yield GaugeMetricFamily(
                "trionats_process_max_fds", "The open file descriptor limit.", value=p.max_fds
            )
        yield CounterMetricFamily(
            "trionats_process_cpu_seconds_total", "User + system CPU time.", value=p.cpu_seconds
        )
        yield GaugeMetricFamily("trionats_process_threads", "OS threads.", value=p.threads)
        yield GaugeMetricFamily("trionats_trio_tasks", "Living Trio tasks.", value=p.trio_tasks)
        yield GaugeMetricFamily(
            "trionats_asyncio_tasks",
            "Unfinished asyncio tasks on the trio-asyncio loops the manager knows.",
            value=p.asyncio_tasks,
        )
        gc = CounterMetricFamily(
            "trionats_gc_collections_total",
            "Garbage collections, by generation.",
            labels=["generation"],
        )
        for generation, count in enumerate(p.gc_collections):
            gc.add_metric([str(generation)], count)
        yield gc

    def _health(self, snap: SystemStats) -> Iterator[Metric]:
        health = GaugeMetricFamily(
            "trionats_health",
            "1 for the component's health status (healthy, degraded, unhealthy), 0 for the others.",
            labels=["component", "kind", "status"],
        )
        for c in snap.health.components:
            for status in HealthStatus:
                health.add_metric([c.name, c.kind, status.value], 1 if c.status is status else 0)
        yield health
        overall = GaugeMetricFamily(
            "trionats_health_overall",
            "1 for the process's overall health status, 0 for the others.",
            labels=["status"],
        )
        for status in HealthStatus:
            overall.add_metric([status.value], 1 if snap.health.status is status else 0)
        yield overall
        alerts = GaugeMetricFamily(
            "trionats_alert_active",
            "1 for each figure over its limit now (its value is in the alert's figure).",
            labels=["component", "kind", "figure", "severity"],
        )
        for a in snap.alerts:
            alerts.add_metric([a.component, a.kind, a.figure, a.severity.value], 1)
        yield alerts


@final
class ProfilerCollector(Collector):
    """A ``prometheus_client`` collector of a :class:`trionats.PerformanceProfiler`.

    Every operation the profiler tracks, labelled ``operation="<name>"``, over the windows
    it keeps (so these are gauges, not counters): ``trionats_profiler_operations``,
    ``trionats_profiler_errors``, ``trionats_profiler_throughput`` (per second),
    ``trionats_profiler_latency_seconds{quantile="0.5|0.9|0.99"}`` and
    ``trionats_profiler_latency_trend_ratio`` (the recent window's median latency over
    the earlier windows'; NaN until both have samples). The profiler runs on Trio's
    clock, so it is read only when scraped on its Trio thread (as :func:`serve` does);
    a scrape from another thread gets none of these metrics.

    Example::

        registry = prometheus_client.CollectorRegistry()
        registry.register(trionats.prometheus.ProfilerCollector(profiler))
        async with trionats.prometheus.serve(rm, registry=registry) as server: ...

    Raises:
        TypeError: ``profiler`` is not a PerformanceProfiler.
    """

    def __init__(self, profiler: PerformanceProfiler) -> None:
        if not isinstance(profiler, PerformanceProfiler):
            raise TypeError(
                f"profiler must be a trionats.PerformanceProfiler, got {type(profiler).__name__}"
            )
        self._profiler = profiler

    def describe(self) -> list[Metric]:
        """Nothing: the operations are known at scrape time."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The profiler's figures per operation (nothing off its Trio thread)."""
        try:
            report = self._profiler.report()
        except RuntimeError:  # not in a Trio thread: no clock to read the windows by
            return
        ops = GaugeMetricFamily(
            "trionats_profiler_operations",
            "Operations completed (successes and errors) over the profiler's windows.",
            labels=["operation"],
        )
        errors = GaugeMetricFamily(
            "trionats_profiler_errors",
            "Operations that raised, over the profiler's windows.",
            labels=["operation"],
        )
        rate = GaugeMetricFamily(
            "trionats_profiler_throughput",
            "Operations per second over the profiler's windows.",
            labels=["operation"],
        )
        latency = GaugeMetricFamily(
            "trionats_profiler_latency_seconds",
            "Latency quantiles of the successful operations over the profiler's windows.",
            labels=["operation", "quantile"],
        )
        trend = GaugeMetricFamily(
            "trionats_profiler_latency_trend_ratio",
            "The latest complete window's median latency over the earlier windows'.",
            labels=["operation"],
        )
        for op in report.operations:
            ops.add_metric([op.name], op.count)
            errors.add_metric([op.name], op.errors)
            rate.add_metric([op.name], op.throughput)
            for q, value in (("0.5", op.p50), ("0.9", op.p90), ("0.99", op.p99)):
                latency.add_metric([op.name, q], value)
            trend.add_metric([op.name], op.trend.ratio)
        yield from (ops, errors, rate, latency, trend)


def register(
    manager: ResourceManager,
    registry: CollectorRegistry = REGISTRY,
    *,
    buckets: Sequence[float] = DEFAULT_BUCKETS,
) -> TrionatsCollector:
    """Register a :class:`TrionatsCollector` of ``manager`` with ``registry``; returns it.

    ``registry.unregister(collector)`` removes it again.
    """
    collector = TrionatsCollector(manager, buckets=buckets)
    registry.register(collector)
    return collector


@final
@dataclass(frozen=True, slots=True)
class MetricsServer:
    """A running scrape endpoint (from :func:`serve`).

    Attributes:
        host: the address it listens on.
        port: the port it listens on (the real one when 0 was asked for).
    """

    host: str
    port: int

    @property
    def url(self) -> str:
        """``http://host:port/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"


_MAX_REQUEST = 16 * 1024
_REQUEST_TIMEOUT = 10.0


def _response(
    status: str,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    *,
    head_only: bool = False,
) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + (b"" if head_only else body)


async def _handle(stream: trio.SocketStream, registry: CollectorRegistry) -> None:
    try:
        async with stream:
            with trio.move_on_after(_REQUEST_TIMEOUT):
                data = b""
                while b"\r\n\r\n" not in data and b"\n\n" not in data:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    data += chunk
                    if len(data) > _MAX_REQUEST:
                        await stream.send_all(_response("431 Request Too Large", b"too large\n"))
                        return
                parts = data.split(b"\n", 1)[0].decode("latin-1").split()
                method = parts[0] if parts else ""
                path = parts[1].split("?", 1)[0] if len(parts) > 1 else ""
                if method not in ("GET", "HEAD"):
                    reply = _response("405 Method Not Allowed", b"GET /metrics\n")
                elif path not in ("/metrics", "/"):
                    reply = _response("404 Not Found", b"GET /metrics\n")
                else:
                    try:
                        body = generate_latest(registry)
                    except Exception as exc:
                        log.exception("collecting metrics failed")
                        reply = _response(
                            "500 Internal Server Error", f"{type(exc).__name__}\n".encode()
                        )
                    else:
                        reply = _response(
                            "200 OK", body, CONTENT_TYPE_LATEST, head_only=method == "HEAD"
                        )
                await stream.send_all(reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the scraper went away


@asynccontextmanager
async def serve(
    manager: ResourceManager | None = None,
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    registry: CollectorRegistry | None = None,
    buckets: Sequence[float] = DEFAULT_BUCKETS,
) -> AsyncIterator[MetricsServer]:
    """Serve ``GET /metrics`` (Prometheus text format) for the duration of the block.

    A small HTTP/1.1 server (one request per connection) runs in its own nursery on the
    caller's Trio thread, so the collector reads the components where they live; leaving
    the block closes the listener and every scrape in progress.

    What is served: ``manager``'s collector in a registry of its own when ``registry`` is
    None; otherwise ``registry``, with ``manager``'s collector (if given) registered in it
    for the duration of the block (pass ``prometheus_client.REGISTRY`` to serve the
    default process and platform collectors too).

    Example::

        async with trionats.prometheus.serve(rm, port=0) as server:
            print(server.url)

    Args:
        manager: the resource manager to export.
        port: the TCP port; 0 picks a free one (``server.port`` is the real one).
        host: the address to listen on (default: loopback only).
        registry: the registry to serve (see above).
        buckets: the histograms' ``le`` bounds (see :class:`TrionatsCollector`).

    Raises:
        TypeError: neither ``manager`` nor ``registry`` given, or a wrong type.
        ValueError: ``port`` outside 0..65535, or ``host`` empty.
        OSError: the port cannot be bound.
    """
    check_int("port", port, minimum=0)
    if port > 65535:
        raise ValueError(f"port must be in 0..65535, got {port!r}")
    check_str("host", host)
    if manager is None and registry is None:
        raise TypeError("serve needs a ResourceManager, a CollectorRegistry, or both")
    if registry is not None and not isinstance(registry, CollectorRegistry):
        raise TypeError(
            f"registry must be a prometheus_client CollectorRegistry, got {type(registry).__name__}"
        )
    collector = None if manager is None else TrionatsCollector(manager, buckets=buckets)
    served = registry if registry is not None else CollectorRegistry(auto_describe=False)
    if collector is not None:
        served.register(collector)
    try:
        async with trio.open_nursery() as nursery:

            async def handler(stream: trio.SocketStream) -> None:
                await _handle(stream, served)

            listeners = await nursery.start(partial(trio.serve_tcp, handler, port, host=host))
            sockname = listeners[0].socket.getsockname()
            try:
                yield MetricsServer(host=host, port=int(sockname[1]))
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Only the level our nursery added: a group the block raised comes out intact.
        _errors.reraise_unwrapped(group, 1)
    finally:
        if collector is not None:
            served.unregister(collector)
