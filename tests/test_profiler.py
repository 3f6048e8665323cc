"""PerformanceProfiler on Trio's MockClock: exact windows, latencies and trends."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

import trionats
from trionats import PerformanceProfiler, Trend


async def run_ops(profiler: PerformanceProfiler, name: str, n: int, seconds: float) -> None:
    for _ in range(n):
        async with profiler.measure(name):
            await trio.sleep(seconds)


def close(value: float, expected: float) -> bool:
    """Within the histogram's error bound (never below, at most 6.25 % above)."""
    return expected * (1 - 1e-9) <= value <= expected * 1.0625 + 1e-9


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"window": 0}, ValueError, "window"),
        ({"window": "1"}, TypeError, "window"),
        ({"windows": 2}, ValueError, "windows"),
        ({"trend_threshold": 0}, ValueError, "trend_threshold"),
        ({"trend_threshold": 1.5}, ValueError, "trend_threshold"),
        ({"min_samples": 0}, ValueError, "min_samples"),
    ],
)
def test_bad_arguments_name_the_field(
    kwargs: dict[str, object], error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        PerformanceProfiler(**kwargs)  # type: ignore[arg-type]


def test_bad_names() -> None:
    profiler = PerformanceProfiler()
    with pytest.raises(ValueError, match="name"):
        profiler.measure("")
    with pytest.raises(TypeError, match="name"):
        profiler.timed(3)  # type: ignore[arg-type]

    def sync() -> None: ...

    with pytest.raises(TypeError, match="async def"):
        profiler.timed("x")(sync)  # type: ignore[arg-type]


async def test_measure_counts_and_times(autojump_clock: trio.testing.MockClock) -> None:
    profiler = PerformanceProfiler(window=10, windows=6)
    await run_ops(profiler, "op", 100, 0.01)  # 1 s of operations in the first window
    op = profiler.report()["op"]
    assert op.count == 100
    assert op.errors == 0
    assert op.cancelled == 0
    assert op.latency.count == 100
    assert close(op.p50, 0.01)
    assert close(op.p99, 0.01)
    assert close(op.throughput, 100.0)  # 100 operations in the 1 s since first seen
    assert "op" in profiler.report()
    assert "other" not in profiler.report()


async def test_errors_are_counted_and_reraised(autojump_clock: trio.testing.MockClock) -> None:
    profiler = PerformanceProfiler()
    for _ in range(3):
        with pytest.raises(KeyError):  # noqa: PT012
            async with profiler.measure("op"):
                await trio.sleep(0.5)
                raise KeyError("boom")
    await run_ops(profiler, "op", 1, 0.001)
    op = profiler.report()["op"]
    assert (op.count, op.errors, op.latency.count) == (4, 3, 1)
    assert op.error_rate == 0.75
    assert close(op.latency.max, 0.001)  # errors are not in the latency figures


async def test_a_cancelled_operation_is_counted_apart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    profiler = PerformanceProfiler()
    with trio.move_on_after(1) as scope:
        async with profiler.measure("op"):
            await trio.sleep_forever()
    assert scope.cancelled_caught
    op = profiler.report()["op"]
    assert (op.count, op.errors, op.cancelled) == (0, 0, 1)


async def test_timed_decorator(autojump_clock: trio.testing.MockClock) -> None:
    profiler = PerformanceProfiler()

    @profiler.timed("query")
    async def query(x: int, *, fail: bool = False) -> int:
        """Docstring kept."""
        await trio.sleep(0.02)
        if fail:
            raise ValueError(x)
        return x * 2

    assert query.__name__ == "query"
    assert query.__doc__ == "Docstring kept."
    assert await query(21) == 42
    with pytest.raises(ValueError, match="5"):
        await query(5, fail=True)
    with trio.move_on_after(0.01):
        await query(1)
    op = profiler.report()["query"]
    assert (op.count, op.errors, op.cancelled) == (2, 1, 1)
    assert close(op.p50, 0.02)


async def test_windows_slide_and_expire(autojump_clock: trio.testing.MockClock) -> None:
    profiler = PerformanceProfiler(window=10, windows=3)
    await run_ops(profiler, "op", 10, 0.1)  # window 0: 10 ops
    await trio.sleep(10 - trio.current_time())
    await run_ops(profiler, "op", 20, 0.1)  # window 1: 20 ops
    op = profiler.report()["op"]
    assert [w.count for w in op.windows] == [10, 20]
    assert op.count == 30
    await trio.sleep(20 - trio.current_time() + 5)  # into window 2: 0, 1, 2 are kept
    assert [w.count for w in profiler.report()["op"].windows] == [10, 20, 0]
    await trio.sleep(10)  # window 3: window 0 has left
    assert [w.count for w in profiler.report()["op"].windows] == [20, 0, 0]
    await trio.sleep(20)  # window 5: nothing left
    assert "op" not in profiler.report()


async def _windows_of(profiler: PerformanceProfiler, latencies: list[float], n: int) -> None:
    """One window per latency (``n`` operations each), then step into the next window."""
    for seconds in latencies:
        start = trio.current_time()
        await run_ops(profiler, "op", n, seconds)
        await trio.sleep(start + profiler.window - trio.current_time())


@pytest.mark.parametrize(
    ("latencies", "trend", "ratio"),
    [
        ([0.01, 0.01, 0.01, 0.02], Trend.DEGRADING, 2.0),
        ([0.02, 0.02, 0.02, 0.01], Trend.IMPROVING, 0.5),
        ([0.01, 0.01, 0.01, 0.011], Trend.STABLE, 1.1),
    ],
)
async def test_trend_compares_the_latest_window_with_the_earlier_ones(
    autojump_clock: trio.testing.MockClock, latencies: list[float], trend: Trend, ratio: float
) -> None:
    profiler = PerformanceProfiler(window=10, windows=6, trend_threshold=0.2, min_samples=20)
    await _windows_of(profiler, latencies, 50)
    t = profiler.report()["op"].trend
    assert t.trend is trend
    assert t.threshold == 0.2
    assert t.recent_samples == 50
    assert t.baseline_samples == 150
    assert close(t.recent_p50, latencies[-1])
    assert close(t.baseline_p50, latencies[0])
    assert t.ratio == pytest.approx(ratio, rel=0.07)
    assert t.recent_throughput == pytest.approx(5.0, rel=0.01)  # 50 operations in 10 s
    assert t.baseline_throughput == pytest.approx(5.0, rel=0.01)


async def test_trend_is_unknown_without_enough_samples(
    autojump_clock: trio.testing.MockClock,
) -> None:
    profiler = PerformanceProfiler(window=10, min_samples=20)
    await _windows_of(profiler, [0.01, 0.05], 10)
    t = profiler.report()["op"].trend
    assert t.trend is Trend.UNKNOWN
    assert (t.recent_samples, t.baseline_samples) == (10, 10)
    assert t.ratio == pytest.approx(5.0, rel=0.07)  # the figures are still there
    profiler.record("fresh", 0.1)
    fresh = profiler.report()["fresh"].trend
    assert fresh.trend is Trend.UNKNOWN
    assert math.isnan(fresh.ratio)


async def test_record_from_other_measurements(autojump_clock: trio.testing.MockClock) -> None:
    profiler = PerformanceProfiler()
    profiler.record("rpc", 0.25)
    profiler.record("rpc", 1.0, error=True)
    with pytest.raises(ValueError, match="seconds"):
        profiler.record("rpc", -1)
    op = profiler.report()["rpc"]
    assert (op.count, op.errors) == (2, 1)
    assert close(op.p50, 0.25)


async def test_concurrent_measures_do_not_mix(autojump_clock: trio.testing.MockClock) -> None:
    profiler = PerformanceProfiler()
    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(run_ops, profiler, "a" if i % 2 else "b", 5, 0.001 * (1 + i % 2))
    report = profiler.report()
    assert close(report["a"].latency.max, 0.002)
    assert close(report["b"].latency.max, 0.001)
    assert report["a"].count == report["b"].count == 25
    assert "PerformanceProfiler" in repr(profiler)


def test_exported() -> None:
    for name in (
        "PerformanceProfiler",
        "ProfilerReport",
        "OperationReport",
        "WindowReport",
        "TrendReport",
        "Trend",
    ):
        assert getattr(trionats, name).__module__ == "trionats"
