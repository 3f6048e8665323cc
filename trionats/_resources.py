"""The resource manager: one place that watches every pool, subscriber and connection.

:func:`open_resource_manager` opens a :class:`ResourceManager` whose sampler runs in the
manager's own nursery. Components are registered by name; every ``interval`` seconds the
sampler takes a :class:`SystemStats` (each component's counters and gauges, and the
process's figures from ``psutil``), checks it against the :class:`Limits`, emits an
:class:`Alert` for every figure that crosses its limit (and one when it clears), and, when
asked to, publishes the snapshot as JSON on a NATS subject for ``trionats top``.

Rates (throughput, drop rate, failure rate, windowed p99) are the difference between two
successive samples divided by the time between them (the *window*): the first sample
after a component is registered covers the time since its registration.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import json
import logging
import os
import secrets
import socket
import sys
import time
import weakref
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, final

import trio

from . import _errors
from ._metrics import EMPTY, LatencySnapshot, _quantile
from ._validate import check_int, check_number, check_str

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from types import TracebackType

    from ._connection import Connection, ConnectionStats
    from ._pool import Pool, PoolStats
    from ._subscriber import Subscriber, SubscriberStats

__all__ = [
    "Alert",
    "AlertStream",
    "ComponentHealth",
    "ConnectionSnapshot",
    "Health",
    "HealthStatus",
    "Limits",
    "PoolSnapshot",
    "ProcessStats",
    "Registration",
    "ResourceManager",
    "Severity",
    "SubscriberSnapshot",
    "Suggestion",
    "SystemStats",
    "open_resource_manager",
]

log = logging.getLogger("trionats.resources")

SCHEMA: Final = "io.trionats.resource_stats.v1"
"""The ``type`` field of every published snapshot (see ``docs/production.md``)."""

PROCESS: Final = "process"
"""The component name of the process's own figures (reserved: no component may take it)."""

Kind = Literal["pool", "subscriber", "connection", "process"]


class Severity(enum.Enum):
    """How far past its limit a figure is.

    ``WARNING``: above the limit; ``CRITICAL``: at ``Limits.critical_factor`` times the
    limit or more (a limit of 0 never escalates), or a component that closed.
    """

    WARNING = "warning"
    CRITICAL = "critical"


class HealthStatus(enum.Enum):
    """A component's (or the whole process's) health, best first."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


_RANK = {HealthStatus.HEALTHY: 0, HealthStatus.DEGRADED: 1, HealthStatus.UNHEALTHY: 2}


# -- limits ---------------------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class Limits:
    """The thresholds the sampler checks at each interval; None turns one off.

    A figure *crosses* its limit when it is strictly above it. Rates are measured over the
    window between two samples.

    Attributes:
        max_borrowed: connections a pool lends out at once.
        max_open_connections: a pool's open connections (idle + borrowed + dialing).
        max_pool_wait: seconds: the p99 of the time borrows queued in the window.
        max_pending_msgs: messages a subscriber buffers, waiting for a worker.
        max_pending_bytes: payload bytes of those messages.
        max_drop_rate: messages dropped per second (a subscriber over its pending limits,
            a connection's slow-consumer drops); 0.0, the default: any drop.
        max_failure_rate: the fraction (0..1) of the handler runs finished in the window
            that failed or timed out.
        max_handler_p99: seconds: the p99 of the handler run times in the window.
        max_rss_bytes: the process's resident memory.
        max_open_fds: the process's open file descriptors (handles on Windows).
        max_tasks: living Trio tasks.
        critical_factor: a figure at this many times its limit (or more) is
            :attr:`Severity.CRITICAL`, above the limit it is a ``WARNING``.

    Raises:
        TypeError: a field has the wrong type; the message names it.
        ValueError: a field is negative (or ``critical_factor`` below 1).
    """

    max_borrowed: int | None = None
    max_open_connections: int | None = None
    max_pool_wait: float | None = 1.0
    max_pending_msgs: int | None = None
    max_pending_bytes: int | None = None
    max_drop_rate: float | None = 0.0
    max_failure_rate: float | None = 0.1
    max_handler_p99: float | None = None
    max_rss_bytes: int | None = None
    max_open_fds: int | None = None
    max_tasks: int | None = None
    critical_factor: float = 2.0

    def __post_init__(self) -> None:
        for name in (
            "max_borrowed",
            "max_open_connections",
            "max_pending_msgs",
            "max_pending_bytes",
            "max_rss_bytes",
            "max_open_fds",
            "max_tasks",
        ):
            check_int(f"Limits.{name}", getattr(self, name), minimum=0, allow_none=True)
        for name in ("max_pool_wait", "max_drop_rate", "max_handler_p99"):
            value = check_number(f"Limits.{name}", getattr(self, name), minimum=0, allow_none=True)
            object.__setattr__(self, name, value)
        rate = check_number(
            "Limits.max_failure_rate", self.max_failure_rate, minimum=0, maximum=1, allow_none=True
        )
        object.__setattr__(self, "max_failure_rate", rate)
        factor = check_number("Limits.critical_factor", self.critical_factor, minimum=1)
        object.__setattr__(self, "critical_factor", factor)


# -- snapshots ------------------------------------------------------------------------


def window_latency(now: LatencySnapshot, before: LatencySnapshot | None) -> LatencySnapshot:
    """The values ``now`` recorded since ``before`` (two snapshots of one histogram).

    Bucket counts are subtracted; ``max`` is the upper bound of the highest bucket that
    grew, clamped to the histogram's maximum.
    """
    if before is None or not before.count:
        return now
    if now.count <= before.count:
        return EMPTY
    previous = dict(before.buckets)
    buckets = tuple(
        (bound, n - previous.get(bound, 0))
        for bound, n in now.buckets
        if n > previous.get(bound, 0)
    )
    count = now.count - before.count
    if not buckets:  # pragma: no cover - counts grew, so some bucket did
        return EMPTY
    top = min(buckets[-1][0], now.max)
    return LatencySnapshot(
        count=count,
        sum=max(0.0, now.sum - before.sum),
        max=top,
        p50=_quantile(buckets, count, top, 0.5),
        p90=_quantile(buckets, count, top, 0.9),
        p99=_quantile(buckets, count, top, 0.99),
        buckets=buckets,
    )


def _per_second(count: int, window: float) -> float:
    return count / window if window > 0 else 0.0


def _latency_dict(snap: LatencySnapshot) -> dict[str, float]:
    return {"count": snap.count, "p50": snap.p50, "p90": snap.p90, "p99": snap.p99, "max": snap.max}


@final
@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """One pool at one sample.

    Attributes:
        name: the name it was registered under.
        stats: its cumulative :class:`trionats.PoolStats`.
        closed: True once the pool is closing or closed.
        window: seconds since the previous sample (since registration for the first).
        created: connections dialed in the window.
        reused: borrows served from an idle connection in the window.
        waits: borrows that queued in the window.
        timeouts: borrow timeouts in the window.
        dial_failures: failed dials in the window.
        leaks_detected: leases reported as leaks in the window.
        wait_time: the time borrows queued in the window, as a histogram.
        idle_per_server: the pool's configured ``idle_per_server``.
        max_per_server: the pool's configured ``max_per_server`` (None: no cap).
    """

    name: str
    stats: PoolStats
    closed: bool
    window: float
    created: int
    reused: int
    waits: int
    timeouts: int
    dial_failures: int
    leaks_detected: int
    wait_time: LatencySnapshot
    idle_per_server: int
    max_per_server: int | None

    @property
    def open_connections(self) -> int:
        """Idle + borrowed + dialing connections, now."""
        return self.stats.idle + self.stats.borrowed + self.stats.dialing

    @property
    def borrows(self) -> int:
        """Borrows served in the window (dialed or reused)."""
        return self.created + self.reused

    @property
    def reuse_rate(self) -> float:
        """``reused / borrows`` in the window (0.0 without borrows)."""
        return self.reused / self.borrows if self.borrows else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (the published schema's ``pools`` entries)."""
        s = self.stats
        return {
            "name": self.name,
            "closed": self.closed,
            "window": self.window,
            "idle": s.idle,
            "borrowed": s.borrowed,
            "dialing": s.dialing,
            "waiting": s.waiting,
            "open": self.open_connections,
            "created_total": s.created,
            "reused_total": s.reused,
            "reuse_rate_total": s.reuse_rate,
            "borrows": self.borrows,
            "reuse_rate": self.reuse_rate,
            "waits": self.waits,
            "timeouts": self.timeouts,
            "dial_failures": self.dial_failures,
            "leaks_detected": self.leaks_detected,
            "wait_time": _latency_dict(self.wait_time),
        }


@final
@dataclass(frozen=True, slots=True)
class SubscriberSnapshot:
    """One subscriber at one sample.

    Attributes:
        name: the name it was registered under.
        stats: its cumulative :class:`trionats.SubscriberStats`.
        closed: True once its ``open_subscriber`` block has exited.
        window: seconds since the previous sample (since registration for the first).
        received: messages received in the window.
        processed: handlers that returned normally in the window.
        failed: handlers that raised in the window.
        timed_out: handlers that timed out in the window.
        dropped: messages dropped in the window.
        handler_duration: handler run times in the window, as a histogram.
        max_workers: the subscriber's configured ``max_workers``.
    """

    name: str
    stats: SubscriberStats
    closed: bool
    window: float
    received: int
    processed: int
    failed: int
    timed_out: int
    dropped: int
    handler_duration: LatencySnapshot
    max_workers: int

    @property
    def throughput(self) -> float:
        """Handlers finished per second (any outcome) in the window."""
        return _per_second(self.processed + self.failed + self.timed_out, self.window)

    @property
    def drop_rate(self) -> float:
        """Messages dropped per second in the window."""
        return _per_second(self.dropped, self.window)

    @property
    def failure_rate(self) -> float:
        """``(failed + timed_out) / finished`` in the window (0.0 when none finished)."""
        finished = self.processed + self.failed + self.timed_out
        return (self.failed + self.timed_out) / finished if finished else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (the published schema's ``subscribers`` entries)."""
        s = self.stats
        return {
            "name": self.name,
            "closed": self.closed,
            "window": self.window,
            "received_total": s.received,
            "processed_total": s.processed,
            "failed_total": s.failed,
            "timed_out_total": s.timed_out,
            "dropped_total": s.dropped,
            "in_flight": s.in_flight,
            "pending": s.pending,
            "pending_bytes": s.pending_bytes,
            "active": s.active,
            "max_workers": self.max_workers,
            "received": self.received,
            "processed": self.processed,
            "failed": self.failed,
            "timed_out": self.timed_out,
            "dropped": self.dropped,
            "throughput": self.throughput,
            "drop_rate": self.drop_rate,
            "failure_rate": self.failure_rate,
            "handler_duration": _latency_dict(self.handler_duration),
        }


@final
@dataclass(frozen=True, slots=True)
class ConnectionSnapshot:
    """One connection at one sample.

    Attributes:
        name: the name it was registered under.
        stats: its cumulative :class:`trionats.ConnectionStats`.
        connected: True while connected to a server.
        closed: True once the connection is closed.
        window: seconds since the previous sample (since registration for the first).
        in_msgs: messages received in the window.
        out_msgs: messages published in the window.
        dropped: messages dropped (slow consumer) in the window.
        reconnects: reconnections in the window.
    """

    name: str
    stats: ConnectionStats
    connected: bool
    closed: bool
    window: float
    in_msgs: int
    out_msgs: int
    dropped: int
    reconnects: int

    @property
    def in_rate(self) -> float:
        """Messages received per second in the window."""
        return _per_second(self.in_msgs, self.window)

    @property
    def out_rate(self) -> float:
        """Messages published per second in the window."""
        return _per_second(self.out_msgs, self.window)

    @property
    def drop_rate(self) -> float:
        """Messages dropped per second in the window."""
        return _per_second(self.dropped, self.window)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (the published schema's ``connections`` entries)."""
        s = self.stats
        return {
            "name": self.name,
            "connected": self.connected,
            "closed": self.closed,
            "window": self.window,
            "in_msgs_total": s.in_msgs,
            "out_msgs_total": s.out_msgs,
            "in_bytes_total": s.in_bytes,
            "out_bytes_total": s.out_bytes,
            "reconnects_total": s.reconnects,
            "dropped_total": s.dropped,
            "in_rate": self.in_rate,
            "out_rate": self.out_rate,
            "drop_rate": self.drop_rate,
            "reconnects": self.reconnects,
        }


@final
@dataclass(frozen=True, slots=True)
class ProcessStats:
    """The process's own figures (``psutil``, ``os.times()``, ``gc``, Trio and asyncio).

    Attributes:
        pid: the process id.
        rss_bytes: resident memory.
        open_fds: open file descriptors (handles on Windows).
        max_fds: the soft limit on open file descriptors, None where unknown.
        cpu_seconds: user + system CPU time used since the process started.
        cpu_percent: CPU used in the window, in percent of one core.
        threads: OS threads.
        trio_tasks: living Trio tasks.
        asyncio_tasks: unfinished asyncio tasks on the trio-asyncio loops the manager
            knows (its own context's and each registered connection's).
        gc_collections: collections run so far, per generation.
        gc_pending: objects counted towards the next collection, per generation
            (``gc.get_count()``).
    """

    pid: int
    rss_bytes: int
    open_fds: int
    max_fds: int | None
    cpu_seconds: float
    cpu_percent: float
    threads: int
    trio_tasks: int
    asyncio_tasks: int
    gc_collections: tuple[int, ...]
    gc_pending: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (the published schema's ``process`` entry)."""
        return {
            "pid": self.pid,
            "rss_bytes": self.rss_bytes,
            "open_fds": self.open_fds,
            "max_fds": self.max_fds,
            "cpu_seconds": self.cpu_seconds,
            "cpu_percent": self.cpu_percent,
            "threads": self.threads,
            "trio_tasks": self.trio_tasks,
            "asyncio_tasks": self.asyncio_tasks,
            "gc_collections": list(self.gc_collections),
            "gc_pending": list(self.gc_pending),
        }


@final
@dataclass(frozen=True, slots=True)
class Alert:
    """A figure crossed its limit, or came back under it (``cleared``).

    Attributes:
        component: the component's name (``"process"`` for the process's figures).
        kind: ``"pool"``, ``"subscriber"``, ``"connection"`` or ``"process"``.
        figure: the figure's name (``"drop_rate"``, ``"wait_p99"``, ``"closed"``...).
        value: the figure at the sample that raised (or cleared) the alert.
        limit: the limit it crossed.
        severity: the level reached; for a cleared alert, the level it left.
        cleared: True when the figure came back under its limit.
        time: the sample's wall-clock time (``time.time()``).
    """

    component: str
    kind: str
    figure: str
    value: float
    limit: float
    severity: Severity
    cleared: bool = False
    time: float = 0.0

    @property
    def message(self) -> str:
        """One line for a human: ``"subscriber 'orders' drop_rate 12.5 > 0 (warning)"``."""
        who = PROCESS if self.kind == PROCESS else f"{self.kind} {self.component!r}"
        if self.cleared:
            return f"{who} {self.figure} {_num(self.value)} back within {_num(self.limit)}"
        return (
            f"{who} {self.figure} {_num(self.value)} > {_num(self.limit)} ({self.severity.value})"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the published schema's ``alerts`` entries)."""
        return {
            "component": self.component,
            "kind": self.kind,
            "figure": self.figure,
            "value": self.value,
            "limit": self.limit,
            "severity": self.severity.value,
            "cleared": self.cleared,
            "time": self.time,
            "message": self.message,
        }


def _num(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.3g}"


@final
@dataclass(frozen=True, slots=True)
class ComponentHealth:
    """One component's health and why.

    Attributes:
        name: the component's name (``"process"`` for the process).
        kind: ``"pool"``, ``"subscriber"``, ``"connection"`` or ``"process"``.
        status: healthy, degraded or unhealthy.
        reasons: why it is not healthy (empty when it is).
    """

    name: str
    kind: str
    status: HealthStatus
    reasons: tuple[str, ...] = ()


@final
@dataclass(frozen=True, slots=True)
class Health:
    """The overall health (the worst of the components') and each component's.

    Attributes:
        status: the worst status of any component.
        components: every registered component, then the process.
    """

    status: HealthStatus
    components: tuple[ComponentHealth, ...]

    @property
    def reasons(self) -> tuple[str, ...]:
        """Every component's reasons, each prefixed with the component's name."""
        return tuple(
            f"{PROCESS if c.kind == PROCESS else f'{c.kind} {c.name!r}'}: {r}"
            for c in self.components
            for r in c.reasons
        )

    def component(self, name: str) -> ComponentHealth:
        """The health of the component called ``name``.

        Raises:
            KeyError: no such component.
        """
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)


@final
@dataclass(frozen=True, slots=True)
class Suggestion:
    """A tuning advice from one of the resource manager's rules.

    Attributes:
        component: the component's name (``"process"`` for the process).
        kind: ``"pool"``, ``"subscriber"``, ``"connection"`` or ``"process"``.
        rule: the rule's name (see ``docs/production.md``).
        figure: the figure that triggered it.
        value: that figure's value.
        threshold: the threshold the rule compares it to.
        text: the advice, one line.
    """

    component: str
    kind: str
    rule: str
    figure: str
    value: float
    threshold: float
    text: str

    def __str__(self) -> str:
        return self.text


@final
@dataclass(frozen=True, slots=True)
class SystemStats:
    """Every registered component and the process at one instant.

    Attributes:
        time: wall-clock time of the snapshot (``time.time()``).
        pools: every registered pool, in registration order.
        subscribers: every registered subscriber, in registration order.
        connections: every registered connection, in registration order.
        process: the process's figures.
        alerts: the alerts active after the latest sample (figures still over a limit).
        samples: samples the manager has taken so far.
    """

    time: float
    pools: tuple[PoolSnapshot, ...]
    subscribers: tuple[SubscriberSnapshot, ...]
    connections: tuple[ConnectionSnapshot, ...]
    process: ProcessStats
    alerts: tuple[Alert, ...] = ()
    samples: int = 0
    health: Health = field(default_factory=lambda: Health(HealthStatus.HEALTHY, ()), compare=False)

    def component(self, name: str) -> PoolSnapshot | SubscriberSnapshot | ConnectionSnapshot:
        """The snapshot of the component called ``name``.

        Raises:
            KeyError: no such component.
        """
        snaps: tuple[PoolSnapshot | SubscriberSnapshot | ConnectionSnapshot, ...] = (
            *self.pools,
            *self.subscribers,
            *self.connections,
        )
        for snap in snaps:
            if snap.name == name:
                return snap
        raise KeyError(name)

    def _with_health(self, figures: dict[str, Any]) -> dict[str, Any]:
        for c in self.health.components:
            if c.name == figures["name"]:
                figures["health"] = c.status.value
                figures["health_reasons"] = list(c.reasons)
        return figures

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures: the body of a published snapshot, minus its envelope."""
        return {
            "time": self.time,
            "samples": self.samples,
            "health": self.health.status.value,
            "health_reasons": list(self.health.reasons),
            "process": self.process.to_dict(),
            "pools": [self._with_health(p.to_dict()) for p in self.pools],
            "subscribers": [self._with_health(s.to_dict()) for s in self.subscribers],
            "connections": [self._with_health(c.to_dict()) for c in self.connections],
            "alerts": [a.to_dict() for a in self.alerts],
        }


# -- registration ---------------------------------------------------------------------


class _Entry:
    """A registered component and its figures at the previous sample."""

    __slots__ = ("kind", "last", "name", "obj", "prev", "prev_time")

    def __init__(self, name: str, kind: Kind, obj: Any, now: float) -> None:
        self.name = name
        self.kind = kind
        self.obj = obj
        self.prev: Any = None
        self.prev_time = now
        self.last: Any = None  # the last stats read (kept when the component breaks)


@final
class Registration:
    """What ``register_*`` returns: ``with`` it to unregister when the block exits.

    Example::

        with rm.register_subscriber("orders", subscriber):
            ...  # sampled here
        # no longer sampled
    """

    __slots__ = ("_entry", "_manager")

    def __init__(self, manager: ResourceManager, entry: _Entry) -> None:
        self._manager = manager
        self._entry = entry

    @property
    def name(self) -> str:
        """The component's name."""
        return self._entry.name

    def unregister(self) -> None:
        """Stop sampling the component (nothing happens if it is no longer registered)."""
        if self._manager._entries.get(self._entry.name) is self._entry:
            self._manager.unregister(self._entry.name)

    def __enter__(self) -> Registration:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unregister()

    def __repr__(self) -> str:
        return f"<trionats.Registration {self._entry.kind} {self._entry.name!r}>"


# -- alerts ---------------------------------------------------------------------------


@final
class AlertStream:
    """Every alert emitted after it was created, in order; from :meth:`ResourceManager.alerts`.

    Iterate with ``async for``; iteration ends when the resource manager closes (after
    the buffered alerts). Each stream has its own bounded buffer: when the consumer falls
    behind, new alerts are dropped and counted in :attr:`dropped` (the sampler never
    waits for a consumer). Use it as ``async with rm.alerts() as alerts:`` to stop
    receiving at the end of the block; a stream that is no longer referenced stops by
    itself.
    """

    __slots__ = ("__weakref__", "_buffer", "_closed", "_lot", "_size", "dropped")

    def __init__(self, size: int) -> None:
        self._buffer: deque[Alert] = deque()
        self._size = size
        self._closed = False
        self._lot = trio.lowlevel.ParkingLot()
        self.dropped = 0
        """Alerts dropped because the buffer was full."""

    def _put(self, alert: Alert) -> None:
        if self._closed:
            return
        if len(self._buffer) >= self._size:
            self.dropped += 1
            return
        self._buffer.append(alert)
        self._lot.unpark_all()

    def _end(self) -> None:
        self._closed = True
        self._lot.unpark_all()

    def close(self) -> None:
        """Stop receiving: buffered alerts are discarded and iteration ends."""
        self._buffer.clear()
        self._end()

    def __aiter__(self) -> AlertStream:
        return self

    async def __anext__(self) -> Alert:
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            await self._lot.park()
        alert = self._buffer.popleft()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return alert

    async def __aenter__(self) -> AlertStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<trionats.AlertStream buffered={len(self._buffer)} dropped={self.dropped}>"


# -- the process's figures ------------------------------------------------------------


class _ProcessProbe:
    """Reads the process's figures; CPU percent over the window between two reads."""

    def __init__(self, now: float) -> None:
        import importlib

        # psutil ships no type hints (types-psutil is not a dependency)
        psutil: Any = importlib.import_module("psutil")
        self._process = psutil.Process()
        self._prev_cpu = self._cpu()
        self._prev_time = now
        self._max_fds = _max_fds()

    @staticmethod
    def _cpu() -> float:
        # os.times(), not psutil's cpu_times(): reading /proc/self/stat costs milliseconds
        # on some kernels, getrusage microseconds.
        times = os.times()
        return times.user + times.system

    def read(self, now: float, loops: set[Any], advance: bool) -> ProcessStats:
        p = self._process
        rss = int(p.memory_info().rss)
        fds = int(p.num_fds() if hasattr(p, "num_fds") else p.num_handles())
        threads = int(p.num_threads())
        cpu = self._cpu()
        window = now - self._prev_time
        percent = 100.0 * (cpu - self._prev_cpu) / window if window > 0 else 0.0
        if advance:
            self._prev_cpu, self._prev_time = cpu, now
        return ProcessStats(
            pid=p.pid,
            rss_bytes=rss,
            open_fds=fds,
            max_fds=self._max_fds,
            cpu_seconds=cpu,
            cpu_percent=max(0.0, percent),
            threads=threads,
            trio_tasks=trio.lowlevel.current_statistics().tasks_living,
            asyncio_tasks=_asyncio_tasks(loops),
            gc_collections=tuple(int(g["collections"]) for g in gc.get_stats()),
            gc_pending=tuple(gc.get_count()),
        )


def _max_fds() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _asyncio_tasks(loops: set[Any]) -> int:
    total = 0
    for loop in loops:
        try:
            if not loop.is_closed():
                total += sum(1 for t in asyncio.all_tasks(loop) if not t.done())
        except RuntimeError:  # pragma: no cover - the set changed while iterating
            continue
    return total


def _context_loop() -> Any:
    """The trio-asyncio loop of the calling task's context, if trio-asyncio is loaded."""
    module = sys.modules.get("trio_asyncio")
    if module is None:
        return None
    return module.current_loop.get()


# -- the manager ----------------------------------------------------------------------


_PUBLISH_PREFIX = "trionats.stats"


@final
class ResourceManager:
    """Registers pools, subscribers and connections and samples them; see
    :func:`open_resource_manager`.

    Names are unique over every kind (one name, one component) and ``"process"`` is
    reserved for the process's own figures.
    """

    def __init__(
        self,
        interval: float,
        limits: Limits,
        alert_buffer: int,
        publish_on: Connection | None,
        publish_subject: str,
        name: str,
    ) -> None:
        self._interval = interval
        self._limits = limits
        self._alert_buffer = alert_buffer
        self._publish_on = publish_on
        self._name = name
        self._id = secrets.token_hex(6)
        self._subject = f"{publish_subject}.{self._id}"
        self._host = socket.gethostname()
        self._entries: dict[str, _Entry] = {}
        self._streams: weakref.WeakSet[AlertStream] = weakref.WeakSet()
        self._active: dict[tuple[str, str], Alert] = {}
        self._last: SystemStats | None = None
        self._probe = _ProcessProbe(trio.current_time())
        self._own_loop = _context_loop()
        self._token = trio.lowlevel.current_trio_token()
        self._closed = False
        self.samples = 0
        """Samples taken so far."""
        self.alerts_emitted = 0
        """Alerts emitted so far (raised and cleared)."""
        self.alerts_dropped = 0
        """Alerts dropped, over every stream, because a consumer fell behind."""
        self.published = 0
        """Snapshots published on ``publish_on``."""
        self.publish_errors = 0
        """Snapshots that could not be published (the connection was closed, the snapshot
        was over the server's max_payload...)."""

    # -- configuration ------------------------------------------------------------------
    @property
    def interval(self) -> float:
        """Seconds between samples."""
        return self._interval

    @property
    def limits(self) -> Limits:
        """The limits checked at each sample."""
        return self._limits

    @property
    def publish_subject(self) -> str | None:
        """The subject snapshots are published on, None when publishing is off."""
        return self._subject if self._publish_on is not None else None

    @property
    def id(self) -> str:
        """This manager's random id (the last token of the publish subject)."""
        return self._id

    @property
    def names(self) -> list[str]:
        """The registered components' names, in registration order."""
        return list(self._entries)

    # -- registration -------------------------------------------------------------------
    def register_pool(self, name: str, pool: Pool[Any]) -> Registration:
        """Sample ``pool`` under ``name`` until unregistered (or the manager closes).

        Raises:
            TypeError: ``name`` is not a str, or ``pool`` not a :class:`trionats.Pool`.
            ValueError: ``name`` is empty, ``"process"``, or already registered.
            RuntimeError: the manager is closed.
        """
        from ._pool import Pool

        return self._register(name, "pool", pool, Pool, "a trionats.Pool")

    def register_subscriber(self, name: str, subscriber: Subscriber) -> Registration:
        """Sample ``subscriber`` under ``name`` until unregistered (or the manager closes).

        Raises:
            TypeError: ``name`` is not a str, or ``subscriber`` not a
                :class:`trionats.Subscriber`.
            ValueError: ``name`` is empty, ``"process"``, or already registered.
            RuntimeError: the manager is closed.
        """
        from ._subscriber import Subscriber

        return self._register(name, "subscriber", subscriber, Subscriber, "a trionats.Subscriber")

    def register_connection(self, name: str, connection: Connection) -> Registration:
        """Sample ``connection`` under ``name`` until unregistered (or the manager closes).

        Raises:
            TypeError: ``name`` is not a str, or ``connection`` not a
                :class:`trionats.Connection`.
            ValueError: ``name`` is empty, ``"process"``, or already registered.
            RuntimeError: the manager is closed.
        """
        from ._connection import Connection

        return self._register(name, "connection", connection, Connection, "a trionats.Connection")

    def _register(self, name: str, kind: Kind, obj: Any, cls: type, what: str) -> Registration:
        check_str("name", name)
        if not isinstance(obj, cls):
            raise TypeError(f"register_{kind} needs {what}, got {type(obj).__name__}")
        if name == PROCESS:
            raise ValueError(f"name {name!r} is reserved for the process's own figures")
        if name in self._entries:
            other = self._entries[name]
            raise ValueError(f"name {name!r} is already registered (a {other.kind})")
        if self._closed:
            raise RuntimeError("the resource manager is closed")
        entry = _Entry(name, kind, obj, trio.current_time())
        entry.prev = self._read(entry)
        self._entries[name] = entry
        return Registration(self, entry)

    def unregister(self, name: str) -> None:
        """Stop sampling the component called ``name``; its active alerts are forgotten.

        Raises:
            ValueError: no component of that name is registered.
        """
        if self._entries.pop(name, None) is None:
            raise ValueError(f"no component named {name!r} is registered")
        for key in [k for k in self._active if k[0] == name]:
            del self._active[key]

    # -- sampling -----------------------------------------------------------------------
    @staticmethod
    def _read(entry: _Entry) -> Any:
        """The component's cumulative stats; the last good ones if reading fails."""
        try:
            entry.last = entry.obj.stats()
        except Exception as exc:  # a component that broke must not stop the sampler
            log.debug("reading %s %r failed: %r", entry.kind, entry.name, exc)
        return entry.last

    def _loops(self) -> set[Any]:
        loops = {self._own_loop} if self._own_loop is not None else set()
        for entry in self._entries.values():
            if entry.kind == "connection":
                # the bridge the connection already loaded (importing it here would load
                # trio-asyncio, which replaces asyncio's event loop policy)
                loop = entry.obj._bridge.client_loop(entry.obj._client)
                if loop is not None:
                    loops.add(loop)
        return loops

    def _snapshot(self, advance: bool) -> SystemStats:
        now = trio.current_time()
        pools: list[PoolSnapshot] = []
        subscribers: list[SubscriberSnapshot] = []
        connections: list[ConnectionSnapshot] = []
        for entry in list(self._entries.values()):
            stats = self._read(entry)
            window = now - entry.prev_time
            if entry.kind == "pool":
                pools.append(_pool_snapshot(entry, stats, window))
            elif entry.kind == "subscriber":
                subscribers.append(_subscriber_snapshot(entry, stats, window))
            else:
                connections.append(_connection_snapshot(entry, stats, window))
            if advance:
                entry.prev, entry.prev_time = stats, now
        process = self._probe.read(now, self._loops(), advance)
        snap = SystemStats(
            time=time.time(),
            pools=tuple(pools),
            subscribers=tuple(subscribers),
            connections=tuple(connections),
            process=process,
            alerts=tuple(self._active.values()),
            samples=self.samples,
        )
        return snap

    def _finish(self, snap: SystemStats, alerts: tuple[Alert, ...]) -> SystemStats:
        health = _health(snap, alerts, self._entries)
        return SystemStats(
            time=snap.time,
            pools=snap.pools,
            subscribers=snap.subscribers,
            connections=snap.connections,
            process=snap.process,
            alerts=alerts,
            samples=snap.samples,
            health=health,
        )

    def system_stats(self) -> SystemStats:
        """A snapshot of every registered component and the process, now.

        Counters and gauges are read now; rates are over the time since the previous
        sample; ``alerts`` are those active after the latest sample. Taking it changes
        nothing (the next sample's window still starts at the previous one).
        """
        snap = self._snapshot(advance=False)
        return self._finish(snap, tuple(self._active.values()))

    def sample_now(self) -> SystemStats:
        """Take a sample now, as the sampler does at each interval, and return it.

        Rates cover the window since the previous sample; every limit is checked and
        alerts are emitted for the figures that crossed (or came back under) their limit.
        The sampler's own schedule is unchanged.
        """
        self.samples += 1
        snap = self._snapshot(advance=True)
        for alert in self._check(snap):
            self._emit(alert)
        snap = self._finish(snap, tuple(self._active.values()))
        self._last = snap
        return snap

    def last_sample(self) -> SystemStats | None:
        """The latest sample (None before the first); safe to read from any thread."""
        return self._last

    def _check(self, snap: SystemStats) -> list[Alert]:
        limits = self._limits
        seen: dict[tuple[str, str], tuple[str, float, float, Severity | None]] = {}
        for kind, snaps in (
            ("pool", snap.pools),
            ("subscriber", snap.subscribers),
            ("connection", snap.connections),
        ):
            for s in snaps:
                if s.closed:
                    seen[(s.name, "closed")] = (kind, 1.0, 0.0, Severity.CRITICAL)
                    continue  # a closed component's other figures mean nothing
                for figure, attr, get in _CHECKS[kind]:
                    limit = getattr(limits, attr)
                    if limit is not None:
                        value = float(get(s))
                        level = _level(value, limit, limits)
                        seen[(s.name, figure)] = (kind, value, float(limit), level)
        for figure, attr, get in _CHECKS[PROCESS]:
            limit = getattr(limits, attr)
            if limit is not None:
                value = float(get(snap.process))
                level = _level(value, limit, limits)
                seen[(PROCESS, figure)] = (PROCESS, value, float(limit), level)
        out: list[Alert] = []
        for key, (kind, value, limit, level) in seen.items():
            active = self._active.get(key)
            previous = active.severity if active is not None else None
            if level is previous:
                continue
            if active is not None and level is None:
                del self._active[key]
                out.append(
                    Alert(key[0], kind, key[1], value, limit, active.severity, True, snap.time)
                )
            elif level is not None:
                alert = Alert(key[0], kind, key[1], value, limit, level, False, snap.time)
                self._active[key] = alert
                out.append(alert)
        # Figures no longer checked (a limit turned off by a component that closed): clear.
        for key in [k for k in self._active if k not in seen]:
            active = self._active.pop(key)
            out.append(
                Alert(
                    active.component,
                    active.kind,
                    active.figure,
                    active.value,
                    active.limit,
                    active.severity,
                    True,
                    snap.time,
                )
            )
        return out

    def _emit(self, alert: Alert) -> None:
        self.alerts_emitted += 1
        (log.info if alert.cleared else log.warning)("alert: %s", alert.message)
        for stream in list(self._streams):
            before = stream.dropped
            stream._put(alert)
            self.alerts_dropped += stream.dropped - before

    # -- consumers ----------------------------------------------------------------------
    def alerts(self, *, buffer: int | None = None) -> AlertStream:
        """A stream of every alert emitted from now on (each stream gets every alert).

        Args:
            buffer: alerts the stream holds for a slow consumer before it drops new ones
                (default: the manager's ``alert_buffer``).

        Raises:
            TypeError, ValueError: ``buffer`` is not an int >= 1.
        """
        size = self._alert_buffer if buffer is None else check_int("buffer", buffer, minimum=1)
        stream = AlertStream(size)
        if self._closed:
            stream._end()
        else:
            self._streams.add(stream)
        return stream

    def health(self) -> Health:
        """Healthy, degraded or unhealthy, per component and overall, with the reasons.

        A closed component is unhealthy; a connection that is not connected is degraded;
        an active alert makes its component degraded (``WARNING``) or unhealthy
        (``CRITICAL``). Alerts are those of the latest sample; closed and connected are
        read now.
        """
        return self.system_stats().health

    def suggestions(self) -> list[Suggestion]:
        """Tuning advice from the latest sample (empty before the first).

        Each comes from one rule (see ``docs/production.md``) and names the figure that
        triggered it.
        """
        if self._last is None:
            return []
        return _suggest(self._last)

    # -- publishing ---------------------------------------------------------------------
    def snapshot_message(self, snap: SystemStats) -> bytes:
        """The JSON document published for ``snap`` (schema in ``docs/production.md``)."""
        body = {
            "type": SCHEMA,
            "id": self._id,
            "name": self._name,
            "host": self._host,
            "interval": self._interval,
            **snap.to_dict(),
        }
        return json.dumps(body, separators=(",", ":")).encode()

    async def _publish(self, snap: SystemStats) -> None:
        nc = self._publish_on
        if nc is None:
            return
        from ._errors import TrionatsError

        try:
            await nc.publish(self._subject, self.snapshot_message(snap))
        except (TrionatsError, ValueError) as exc:  # ValueError: over max_payload
            self.publish_errors += 1
            if self.publish_errors == 1:
                log.warning("publishing resource stats on %s failed: %s", self._subject, exc)
        else:
            self.published += 1

    async def _run(self) -> None:
        while True:
            await trio.sleep(self._interval)
            snap = self.sample_now()
            await self._publish(snap)

    def _close(self) -> None:
        self._closed = True
        self._entries.clear()
        for stream in list(self._streams):
            stream._end()
        self._streams.clear()

    @property
    def closed(self) -> bool:
        """True once the ``open_resource_manager`` block has exited."""
        return self._closed

    def __repr__(self) -> str:
        return (
            f"<trionats.ResourceManager {len(self._entries)} components "
            f"interval={self._interval} s samples={self.samples}>"
        )


_CHECKS: dict[str, list[tuple[str, str, Callable[[Any], float]]]] = {
    "pool": [
        ("borrowed", "max_borrowed", lambda s: s.stats.borrowed),
        ("open_connections", "max_open_connections", lambda s: s.open_connections),
        ("wait_p99", "max_pool_wait", lambda s: s.wait_time.p99),
    ],
    "subscriber": [
        ("pending_msgs", "max_pending_msgs", lambda s: s.stats.pending),
        ("pending_bytes", "max_pending_bytes", lambda s: s.stats.pending_bytes),
        ("drop_rate", "max_drop_rate", lambda s: s.drop_rate),
        ("failure_rate", "max_failure_rate", lambda s: s.failure_rate),
        ("handler_p99", "max_handler_p99", lambda s: s.handler_duration.p99),
    ],
    "connection": [
        ("drop_rate", "max_drop_rate", lambda s: s.drop_rate),
    ],
    PROCESS: [
        ("rss_bytes", "max_rss_bytes", lambda p: p.rss_bytes),
        ("open_fds", "max_open_fds", lambda p: p.open_fds),
        ("tasks", "max_tasks", lambda p: p.trio_tasks),
    ],
}
"""(figure, Limits attribute, how to read the figure from the snapshot), per kind."""


def _level(value: float, limit: float, limits: Limits) -> Severity | None:
    if not value > limit:
        return None
    if limit > 0 and value >= limit * limits.critical_factor:
        return Severity.CRITICAL
    return Severity.WARNING


def _delta(now: Any, before: Any, field_name: str) -> int:
    if before is None:
        return 0
    return max(0, int(getattr(now, field_name)) - int(getattr(before, field_name)))


def _pool_snapshot(entry: _Entry, stats: PoolStats, window: float) -> PoolSnapshot:
    prev = entry.prev
    pool = entry.obj
    return PoolSnapshot(
        name=entry.name,
        stats=stats,
        closed=stats.closing,
        window=window,
        created=_delta(stats, prev, "created"),
        reused=_delta(stats, prev, "reused"),
        waits=_delta(stats, prev, "waits"),
        timeouts=_delta(stats, prev, "timeouts"),
        dial_failures=_delta(stats, prev, "dial_failures"),
        leaks_detected=_delta(stats, prev, "leaks_detected"),
        wait_time=window_latency(stats.wait_time, None if prev is None else prev.wait_time),
        idle_per_server=pool.config.idle_per_server,
        max_per_server=pool.config.max_per_server,
    )


def _subscriber_snapshot(
    entry: _Entry, stats: SubscriberStats, window: float
) -> SubscriberSnapshot:
    prev = entry.prev
    subscriber = entry.obj
    return SubscriberSnapshot(
        name=entry.name,
        stats=stats,
        # Set when open_subscriber's block has exited (stats() then reports final counts).
        closed=bool(getattr(subscriber, "_ended", False)),
        window=window,
        received=_delta(stats, prev, "received"),
        processed=_delta(stats, prev, "processed"),
        failed=_delta(stats, prev, "failed"),
        timed_out=_delta(stats, prev, "timed_out"),
        dropped=_delta(stats, prev, "dropped"),
        handler_duration=window_latency(
            stats.handler_duration, None if prev is None else prev.handler_duration
        ),
        max_workers=subscriber.config.max_workers,
    )


def _connection_snapshot(
    entry: _Entry, stats: ConnectionStats, window: float
) -> ConnectionSnapshot:
    prev = entry.prev
    nc = entry.obj
    try:
        closed, connected = bool(nc.is_closed), bool(nc.is_connected)
    except Exception:  # pragma: no cover - a broken client reads as closed
        closed, connected = True, False
    return ConnectionSnapshot(
        name=entry.name,
        stats=stats,
        connected=connected,
        closed=closed,
        window=window,
        in_msgs=_delta(stats, prev, "in_msgs"),
        out_msgs=_delta(stats, prev, "out_msgs"),
        dropped=_delta(stats, prev, "dropped"),
        reconnects=_delta(stats, prev, "reconnects"),
    )


def _health(snap: SystemStats, alerts: tuple[Alert, ...], entries: dict[str, _Entry]) -> Health:
    by_component: dict[str, list[Alert]] = {}
    for alert in alerts:
        by_component.setdefault(alert.component, []).append(alert)
    components: list[ComponentHealth] = []

    def judge(name: str, kind: str, extra: list[tuple[HealthStatus, str]]) -> None:
        found = list(extra)
        for alert in by_component.get(name, ()):
            if alert.figure == "closed":
                continue  # said by extra, read now
            status = (
                HealthStatus.UNHEALTHY
                if alert.severity is Severity.CRITICAL
                else HealthStatus.DEGRADED
            )
            found.append(
                (
                    status,
                    f"{alert.figure} {_num(alert.value)} > {_num(alert.limit)} "
                    f"({alert.severity.value})",
                )
            )
        status = max((s for s, _ in found), key=_RANK.__getitem__, default=HealthStatus.HEALTHY)
        components.append(ComponentHealth(name, kind, status, tuple(r for _, r in found)))

    for p in snap.pools:
        judge(p.name, "pool", [(HealthStatus.UNHEALTHY, "closed")] if p.closed else [])
    for s in snap.subscribers:
        judge(s.name, "subscriber", [(HealthStatus.UNHEALTHY, "closed")] if s.closed else [])
    for c in snap.connections:
        extra: list[tuple[HealthStatus, str]] = []
        if c.closed:
            extra.append((HealthStatus.UNHEALTHY, "closed"))
        elif not c.connected:
            extra.append((HealthStatus.DEGRADED, "disconnected (reconnecting)"))
        judge(c.name, "connection", extra)
    judge(PROCESS, PROCESS, [])
    overall = max((c.status for c in components), key=_RANK.__getitem__)
    return Health(overall, tuple(components))


# -- suggestions ----------------------------------------------------------------------

REUSE_TARGET: Final = 0.8
"""Rule ``pool_reuse``: a pool reusing fewer of its borrows than this wants more idle."""
MIN_BORROWS: Final = 20
"""Rules ``pool_reuse`` and ``pool_waits`` judge only windows with this many borrows."""
WAIT_SHARE: Final = 0.1
"""Rule ``pool_waits``: the share of borrows that queued, above which to raise the cap."""
FD_SHARE: Final = 0.8
"""Rule ``open_fds``: the share of the descriptor limit in use that calls for action."""


def _seconds(window: float) -> str:
    if window >= 10:
        return f"{window:,.0f} s"
    return f"{window:.2g} s"


def _suggest(snap: SystemStats) -> list[Suggestion]:
    out: list[Suggestion] = []

    def add(
        kind: str, name: str, rule: str, figure: str, value: float, threshold: float, text: str
    ) -> None:
        out.append(Suggestion(name, kind, rule, figure, value, threshold, text))

    for p in snap.pools:
        if p.closed:
            continue
        w = _seconds(p.window)
        if p.borrows >= MIN_BORROWS and p.reuse_rate < REUSE_TARGET:
            add(
                "pool", p.name, "pool_reuse", "reuse_rate", p.reuse_rate, REUSE_TARGET,
                f"pool {p.name!r} reuse {p.reuse_rate:.0%} < {REUSE_TARGET:.0%}: raise "
                f"idle_per_server (now {p.idle_per_server})",
            )  # fmt: skip
        share = p.waits / p.borrows if p.borrows else 0.0
        if p.borrows >= MIN_BORROWS and share > WAIT_SHARE:
            cap = "no cap" if p.max_per_server is None else f"now {p.max_per_server}"
            add(
                "pool", p.name, "pool_waits", "waits", share, WAIT_SHARE,
                f"pool {p.name!r}: {p.waits:,} of {p.borrows:,} borrows queued in {w} "
                f"(p99 wait {p.wait_time.p99 * 1000:.1f} ms): raise max_per_server ({cap}) or "
                "hold connections for less time",
            )  # fmt: skip
        if p.timeouts:
            add(
                "pool", p.name, "pool_timeouts", "timeouts", p.timeouts, 0,
                f"pool {p.name!r}: {p.timeouts:,} borrow timeouts in {w}: raise "
                "max_per_server or the borrow timeout",
            )  # fmt: skip
        if p.leaks_detected:
            add(
                "pool", p.name, "pool_leaks", "leaks_detected", p.leaks_detected, 0,
                f"pool {p.name!r}: {p.leaks_detected:,} borrows held past leak_timeout in {w}: "
                "return connections sooner, or borrow with long_lived=True",
            )  # fmt: skip
        if p.dial_failures:
            add(
                "pool", p.name, "pool_dial_failures", "dial_failures", p.dial_failures, 0,
                f"pool {p.name!r}: {p.dial_failures:,} failed dials in {w}: check the "
                "servers and the pool's servers list",
            )  # fmt: skip
    for s in snap.subscribers:
        if s.closed:
            continue
        w = _seconds(s.window)
        config = s.stats
        if s.dropped:
            add(
                "subscriber", s.name, "subscriber_drops", "dropped", s.dropped, 0,
                f"subscriber {s.name!r} dropped {s.dropped:,} messages in {w}: raise "
                f"max_workers (now {s.max_workers}) or the pending limits",
            )  # fmt: skip
        if s.timed_out:
            add(
                "subscriber", s.name, "subscriber_timeouts", "timed_out", s.timed_out, 0,
                f"subscriber {s.name!r}: {s.timed_out:,} handlers timed out in {w} (p99 "
                f"{s.handler_duration.p99 * 1000:.1f} ms): raise handler_timeout or make the "
                "handler faster",
            )  # fmt: skip
        if config.in_flight >= s.max_workers and config.pending > 0:
            add(
                "subscriber", s.name, "subscriber_saturated", "in_flight", config.in_flight,
                s.max_workers,
                f"subscriber {s.name!r}: all {s.max_workers} workers busy and "
                f"{config.pending:,} messages waiting: raise max_workers",
            )  # fmt: skip
    for c in snap.connections:
        if c.closed:
            continue
        w = _seconds(c.window)
        if c.dropped:
            add(
                "connection", c.name, "connection_drops", "dropped", c.dropped, 0,
                f"connection {c.name!r} dropped {c.dropped:,} messages in {w} (slow "
                "consumer): consume faster, or through a subscriber with more workers",
            )  # fmt: skip
        if c.reconnects:
            add(
                "connection", c.name, "connection_reconnects", "reconnects", c.reconnects, 0,
                f"connection {c.name!r} reconnected {c.reconnects:,} times in {w}: check the "
                "network and the server's log",
            )  # fmt: skip
    proc = snap.process
    if proc.max_fds and proc.open_fds > FD_SHARE * proc.max_fds:
        add(
            PROCESS, PROCESS, "open_fds", "open_fds", proc.open_fds, FD_SHARE * proc.max_fds,
            f"process: {proc.open_fds:,} open file descriptors, "
            f"{proc.open_fds / proc.max_fds:.0%} of the limit {proc.max_fds:,}: raise it "
            "(ulimit -n) or open fewer connections",
        )  # fmt: skip
    return out


# -- the context manager --------------------------------------------------------------


def _default_name() -> str:
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    return os.path.basename(argv0) or "python"


@asynccontextmanager
async def open_resource_manager(
    interval: float = 10.0,
    limits: Limits | None = None,
    *,
    alert_buffer: int = 100,
    publish_on: Connection | None = None,
    publish_subject: str = _PUBLISH_PREFIX,
    name: str | None = None,
) -> AsyncIterator[ResourceManager]:
    """Watch registered pools, subscribers and connections for the duration of the block.

    The sampler runs in the manager's own nursery: every ``interval`` seconds it takes a
    :class:`SystemStats`, checks it against ``limits`` (emitting :class:`Alert`\\ s) and,
    with ``publish_on``, publishes it as JSON on ``<publish_subject>.<id>`` for
    ``trionats top``. Leaving the block stops the sampler and ends every alert stream.

    Example::

        async with trionats.open_resource_manager(interval=10) as rm:
            rm.register_pool("main", pool)
            async for alert in rm.alerts():
                print(alert.message)

    Args:
        interval: seconds between samples (> 0).
        limits: the thresholds; :class:`Limits` defaults if None.
        alert_buffer: alerts each stream buffers for a slow consumer (>= 1).
        publish_on: a connection to publish every sample on (off when None).
        publish_subject: the subject prefix; the manager's random id is appended.
        name: the process's name in published snapshots (default: the program's name).

    Raises:
        TypeError, ValueError: a bad argument; the message names it.
    """
    from ._connection import Connection
    from ._validate import check_publish_subject, check_seconds

    interval = check_seconds("interval", interval)
    if limits is None:
        limits = Limits()
    elif not isinstance(limits, Limits):
        raise TypeError(f"limits must be a trionats.Limits, got {type(limits).__name__}")
    check_int("alert_buffer", alert_buffer, minimum=1)
    if publish_on is not None and not isinstance(publish_on, Connection):
        raise TypeError(
            f"publish_on must be a trionats.Connection or None, got {type(publish_on).__name__}"
        )
    check_publish_subject(publish_subject, "publish_subject")
    name = _default_name() if name is None else check_str("name", name)
    manager = ResourceManager(interval, limits, alert_buffer, publish_on, publish_subject, name)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager._run)
            try:
                yield manager
            finally:
                manager._close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Only the level our nursery added: a group the block raised comes out intact.
        _errors.reraise_unwrapped(group, 1)
    finally:
        manager._close()
