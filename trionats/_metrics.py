"""The metrics core: latency histograms cheap enough for every message.

Counters in trionats are plain ``int`` attributes of the component that owns them (one
increment, no lock: everything runs in one Trio thread); gauges are read when a snapshot is
taken. This module adds the one structure that needs more than an integer: a log-linear
latency histogram.

A value is recorded in microseconds into a bucket chosen by its power of two (the
exponent) and one of :data:`SUB_BUCKETS` linear steps inside that power of two, so every
bucket's width is at most 1/:data:`SUB_BUCKETS` of its lower bound. A quantile reads the
upper bound of the bucket that holds it, clamped to the largest value recorded: it is
never below the exact quantile and at most 6.25 % above it (or 1 µs, for values under
1 µs). Recording is one ``math.frexp``, an index computation and three updates of
preallocated state: no lock, no list growth, no per-event object of ours.
:meth:`Histogram.record_ns` (the subscriber's per-message path) takes integer nanoseconds
from ``time.perf_counter_ns`` and finds the bucket of a value under 256 µs with integer
arithmetic and one table lookup, no function call: every bucket boundary below that is a
whole multiple of 1/16 µs, so the table (indexed by the value in 1/16 µs, rounded down) is
exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["SUB_BUCKETS", "Histogram", "LatencySnapshot"]

SUB_BUCKETS = 16
"""Linear steps per power of two: the relative error bound is ``1 / SUB_BUCKETS``."""

_MAX_EXPONENT = 42  # 2**42 µs is about 51 days: anything longer shares the last bucket
_NBUCKETS = (_MAX_EXPONENT + 1) * SUB_BUCKETS


def _index(micros: float) -> int:
    """The bucket of a value in microseconds."""
    if not micros >= 1.0:  # under 1 µs, negative, or NaN
        return 0
    mantissa, exponent = math.frexp(micros)
    if exponent > _MAX_EXPONENT:
        return _NBUCKETS - 1
    return exponent * SUB_BUCKETS + int((mantissa - 0.5) * (2 * SUB_BUCKETS))


_TABLE_SIZE = 256 * 16
"""Values under 256 µs (in 1/16 µs steps) take :data:`_TABLE` in ``record_ns``."""

_TABLE = [_index(u / 16) for u in range(_TABLE_SIZE)]
"""The bucket of every value in ``[u/16, (u+1)/16)`` µs: no bucket boundary lies inside
such a step (below 1 µs everything is bucket 0; from 1 µs on, boundaries are multiples of
1/16 µs), so ``_TABLE[ns * 16 // 1000]`` is the bucket of ``ns`` nanoseconds, exactly."""


def _upper_bound(index: int) -> float:
    """The largest value (seconds) bucket ``index`` holds."""
    exponent, step = divmod(index, SUB_BUCKETS)
    if exponent == 0:
        return 1e-6  # everything under 1 µs
    # values with frexp exponent e are in [2**(e-1), 2**e) µs, split in SUB_BUCKETS steps
    low = 2.0 ** (exponent - 1)
    return (low + low * (step + 1) / SUB_BUCKETS) * 1e-6


@final
@dataclass(frozen=True, slots=True)
class LatencySnapshot:
    """A latency histogram, frozen: count, sum and quantiles, all durations in seconds.

    Quantiles are never below the exact value and at most 6.25 % above it (the upper bound
    of the log-linear bucket that holds it, clamped to ``max``); 0.0 when nothing was
    recorded.

    Attributes:
        count: values recorded.
        sum: their total, in seconds.
        max: the largest value recorded.
        p50: the median.
        p90: the 90th percentile.
        p99: the 99th percentile.
        buckets: ``(upper_bound_seconds, count)`` of every non-empty bucket, in increasing
            order (for exporters that re-bucket, such as Prometheus).
    """

    count: int
    sum: float
    max: float
    p50: float
    p90: float
    p99: float
    buckets: tuple[tuple[float, int], ...]

    @property
    def mean(self) -> float:
        """The average, 0.0 when nothing was recorded."""
        return self.sum / self.count if self.count else 0.0

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0 < q <= 1), with the error bound of the class."""
        if not 0.0 < q <= 1.0:
            raise ValueError(f"q must be in (0, 1], got {q!r}")
        return _quantile(self.buckets, self.count, self.max, q)

    def __repr__(self) -> str:
        return (
            f"LatencySnapshot(count={self.count}, p50={self.p50 * 1000:.3f} ms, "
            f"p90={self.p90 * 1000:.3f} ms, p99={self.p99 * 1000:.3f} ms, "
            f"max={self.max * 1000:.3f} ms)"
        )


def _quantile(buckets: tuple[tuple[float, int], ...], count: int, top: float, q: float) -> float:
    if not count:
        return 0.0
    rank = max(1, math.ceil(q * count))
    seen = 0
    for bound, n in buckets:
        seen += n
        if seen >= rank:
            return min(bound, top)
    return top  # pragma: no cover - the counts add up to count


EMPTY = LatencySnapshot(count=0, sum=0.0, max=0.0, p50=0.0, p90=0.0, p99=0.0, buckets=())


@final
class Histogram:
    """A log-linear latency histogram (see the module's docstring for the error bound)."""

    # Values recorded in seconds and in nanoseconds keep separate sums and maxima (an int
    # addition and comparison are the cheapest updates for the latter); the count is the
    # buckets' total. All three are read only when a snapshot is taken.
    __slots__ = ("_counts", "_max", "_max_ns", "_sum", "_sum_ns")

    def __init__(self) -> None:
        self._counts = [0] * _NBUCKETS
        self._sum = 0.0
        self._max = 0.0
        self._sum_ns = 0
        self._max_ns = 0

    @property
    def count(self) -> int:
        """Values recorded."""
        return sum(self._counts)

    @property
    def sum(self) -> float:
        """Their total, in seconds."""
        return self._sum + self._sum_ns * 1e-9

    @property
    def max(self) -> float:
        """The largest value recorded, in seconds (0.0 when none was positive)."""
        return max(self._max, self._max_ns * 1e-9)

    def record(self, seconds: float) -> None:
        """Add one duration (seconds; negative values and NaN count as 0)."""
        if not seconds > 0.0:  # a clock that went backwards, or NaN
            seconds = 0.0
        self._counts[_index(seconds * 1e6)] += 1
        self._sum += seconds
        if seconds > self._max:
            self._max = seconds

    def record_ns(self, ns: int) -> None:
        """Add one duration given in integer nanoseconds (``time.perf_counter_ns()``
        differences): the cheapest way to record, no function call below 256 µs."""
        steps = ns * 16 // 1000  # the value in 1/16 µs, rounded down
        if 0 <= steps < _TABLE_SIZE:
            self._counts[_TABLE[steps]] += 1
        elif ns < 0:  # a clock that went backwards counts as 0
            ns = 0
            self._counts[0] += 1
        else:
            self._counts[_index(ns / 1000)] += 1
        self._sum_ns += ns
        if ns > self._max_ns:
            self._max_ns = ns

    def merge(self, other: Histogram) -> None:
        """Add every value ``other`` recorded."""
        counts = self._counts
        for i, n in enumerate(other._counts):
            if n:
                counts[i] += n
        self._sum += other._sum
        self._sum_ns += other._sum_ns
        self._max = max(self._max, other._max)
        self._max_ns = max(self._max_ns, other._max_ns)

    def snapshot(self) -> LatencySnapshot:
        """A frozen copy with the quantiles computed."""
        return merged_snapshot((self,))


def merged_snapshot(histograms: Iterable[Histogram]) -> LatencySnapshot:
    """One snapshot of several histograms together (a subscriber over its handles)."""
    totals: dict[int, int] = {}
    count = 0
    total = 0.0
    top = 0.0
    for h in histograms:
        if not h.count:
            continue
        count += h.count
        total += h.sum
        top = max(top, h.max)
        for i, n in enumerate(h._counts):
            if n:
                totals[i] = totals.get(i, 0) + n
    if not count:
        return EMPTY
    buckets = tuple((_upper_bound(i), totals[i]) for i in sorted(totals))
    return LatencySnapshot(
        count=count,
        sum=total,
        max=top,
        p50=_quantile(buckets, count, top, 0.5),
        p90=_quantile(buckets, count, top, 0.9),
        p99=_quantile(buckets, count, top, 0.99),
        buckets=buckets,
    )
