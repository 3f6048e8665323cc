"""PerformanceProfiler: throughput and latency per operation over sliding windows, and a trend.

Time is Trio's clock (``trio.current_time()``), for the windows and for the durations, so
a test with ``trio.testing.MockClock`` sees exact figures. Each operation name has its own
ring of ``windows`` windows of ``window`` seconds, aligned on multiples of ``window``; a
window holds a count of completions, of errors, of cancellations, and a latency
:class:`~trionats._metrics.Histogram` of the successful runs.
"""

from __future__ import annotations

import enum
import functools
import inspect
import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, ParamSpec, TypeVar, final

import trio

from ._metrics import EMPTY, Histogram, LatencySnapshot, merged_snapshot
from ._validate import check_bool, check_int, check_number, check_seconds, check_str

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from types import TracebackType

__all__ = [
    "OperationReport",
    "PerformanceProfiler",
    "ProfilerReport",
    "Trend",
    "TrendReport",
    "WindowReport",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")


class Trend(enum.Enum):
    """Where an operation's latency is heading (see :class:`TrendReport` for the rule)."""

    IMPROVING = "improving"
    STABLE = "stable"
    DEGRADING = "degrading"
    UNKNOWN = "unknown"
    """Not enough data: fewer than ``min_samples`` successes in the latest window or in
    the earlier ones."""


@final
@dataclass(frozen=True, slots=True)
class WindowReport:
    """One window of one operation.

    Attributes:
        start: the window's start, on Trio's clock (seconds).
        duration: seconds it covers (less than the window length for the current one).
        count: operations completed in it (successes and errors).
        errors: the part of ``count`` that raised an exception.
        cancelled: operations cancelled (or interrupted) in it; not in ``count``.
        throughput: ``count / duration``, operations per second.
        latency: durations of the successful operations.
    """

    start: float
    duration: float
    count: int
    errors: int
    cancelled: int
    throughput: float
    latency: LatencySnapshot


@final
@dataclass(frozen=True, slots=True)
class TrendReport:
    """The figures behind a :class:`Trend`, and the rule that turned them into it.

    The latest *complete* window (``recent``) is compared with the complete windows
    before it that are still kept, merged (``baseline``): ``ratio = recent_p50 /
    baseline_p50``. ``ratio > 1 + threshold`` is DEGRADING, ``ratio < 1 - threshold``
    IMPROVING, anything between STABLE; UNKNOWN when either side has fewer than
    ``min_samples`` successful operations. Throughput is reported beside, not judged: it
    follows the offered load as much as the system's health.

    Attributes:
        trend: the verdict.
        recent_p50: median latency of the latest complete window (seconds).
        baseline_p50: median latency of the earlier complete windows together.
        ratio: ``recent_p50 / baseline_p50`` (NaN when either side is empty).
        threshold: the relative change that counts (``trend_threshold`` of the profiler).
        recent_throughput: operations per second in the latest complete window.
        baseline_throughput: operations per second over the earlier complete windows.
        recent_samples: successful operations behind ``recent_p50``.
        baseline_samples: successful operations behind ``baseline_p50``.
    """

    trend: Trend
    recent_p50: float
    baseline_p50: float
    ratio: float
    threshold: float
    recent_throughput: float
    baseline_throughput: float
    recent_samples: int
    baseline_samples: int


@final
@dataclass(frozen=True, slots=True)
class OperationReport:
    """One operation over the windows still kept.

    Attributes:
        name: the operation's name.
        count: operations completed (successes and errors).
        errors: the part of ``count`` that raised an exception.
        cancelled: operations cancelled or interrupted (``trio.Cancelled``,
            ``KeyboardInterrupt``...): neither a success nor an error, not in ``count``.
        throughput: ``count`` per second over the time the windows cover.
        latency: durations of the successful operations (``p50``, ``p90``, ``p99``,
            ``max``, ``mean``; see :class:`trionats.LatencySnapshot` for the error bound).
        windows: the windows, oldest first (empty ones included; the last is the
            current, partial one).
        trend: the latency trend and its figures.
    """

    name: str
    count: int
    errors: int
    cancelled: int
    throughput: float
    latency: LatencySnapshot
    windows: tuple[WindowReport, ...]
    trend: TrendReport

    @property
    def p50(self) -> float:
        """Median latency of the successful operations (seconds)."""
        return self.latency.p50

    @property
    def p90(self) -> float:
        """90th percentile latency (seconds)."""
        return self.latency.p90

    @property
    def p99(self) -> float:
        """99th percentile latency (seconds)."""
        return self.latency.p99

    @property
    def error_rate(self) -> float:
        """``errors / count`` (0.0 when nothing completed)."""
        return self.errors / self.count if self.count else 0.0


@final
@dataclass(frozen=True, slots=True)
class ProfilerReport:
    """Every operation's report at one instant (``at``, on Trio's clock).

    ``report["name"]`` is one operation's :class:`OperationReport` (``KeyError`` if it
    was never measured or all its windows have expired).
    """

    at: float
    operations: tuple[OperationReport, ...]

    def __getitem__(self, name: str) -> OperationReport:
        for op in self.operations:
            if op.name == name:
                return op
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return any(op.name == name for op in self.operations)


@final
class _Window:
    __slots__ = ("cancelled", "count", "errors", "index", "latency")

    def __init__(self, index: int) -> None:
        self.index = index
        self.count = 0
        self.errors = 0
        self.cancelled = 0
        self.latency = Histogram()


@final
class _Operation:
    """The windows of one name (newest last)."""

    __slots__ = ("first", "windows")

    def __init__(self, now: float) -> None:
        self.windows: deque[_Window] = deque()
        self.first = now  # when this name was first seen


@final
class _Measure:
    """``async with profiler.measure(name)``: times the block. Reusable, not reentrant."""

    __slots__ = ("_name", "_profiler", "_started")

    def __init__(self, profiler: PerformanceProfiler, name: str) -> None:
        self._profiler = profiler
        self._name = name
        self._started = math.nan

    async def __aenter__(self) -> None:
        self._started = trio.current_time()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._profiler._record(self._name, self._started, exc)


@final
class PerformanceProfiler:
    """Throughput and latency per named operation, over sliding windows, with a trend.

    ``async with profiler.measure("name"):`` times its block; ``@profiler.timed("name")``
    times every call of an ``async def`` function. An exception raised inside counts as an
    error (and propagates unchanged); a cancellation (any ``BaseException`` that is not an
    ``Exception``: ``trio.Cancelled``, ``KeyboardInterrupt``...) is counted apart as
    ``cancelled``, neither a success nor an error, since it says nothing about the
    operation. Latency figures are those of the successful runs.

    Measuring adds no checkpoint and no scheduling point: two reads of Trio's clock and a
    histogram update per operation. Names should be a fixed set (one ring of windows is
    kept per name).

    Args:
        window: seconds per window.
        windows: windows kept per operation (the current one included); at least 3, so a
            trend can compare a complete window with earlier ones.
        trend_threshold: the relative change of the median latency that makes a trend
            IMPROVING or DEGRADING (0.2: 20 %).
        min_samples: successful operations each side of the comparison needs, below which
            the trend is UNKNOWN.

    Example::

        profiler = trionats.PerformanceProfiler(window=10, windows=6)

        async with profiler.measure("orders.process"):
            await process(order)

        @profiler.timed("db.query")
        async def query(sql): ...

        op = profiler.report()["orders.process"]
        print(op.throughput, op.p99, op.trend.trend)
    """

    def __init__(
        self,
        *,
        window: float = 10.0,
        windows: int = 6,
        trend_threshold: float = 0.2,
        min_samples: int = 20,
    ) -> None:
        self.window = check_seconds("window", window)
        self.windows = check_int("windows", windows, minimum=3)
        self.trend_threshold = check_number(
            "trend_threshold", trend_threshold, exclusive_minimum=0.0, exclusive_maximum=1.0
        )
        self.min_samples = check_int("min_samples", min_samples, minimum=1)
        self._ops: dict[str, _Operation] = {}

    # -- measuring -----------------------------------------------------------------------
    def measure(self, name: str) -> _Measure:
        """An async context manager timing its block as one ``name`` operation.

        Raises:
            TypeError / ValueError: ``name`` is not a non-empty str.
        """
        check_str("name", name)
        return _Measure(self, name)

    def timed(
        self, name: str
    ) -> Callable[[Callable[_P, Awaitable[_R]]], Callable[_P, Awaitable[_R]]]:
        """A decorator timing every call of an ``async def`` function as ``name``.

        Raises:
            TypeError / ValueError: ``name`` is not a non-empty str; the decorated object
                is not an ``async def`` function.
        """
        check_str("name", name)

        def decorate(func: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R]]:
            if not inspect.iscoroutinefunction(func):
                raise TypeError(
                    f"profiler.timed({name!r}) decorates async def functions, got {func!r}"
                )

            @functools.wraps(func)
            async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
                started = trio.current_time()
                try:
                    result = await func(*args, **kwargs)
                except BaseException as exc:
                    self._record(name, started, exc)
                    raise
                self._record(name, started, None)
                return result

            return wrapper

        return decorate

    def record(self, name: str, seconds: float, *, error: bool = False) -> None:
        """Record one operation that took ``seconds``, measured by other means.

        Raises:
            TypeError / ValueError: a bad name or duration; ``error`` not a bool.
        """
        check_str("name", name)
        seconds = check_number("seconds", seconds, minimum=0.0)
        if error is not False:
            check_bool("error", error)
        window = self._window(name, trio.current_time())
        window.count += 1
        if error:
            window.errors += 1
        else:
            window.latency.record(seconds)

    def _window(self, name: str, now: float) -> _Window:
        op = self._ops.get(name)
        if op is None:
            op = self._ops[name] = _Operation(now)
        index = math.floor(now / self.window)
        ring = op.windows
        if ring and ring[-1].index == index:
            return ring[-1]
        window = _Window(index)
        ring.append(window)
        while ring[0].index <= index - self.windows:
            ring.popleft()
        return window

    def _record(self, name: str, started: float, exc: BaseException | None) -> None:
        now = trio.current_time()
        window = self._window(name, now)
        if exc is None:
            window.count += 1
            window.latency.record(now - started)
        elif isinstance(exc, Exception):
            window.count += 1
            window.errors += 1
        else:
            window.cancelled += 1

    # -- reporting -----------------------------------------------------------------------
    def report(self) -> ProfilerReport:
        """Every operation's figures now (operations with no window left are omitted)."""
        now = trio.current_time()
        current = math.floor(now / self.window)
        reports = []
        for name in sorted(self._ops):
            op = self._ops[name]
            ring = op.windows
            while ring and ring[0].index <= current - self.windows:
                ring.popleft()
            if not ring:
                del self._ops[name]
                continue
            reports.append(self._report_one(name, op, now, current))
        return ProfilerReport(at=now, operations=tuple(reports))

    def _report_one(self, name: str, op: _Operation, now: float, current: int) -> OperationReport:
        width = self.window
        by_index = {w.index: w for w in op.windows}
        first_index = current - self.windows + 1
        windows: list[WindowReport] = []
        indexes: list[int] = []
        for index in range(first_index, current + 1):
            start = max(index * width, op.first)
            end = min((index + 1) * width, now)
            if end <= start and index != current:
                continue  # before this name was first seen
            w = by_index.get(index)
            duration = max(end - start, 0.0)
            count = 0 if w is None else w.count
            indexes.append(index)
            windows.append(
                WindowReport(
                    start=start,
                    duration=duration,
                    count=count,
                    errors=0 if w is None else w.errors,
                    cancelled=0 if w is None else w.cancelled,
                    throughput=count / duration if duration > 0 else 0.0,
                    latency=EMPTY if w is None else w.latency.snapshot(),
                )
            )
        count = sum(w.count for w in windows)
        span = sum(w.duration for w in windows)
        return OperationReport(
            name=name,
            count=count,
            errors=sum(w.errors for w in windows),
            cancelled=sum(w.cancelled for w in windows),
            throughput=count / span if span > 0 else 0.0,
            latency=merged_snapshot(w.latency for w in op.windows),
            windows=tuple(windows),
            trend=self._trend(op, dict(zip(indexes, windows, strict=True)), current),
        )

    def _trend(self, op: _Operation, reports: dict[int, WindowReport], current: int) -> TrendReport:
        last = current - 1  # the latest complete window
        recent = [w for w in op.windows if w.index == last]
        baseline = [w for w in op.windows if w.index < last]
        recent_lat = merged_snapshot(w.latency for w in recent)
        base_lat = merged_snapshot(w.latency for w in baseline)
        recent_report = reports.get(last)
        recent_span = 0.0 if recent_report is None else recent_report.duration
        recent_count = 0 if recent_report is None else recent_report.count
        base_reports = [r for i, r in reports.items() if i < last]
        base_span = sum(r.duration for r in base_reports)
        base_count = sum(r.count for r in base_reports)
        if recent_lat.count and base_lat.count and base_lat.p50 > 0:
            ratio = recent_lat.p50 / base_lat.p50
        else:
            ratio = math.nan
        threshold = self.trend_threshold
        if (
            recent_lat.count < self.min_samples
            or base_lat.count < self.min_samples
            or math.isnan(ratio)
        ):
            trend = Trend.UNKNOWN
        elif ratio > 1 + threshold:
            trend = Trend.DEGRADING
        elif ratio < 1 - threshold:
            trend = Trend.IMPROVING
        else:
            trend = Trend.STABLE
        return TrendReport(
            trend=trend,
            recent_p50=recent_lat.p50,
            baseline_p50=base_lat.p50,
            ratio=ratio,
            threshold=threshold,
            recent_throughput=recent_count / recent_span if recent_span > 0 else 0.0,
            baseline_throughput=base_count / base_span if base_span > 0 else 0.0,
            recent_samples=recent_lat.count,
            baseline_samples=base_lat.count,
        )

    def __repr__(self) -> str:
        return (
            f"<trionats.PerformanceProfiler window={self.window} windows={self.windows} "
            f"operations={len(self._ops)}>"
        )
