"""The resource manager: registration, sampling, limits and alerts, health, suggestions,
publishing, and leaving nothing behind. Against a real nats-server, driven by
``rm.sample_now()``; the sampler's own schedule runs under MockClock where no I/O is
involved."""

from __future__ import annotations

import json
import math

import pytest
import trio
import trio.lowlevel
import trio.testing
from polling import wait_until

import trionats
from trionats import HealthStatus, Limits, Severity
from trionats._metrics import Histogram
from trionats._resources import _suggest, window_latency

# -- input validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"max_borrowed": -1}, ValueError, "Limits.max_borrowed"),
        ({"max_tasks": 1.5}, TypeError, "Limits.max_tasks"),
        ({"max_pool_wait": "1"}, TypeError, "Limits.max_pool_wait"),
        ({"max_drop_rate": math.nan}, ValueError, "Limits.max_drop_rate"),
        ({"max_failure_rate": 1.5}, ValueError, "Limits.max_failure_rate"),
        ({"critical_factor": 0.5}, ValueError, "Limits.critical_factor"),
    ],
)
def test_limits_are_validated(kwargs: dict[str, object], error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        Limits(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"interval": 0}, ValueError, "interval"),
        ({"interval": "1"}, TypeError, "interval"),
        ({"limits": {"max_tasks": 1}}, TypeError, "limits"),
        ({"alert_buffer": 0}, ValueError, "alert_buffer"),
        ({"publish_on": "nats://x"}, TypeError, "publish_on"),
        ({"publish_subject": "a b"}, ValueError, "publish_subject"),
        ({"name": ""}, ValueError, "name"),
    ],
)
async def test_open_resource_manager_validates(
    kwargs: dict[str, object], error: type, text: str
) -> None:
    with pytest.raises(error, match=text):
        async with trionats.open_resource_manager(**kwargs):  # type: ignore[arg-type]
            pass  # pragma: no cover


async def test_registration_validates_names_and_types(nats_url: str) -> None:
    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_resource_manager() as rm,
    ):
        rm.register_connection("events", nc)
        with pytest.raises(ValueError, match="'events' is already registered"):
            rm.register_connection("events", nc)
        with pytest.raises(ValueError, match="'events' is already registered"):
            async with trionats.open_subscriber(nc) as sub:
                rm.register_subscriber("events", sub)
        with pytest.raises(ValueError, match="name must not be empty"):
            rm.register_connection("", nc)
        with pytest.raises(TypeError, match="name must be a str"):
            rm.register_connection(3, nc)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="'process' is reserved"):
            rm.register_connection("process", nc)
        with pytest.raises(
            TypeError, match=r"register_pool needs a trionats\.Pool, got Connection"
        ):
            rm.register_pool("main", nc)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"register_subscriber needs a trionats\.Subscriber"):
            rm.register_subscriber("orders", nc)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"register_connection needs a trionats\.Connection"):
            rm.register_connection("c", object())  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="no component named 'nope'"):
            rm.unregister("nope")
        assert rm.names == ["events"]
    with pytest.raises(RuntimeError, match="closed"):
        rm.register_connection("late", nc)


# -- the sampler's schedule, alerts and their streams (MockClock: no I/O) --------------


async def _sleepers(n: int, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(trio.sleep_forever)
            task_status.started(scope)


@pytest.mark.parametrize("autojump_clock", [0], indirect=True)
async def test_sampler_alerts_once_per_crossing_and_once_when_it_clears(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tasks = trio.lowlevel.current_statistics().tasks_living
    limits = Limits(max_tasks=tasks + 3, critical_factor=100)
    async with trionats.open_resource_manager(interval=10, limits=limits) as rm:
        alerts = rm.alerts()
        async with trio.open_nursery() as nursery:
            scope = await nursery.start(_sleepers, 10)
            start = trio.current_time()
            raised = await alerts.__anext__()
            assert trio.current_time() - start == pytest.approx(10, abs=10)
            assert (raised.component, raised.kind, raised.figure) == ("process", "process", "tasks")
            assert raised.severity is Severity.WARNING
            assert not raised.cleared
            assert raised.limit == tasks + 3
            assert raised.value > raised.limit
            assert raised.message.startswith("process tasks ")
            # No duplicate while it stays crossed: three more samples, nothing new.
            await trio.sleep(35)
            assert rm.samples >= 4
            assert alerts._buffer == deque_empty()
            assert [a.figure for a in rm.system_stats().alerts] == ["tasks"]
            scope.cancel()
        cleared = await alerts.__anext__()
        assert cleared.cleared
        assert cleared.figure == "tasks"
        assert cleared.severity is Severity.WARNING
        assert "back within" in cleared.message
        assert rm.system_stats().alerts == ()
        assert rm.alerts_emitted == 2


def deque_empty() -> object:
    from collections import deque

    return deque()


@pytest.mark.parametrize("autojump_clock", [0], indirect=True)
async def test_every_stream_gets_every_alert_and_a_slow_one_drops_and_counts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trionats.open_resource_manager(interval=1, limits=Limits(max_tasks=1)) as rm:
        fast, other = rm.alerts(), rm.alerts()
        slow = rm.alerts(buffer=1)
        got: list[trionats.Alert] = []

        async def consume() -> None:
            async for alert in fast:
                got.append(alert)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            rm.sample_now()  # tasks > 1: raised
            rm._limits = Limits(max_tasks=10_000)
            rm.sample_now()  # cleared
            rm._limits = Limits(max_tasks=1)
            rm.sample_now()  # raised again
            await wait_until(lambda: len(got) == 3)
            nursery.cancel_scope.cancel()
        assert [a.cleared for a in got] == [False, True, False]
        assert [a async for a in _take(other, 3)] == got
        assert slow.dropped == 2
        assert rm.alerts_dropped == 2
        assert await slow.__anext__() == got[0]


async def _take(stream: trionats.AlertStream, n: int):  # type: ignore[no-untyped-def]
    for _ in range(n):
        yield await stream.__anext__()


async def test_alert_iteration_is_cancellable_and_ends_with_the_manager() -> None:
    async with trionats.open_resource_manager(interval=60) as rm:
        alerts = rm.alerts()
        with trio.move_on_after(0.05) as scope:
            async for _ in alerts:
                pytest.fail("no alert expected")  # pragma: no cover
        assert scope.cancelled_caught
        # still usable after the cancel
        rm._limits = Limits(max_tasks=1)
        rm.sample_now()
        assert (await alerts.__anext__()).figure == "tasks"
        async with rm.alerts() as closed_early:
            pass
        assert [a async for a in closed_early] == []
    assert [a async for a in alerts] == []  # ends: the manager closed
    assert [a async for a in rm.alerts()] == []


async def test_leaving_the_block_leaves_no_task_and_stops_sampling() -> None:
    before = trio.lowlevel.current_statistics().tasks_living
    async with trionats.open_resource_manager(interval=0.01) as rm:
        await wait_until(lambda: rm.samples >= 2)
        assert trio.lowlevel.current_statistics().tasks_living > before
    assert trio.lowlevel.current_statistics().tasks_living == before
    samples = rm.samples
    await trio.sleep(0.05)
    assert rm.samples == samples
    assert rm.closed


async def test_an_error_in_the_block_comes_out_as_raised() -> None:
    with pytest.raises(KeyError, match="boom"):
        async with trionats.open_resource_manager():
            raise KeyError("boom")


# -- components against a real server -------------------------------------------------


async def test_snapshot_figures_and_windowed_rates(nats_url: str) -> None:
    config = trionats.PoolConfig(servers=[nats_url], idle_per_server=2)
    async with (
        trionats.open_pool(config) as pool,
        trionats.open_connection(nats_url) as nc,
        trionats.open_subscriber(nc) as sub,
        trionats.open_resource_manager(interval=60) as rm,
    ):

        async def handle(msg: trionats.Msg) -> None:
            pass

        await sub.start("rm.rates", handle)
        rm.register_pool("main", pool)
        rm.register_subscriber("orders", sub)
        rm.register_connection("events", nc)
        for _ in range(30):
            async with pool.borrow() as c:
                await c.publish("rm.rates", b"12345")
        await wait_until(lambda: sub.stats().processed == 30)
        peek = rm.system_stats()  # changes nothing
        snap = rm.sample_now()
        assert peek.component("orders").processed == 30  # type: ignore[union-attr]
        p, s, c = snap.component("main"), snap.component("orders"), snap.component("events")
        assert isinstance(p, trionats.PoolSnapshot)
        assert isinstance(s, trionats.SubscriberSnapshot)
        assert isinstance(c, trionats.ConnectionSnapshot)
        assert p.borrows == 30
        assert p.created == 1
        assert p.reused == 29
        assert p.reuse_rate == pytest.approx(29 / 30)
        assert p.open_connections == 1
        assert not p.closed
        assert p.idle_per_server == 2
        assert s.received == s.processed == 30
        assert s.window > 0
        assert s.throughput == pytest.approx(30 / s.window)
        assert s.drop_rate == 0
        assert s.failure_rate == 0
        assert s.handler_duration.count == 30
        assert s.max_workers == 64
        assert c.in_msgs == 30
        assert c.connected
        assert c.in_rate == pytest.approx(30 / c.window)
        proc = snap.process
        assert proc.rss_bytes > 1_000_000
        assert proc.open_fds > 3
        assert proc.threads >= 1
        assert proc.trio_tasks > 1
        assert proc.asyncio_tasks >= 1
        assert proc.cpu_seconds > 0
        assert len(proc.gc_collections) == len(proc.gc_pending) == 3
        assert snap.health.status is HealthStatus.HEALTHY
        assert snap.samples == 1
        # The next window starts at this sample: nothing happened since.
        again = rm.sample_now().component("orders")
        assert again.received == 0
        assert again.handler_duration.count == 0
        assert again.stats.received == 30


async def test_pool_limits(nats_url: str) -> None:
    config = trionats.PoolConfig(servers=[nats_url], max_per_server=1)
    limits = Limits(max_borrowed=0, max_open_connections=0, max_pool_wait=0.001)
    async with (
        trionats.open_pool(config) as pool,
        trionats.open_resource_manager(interval=60, limits=limits) as rm,
    ):
        rm.register_pool("main", pool)
        alerts = rm.alerts()
        assert rm.sample_now().alerts == ()
        got_one = trio.Event()

        async def waiter() -> None:
            async with pool.borrow():
                got_one.set()

        async with trio.open_nursery() as nursery, pool.borrow():
            nursery.start_soon(waiter)
            await wait_until(lambda: pool.stats().waiting == 1)
            snap = rm.sample_now()
            figures = {a.figure: a for a in snap.alerts}
            assert set(figures) == {"borrowed", "open_connections"}
            assert figures["borrowed"].value == 1
            assert figures["borrowed"].limit == 0
            # a limit of 0 never escalates
            assert figures["borrowed"].severity is Severity.WARNING
            await trio.sleep(0.02)
        await got_one.wait()
        snap = rm.sample_now()
        figures = {a.figure: a for a in snap.alerts}
        assert set(figures) == {"open_connections", "wait_p99"}  # borrowed cleared
        assert figures["wait_p99"].value >= 0.02
        assert figures["wait_p99"].severity is Severity.CRITICAL  # >= 2 x 1 ms
        events = [alerts._buffer.popleft() for _ in range(len(alerts._buffer))]
        assert [(a.figure, a.cleared) for a in events] == [
            ("borrowed", False),
            ("open_connections", False),
            ("borrowed", True),
            ("wait_p99", False),
        ]
        health = rm.health()
        assert health.component("main").status is HealthStatus.UNHEALTHY
        assert any("wait_p99" in r for r in health.component("main").reasons)


async def test_subscriber_limits_and_health_transitions(nats_url: str) -> None:
    release = trio.Event()

    async def handle(msg: trionats.Msg) -> None:
        if msg.data == b"fail":
            raise ValueError("bad message")
        if msg.data == b"slow":
            await trio.sleep(0.1)
        if msg.data == b"block":
            await release.wait()

    config = trionats.SubscriberConfig(max_workers=1, pending_msgs=3)
    limits = Limits(
        max_pending_msgs=1, max_pending_bytes=8, max_failure_rate=0.2, max_handler_p99=0.05
    )
    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_resource_manager(interval=60, limits=limits) as rm,
    ):
        async with trionats.open_subscriber(nc, config) as sub:
            await sub.start("rm.sub", handle)
            rm.register_subscriber("orders", sub)
            assert rm.health().component("orders").status is HealthStatus.HEALTHY
            # pending messages and bytes, then drops
            await nc.publish("rm.sub", b"block")
            await wait_until(lambda: sub.stats().in_flight == 1)
            for _ in range(10):
                await nc.publish("rm.sub", b"12345")
            await nc.flush()
            await wait_until(lambda: sub.stats().received == 11)
            snap = rm.sample_now()
            s = snap.component("orders")
            assert isinstance(s, trionats.SubscriberSnapshot)
            assert s.stats.pending == 3
            assert s.dropped == 7
            assert s.drop_rate > 0
            figures = {a.figure: a.severity for a in snap.alerts}
            assert figures == {
                "pending_msgs": Severity.CRITICAL,  # 3 >= 2 x 1
                "pending_bytes": Severity.WARNING,  # 15 > 8, < 16
                "drop_rate": Severity.WARNING,  # limit 0: never escalates
            }
            health = rm.health().component("orders")
            assert health.status is HealthStatus.UNHEALTHY
            assert len(health.reasons) == 3
            rules = {(x.rule, x.figure) for x in rm.suggestions()}
            assert ("subscriber_drops", "dropped") in rules
            assert ("subscriber_saturated", "in_flight") in rules
            text = next(x.text for x in rm.suggestions() if x.rule == "subscriber_drops")
            assert text.startswith("subscriber 'orders' dropped 7 messages in ")
            assert text.endswith(": raise max_workers (now 1) or the pending limits")
            await trio.sleep(0.1)  # the blocked run lasts >= 2 x max_handler_p99
            release.set()
            await wait_until(lambda: sub.stats().pending == 0 and sub.stats().in_flight == 0)
            snap = rm.sample_now()
            # pending and drops cleared; the blocked handler's run is this window's p99
            assert [a.figure for a in snap.alerts] == ["handler_p99"]
            assert rm.health().component("orders").status is HealthStatus.UNHEALTHY
            # failures, then slow handlers
            for _ in range(2):
                await nc.publish("rm.sub", b"fail")
            await nc.publish("rm.sub", b"ok")
            await wait_until(lambda: (sub.stats().processed, sub.stats().failed) == (5, 2))
            snap = rm.sample_now()
            (alert,) = snap.alerts  # handler_p99 cleared: fast handlers only
            assert alert.figure == "failure_rate"
            assert alert.value == pytest.approx(2 / 3)
            assert alert.severity is Severity.CRITICAL
            for _ in range(3):
                await nc.publish("rm.sub", b"slow")
            await wait_until(lambda: sub.stats().processed == 8)
            snap = rm.sample_now()
            assert [(a.figure, a.severity) for a in snap.alerts] == [
                ("handler_p99", Severity.CRITICAL)  # failure_rate cleared
            ]
            assert snap.alerts[0].value >= 0.1
            assert rm.health().component("orders").status is HealthStatus.UNHEALTHY
        # the subscriber exited: closed, unhealthy, and the sampler carries on
        snap = rm.sample_now()
        assert snap.component("orders").closed
        assert [a.figure for a in snap.alerts] == ["closed"]
        health = rm.health()
        assert health.component("orders") == trionats.ComponentHealth(
            "orders", "subscriber", HealthStatus.UNHEALTHY, ("closed",)
        )
        assert health.status is HealthStatus.UNHEALTHY
        assert health.reasons == ("subscriber 'orders': closed",)
        assert rm.suggestions() == []


async def test_connection_drop_rate_and_closed(nats_url: str) -> None:
    async with trionats.open_resource_manager(interval=60) as rm:
        async with trionats.open_connection(nats_url) as nc:
            rm.register_connection("events", nc)
            async with nc.subscribe("rm.slow", max_pending_msgs=1):
                for _ in range(5):
                    await nc.publish("rm.slow", b"x")
                await nc.flush()
                await wait_until(lambda: nc.stats().dropped >= 4)
                snap = rm.sample_now()
                (alert,) = snap.alerts
                assert (alert.component, alert.kind, alert.figure) == (
                    "events",
                    "connection",
                    "drop_rate",
                )
                (advice,) = rm.suggestions()
                assert advice.rule == "connection_drops"
                assert advice.value >= 4
                assert "(slow consumer)" in advice.text
        snap = rm.sample_now()
        assert snap.component("events").closed
        assert [(a.figure, a.cleared) for a in snap.alerts] == [("closed", False)]
        assert rm.health().component("events").status is HealthStatus.UNHEALTHY


async def test_pool_suggestions(nats_url: str) -> None:
    no_idle = trionats.PoolConfig(servers=[nats_url], idle_per_server=0)
    capped = trionats.PoolConfig(servers=[nats_url], max_per_server=1)
    async with (
        trionats.open_pool(no_idle) as cold,
        trionats.open_pool(capped) as busy,
        trionats.open_resource_manager(interval=60) as rm,
    ):
        rm.register_pool("cold", cold)
        rm.register_pool("busy", busy)
        for _ in range(20):  # every borrow dials: nothing is kept idle
            async with cold.borrow():
                pass

        async def borrow() -> None:
            async with busy.borrow():
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(borrow)
        with pytest.raises(trionats.PoolTimeoutError):
            async with busy.borrow(), busy.borrow(timeout=0.01):
                pass  # pragma: no cover
        rm.sample_now()
        advice = {(s.component, s.rule): s for s in rm.suggestions()}
        assert set(advice) == {
            ("cold", "pool_reuse"),
            ("busy", "pool_waits"),
            ("busy", "pool_timeouts"),
        }
        reuse = advice["cold", "pool_reuse"]
        assert reuse.text == "pool 'cold' reuse 0% < 80%: raise idle_per_server (now 0)"
        assert (reuse.figure, reuse.value, reuse.threshold) == ("reuse_rate", 0.0, 0.8)
        waits = advice["busy", "pool_waits"]
        assert waits.figure == "waits"
        assert waits.value > 0.1
        assert "raise max_per_server (now 1)" in waits.text
        assert advice["busy", "pool_timeouts"].value == 1


async def test_pool_dial_failures_and_leaks_suggestions(nats_url: str) -> None:
    config = trionats.PoolConfig(
        servers=[nats_url], leak_timeout=0.05, leak_action="report", dial_timeout=1
    )
    async with (
        trionats.open_pool(config) as pool,
        trionats.open_resource_manager(interval=60) as rm,
    ):
        rm.register_pool("main", pool)
        async with pool.borrow():
            await wait_until(lambda: pool.stats().leaks_detected == 1)
        rm.sample_now()
        (advice,) = rm.suggestions()
        assert (advice.rule, advice.figure, advice.value) == ("pool_leaks", "leaks_detected", 1)
    dead = trionats.PoolConfig(servers=["nats://127.0.0.1:1"], dial_timeout=1, backoff_min=0.01)
    async with (
        trionats.open_pool(dead) as pool,
        trionats.open_resource_manager(interval=60) as rm,
    ):
        rm.register_pool("dead", pool)
        with pytest.raises(trionats.PoolTimeoutError):
            async with pool.borrow(timeout=0.2):
                pass  # pragma: no cover
        rm.sample_now()
        rules = {s.rule for s in rm.suggestions()}
        assert "pool_dial_failures" in rules


def _fake_snapshot(**process: object) -> trionats.SystemStats:
    base = {
        "pid": 1,
        "rss_bytes": 1,
        "open_fds": 10,
        "max_fds": 1024,
        "cpu_seconds": 0.0,
        "cpu_percent": 0.0,
        "threads": 1,
        "trio_tasks": 1,
        "asyncio_tasks": 0,
        "gc_collections": (0, 0, 0),
        "gc_pending": (0, 0, 0),
    }
    base.update(process)
    conn = trionats.ConnectionSnapshot(
        name="events",
        stats=trionats.ConnectionStats(1, 1, 1, 1, 3, 0, 0),
        connected=True,
        closed=False,
        window=60.0,
        in_msgs=1,
        out_msgs=1,
        dropped=0,
        reconnects=2,
    )
    return trionats.SystemStats(
        time=0.0,
        pools=(),
        subscribers=(),
        connections=(conn,),
        process=trionats.ProcessStats(**base),  # type: ignore[arg-type]
    )


def test_reconnect_and_open_fds_rules() -> None:
    advice = _suggest(_fake_snapshot(open_fds=900))
    assert [(s.rule, s.figure, s.value) for s in advice] == [
        ("connection_reconnects", "reconnects", 2),
        ("open_fds", "open_fds", 900),
    ]
    assert advice[0].text == (
        "connection 'events' reconnected 2 times in 60 s: check the network and the server's log"
    )
    assert str(advice[1]).startswith("process: 900 open file descriptors, 88% of the limit 1,024")
    assert [s.rule for s in _suggest(_fake_snapshot(open_fds=800))] == ["connection_reconnects"]


async def test_process_limits(nats_url: str) -> None:
    limits = Limits(max_rss_bytes=1000, max_open_fds=1, max_tasks=1_000_000)
    async with trionats.open_resource_manager(interval=60, limits=limits) as rm:
        snap = rm.sample_now()
        assert {(a.figure, a.severity) for a in snap.alerts} == {
            ("rss_bytes", Severity.CRITICAL),
            ("open_fds", Severity.CRITICAL),
        }
        assert rm.health().component("process").status is HealthStatus.UNHEALTHY


async def test_unregistering_stops_sampling(nats_url: str) -> None:
    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_subscriber(nc) as sub,
        trionats.open_resource_manager(interval=60, limits=Limits(max_pending_msgs=0)) as rm,
    ):
        with rm.register_connection("events", nc) as registration:
            rm.register_subscriber("orders", sub)
            assert registration.name == "events"
            assert rm.names == ["events", "orders"]
            assert [c.name for c in rm.sample_now().connections] == ["events"]
        assert rm.names == ["orders"]
        assert rm.sample_now().connections == ()
        registration.unregister()  # a second time: nothing happens
        rm.register_connection("events", nc)  # the name is free again
        rm.unregister("orders")
        assert [*rm.names] == ["events"]
        assert rm.sample_now().subscribers == ()
        assert "orders" not in {c.name for c in rm.health().components}


async def test_publishing_snapshots(nats_url: str) -> None:
    async with (
        trionats.open_connection(nats_url) as nc,
        nc.subscribe("trionats.stats.>") as stats_sub,
        trionats.open_resource_manager(interval=0.05, publish_on=nc, name="svc") as rm,
    ):
        assert rm.publish_subject == f"trionats.stats.{rm.id}"
        rm.register_connection("events", nc)
        with trio.fail_after(10):
            msg = await stats_sub.next_msg()
        assert msg.subject == rm.publish_subject
        body = json.loads(msg.data)
        assert body["type"] == "io.trionats.resource_stats.v1"
        assert body["id"] == rm.id
        assert body["name"] == "svc"
        assert body["interval"] == 0.05
        assert body["health"] == "healthy"
        assert body["process"]["pid"] > 0
        (conn,) = body["connections"]
        assert conn["name"] == "events"
        assert conn["health"] == "healthy"
        assert conn["connected"]
        await wait_until(lambda: rm.published >= 2)
    async with trionats.open_resource_manager(interval=60) as quiet:
        assert quiet.publish_subject is None


async def test_publishing_on_a_closed_connection_is_counted(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        pass
    async with trionats.open_resource_manager(interval=0.01, publish_on=nc) as rm:
        await wait_until(lambda: rm.publish_errors >= 2)
        assert rm.published == 0


def test_window_latency() -> None:
    h = Histogram()
    for _ in range(100):
        h.record(0.001)
    before = h.snapshot()
    for _ in range(10):
        h.record(0.1)
    window = window_latency(h.snapshot(), before)
    assert window.count == 10
    assert window.sum == pytest.approx(1.0)
    assert 0.1 <= window.p50 <= 0.1 * 1.0625
    assert window.max == pytest.approx(0.1)
    assert window_latency(h.snapshot(), h.snapshot()).count == 0
    assert window_latency(before, None) is before
