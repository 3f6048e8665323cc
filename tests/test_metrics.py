"""The metrics core: the histogram's error bound (hypothesis, pure), and the histograms the
subscriber and the pool fill (real nats-server on 127.0.0.1)."""

from __future__ import annotations

import math

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from polling import wait_until

import trionats
from trionats._metrics import Histogram, merged_snapshot

durations = st.floats(min_value=0.0, max_value=1e5, allow_nan=False, allow_infinity=False)


def _exact(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


@given(st.lists(durations, min_size=1, max_size=300), st.sampled_from([0.5, 0.9, 0.99, 1.0]))
def test_quantiles_are_within_the_stated_bound(values: list[float], q: float) -> None:
    h = Histogram()
    for v in values:
        h.record(v)
    snap = h.snapshot()
    exact = _exact(values, q)
    got = snap.quantile(q)
    assert got >= exact or math.isclose(got, exact)
    assert got <= max(exact * (1 + 1 / 16), 1e-6) * (1 + 1e-9)
    assert got <= snap.max
    assert snap.count == len(values)
    assert snap.max == max(values)
    assert math.isclose(snap.sum, sum(values), rel_tol=1e-9, abs_tol=1e-12)
    assert sum(n for _, n in snap.buckets) == len(values)


@given(st.lists(durations, max_size=100), st.lists(durations, max_size=100))
def test_merging_equals_recording_everything_in_one(a: list[float], b: list[float]) -> None:
    ha, hb, both = Histogram(), Histogram(), Histogram()
    for v in a:
        ha.record(v)
        both.record(v)
    for v in b:
        hb.record(v)
        both.record(v)
    merged = merged_snapshot([ha, hb])
    assert merged.buckets == both.snapshot().buckets
    assert (merged.p50, merged.p99, merged.max) == (
        both.snapshot().p50,
        both.snapshot().p99,
        both.snapshot().max,
    )
    ha.merge(hb)
    assert ha.snapshot().buckets == both.snapshot().buckets


@given(
    st.lists(st.integers(min_value=0, max_value=10**14), min_size=1, max_size=300),
    st.sampled_from([0.5, 0.9, 0.99, 1.0]),
)
def test_record_ns_is_within_the_stated_bound(values: list[int], q: float) -> None:
    h = Histogram()
    for v in values:
        h.record_ns(v)
    snap = h.snapshot()
    exact = _exact(values, q) * 1e-9
    got = snap.quantile(q)
    assert got >= exact or math.isclose(got, exact)
    assert got <= max(exact * (1 + 1 / 16), 1e-6) * (1 + 1e-9)
    assert snap.count == len(values)
    assert snap.max == max(values) * 1e-9
    assert math.isclose(snap.sum, sum(values) * 1e-9, rel_tol=1e-9, abs_tol=1e-15)


def test_record_ns_table_puts_every_value_in_the_bucket_record_does() -> None:
    # Below 256 µs record_ns looks the bucket up in a table; it must agree with the
    # computed bucket for every nanosecond value.
    table, computed = Histogram(), Histogram()
    for ns in range(256_000):
        table.record_ns(ns)
        computed.record(ns / 1e9)
    assert table.snapshot().buckets == computed.snapshot().buckets


def test_seconds_and_nanoseconds_mix_and_merge() -> None:
    a, b = Histogram(), Histogram()
    a.record(0.5)
    a.record_ns(2_000_000_000)
    b.record_ns(-5)  # a clock that went backwards counts as 0
    b.record(-1.0)
    a.merge(b)
    snap = a.snapshot()
    assert snap.count == 4
    assert snap.max == 2.0
    assert snap.sum == 2.5  # the negative values add nothing
    b.record(math.nan)
    assert b.snapshot().sum == 0.0
    assert b.snapshot().count == 3
    assert snap.buckets[0] == (1e-6, 2)  # the two negative values, under 1 µs


def test_an_empty_histogram_reads_zero_and_rejects_bad_quantiles() -> None:
    snap = Histogram().snapshot()
    assert (snap.count, snap.p50, snap.p99, snap.max, snap.mean) == (0, 0.0, 0.0, 0.0, 0.0)
    for q in (0.0, -1.0, 1.5):
        with pytest.raises(ValueError, match="q must be in"):
            snap.quantile(q)
    assert "p99=" in repr(snap)


def test_huge_and_negative_values_do_not_break_the_histogram() -> None:
    h = Histogram()
    h.record(-1.0)
    h.record(1e12)
    snap = h.snapshot()
    assert snap.count == 2
    assert snap.max == 1e12


async def test_subscriber_times_every_handler(nats_url: str) -> None:
    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_subscriber(nc, trionats.SubscriberConfig(max_workers=4)) as subscriber,
    ):

        async def handle(msg: trionats.Msg) -> None:
            if msg.data == b"fail":
                raise RuntimeError("boom")
            await trio.sleep(0.002)

        handle_a = await subscriber.start("m.a", handle)
        await subscriber.start("m.b", handle)
        for _ in range(10):
            await nc.publish("m.a", b"")
        await nc.publish("m.b", b"fail")
        await nc.flush()
        await wait_until(lambda: subscriber.stats().processed + subscriber.stats().failed == 11)
        total = subscriber.stats().handler_duration
        assert total.count == 11
        assert total.p50 >= 0.002
        assert handle_a.stats().handler_duration.count == 10
        await handle_a.stop()
        # a stopped handle's runs stay in the subscriber's histogram
        assert subscriber.stats().handler_duration.count == 11


async def test_subscriber_metrics_off_records_nothing(nats_url: str) -> None:
    config = trionats.SubscriberConfig(metrics=False)
    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_subscriber(nc, config) as subscriber,
    ):

        async def handle(msg: trionats.Msg) -> None:
            pass

        await subscriber.start("off", handle)
        await nc.publish("off", b"")
        await nc.flush()
        await wait_until(lambda: subscriber.stats().processed == 1)
        assert subscriber.stats().handler_duration.count == 0
    with pytest.raises(TypeError, match=r"SubscriberConfig\.metrics"):
        trionats.SubscriberConfig(metrics=1)  # type: ignore[arg-type]


async def test_pool_times_queued_borrows(nats_url: str) -> None:
    config = trionats.PoolConfig(servers=[nats_url], max_per_server=1)
    async with trionats.open_pool(config) as pool:
        held = trio.Event()
        release = trio.Event()

        async def holder() -> None:
            async with pool.borrow(timeout=10):
                held.set()
                await release.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder)
            await held.wait()

            async def waiter() -> None:
                async with pool.borrow(timeout=10) as nc:
                    await nc.flush()

            nursery.start_soon(waiter)
            await wait_until(lambda: pool.stats().waiting == 1)
            await trio.sleep(0.01)  # the waiter queues at least this long
            release.set()
        wait = pool.stats().wait_time
        assert wait.count == 1
        assert wait.max >= 0.01
