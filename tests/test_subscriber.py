"""The concurrent subscriber against a real nats-server on 127.0.0.1."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import pytest
import trio
import trio.testing

import trionats
from trionats._config import PoolConfig
from trionats._pool import open_pool
from trionats._subscriber import (
    SubscriberConfig,
    SubscriberStats,
    SubscriptionHandle,
    open_subscriber,
)


def balanced(s: SubscriberStats) -> bool:
    return s.received == (
        s.processed + s.failed + s.timed_out + s.dropped + s.in_flight + s.pending
    )


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Bounded polling: for conditions that depend on the server, not on our tasks."""
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - the condition has no event to wait on
            await trio.sleep(0.005)


async def publish_n(nc: trionats.Connection, subject: str, n: int) -> None:
    for i in range(n):
        await nc.publish(subject, str(i).encode())
    await nc.flush()


# -- configuration and arguments -------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_workers", 0),
        ("max_workers", -3),
        ("pending_msgs", 0),
        ("pending_msgs", -1),
        ("pending_bytes", -1),
        ("handler_timeout", 0),
        ("handler_timeout", -1),
        ("handler_timeout", math.inf),
        ("handler_timeout", math.nan),
        ("stop_timeout", -1),
        ("stop_timeout", math.nan),
        ("stop_timeout", math.inf),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"SubscriberConfig\.{field} .*{value!r}"):
        SubscriberConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_workers", "x"),
        ("max_workers", True),
        ("max_workers", 1.5),
        ("max_workers", None),
        ("pending_msgs", 2.0),
        ("pending_bytes", "1"),
        ("handler_timeout", "5"),
        ("handler_timeout", False),
        ("stop_timeout", "1"),
    ],
)
def test_config_rejects_bad_types_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(TypeError, match=rf"SubscriberConfig\.{field} .*{value!r}"):
        SubscriberConfig(**{field: value})  # type: ignore[arg-type]


def test_config_timeouts_accept_none_as_no_deadline() -> None:
    config = SubscriberConfig(handler_timeout=None, stop_timeout=None)
    assert (config.handler_timeout, config.stop_timeout) == (None, None)
    assert SubscriberConfig(stop_timeout=0, handler_timeout=1).stop_timeout == 0.0


def test_config_defaults() -> None:
    config = SubscriberConfig()
    assert (config.max_workers, config.pending_msgs, config.pending_bytes) == (
        64,
        128 * 1024,
        256 * 1024 * 1024,
    )
    assert (config.handler_timeout, config.stop_timeout) == (None, 5.0)
    with pytest.raises(AttributeError):
        config.max_workers = 3  # type: ignore[misc]


async def test_bad_arguments(nats_url: str) -> None:
    async def handler(msg: trionats.Msg) -> None:
        pass  # pragma: no cover

    async with trionats.open_connection(nats_url) as nc:
        with pytest.raises(TypeError):
            async with open_subscriber(nc, {"max_workers": 3}):  # type: ignore[arg-type]
                pass  # pragma: no cover
        async with open_subscriber(nc) as subscriber:
            with pytest.raises(ValueError, match="subject"):
                await subscriber.start("a..b", handler)
            with pytest.raises(ValueError, match="max_workers"):
                await subscriber.start("a", handler, max_workers=0)
            with pytest.raises(TypeError):
                await subscriber.start("a", "not callable")  # type: ignore[arg-type]
            handle = await subscriber.start("a", handler)
            with pytest.raises(ValueError, match="timeout"):
                await handle.stop(timeout=-1)
            assert subscriber.stats().active == 1
        with pytest.raises(trionats.SubscriptionClosedError):
            await subscriber.start("a", handler)


# -- concurrency -------------------------------------------------------------------------


@pytest.mark.parametrize("max_workers", [1, 8, 64])
async def test_peak_concurrency_equals_max_workers_without_overfetch(
    nats_url: str, max_workers: int
) -> None:
    n = 3 * max_workers + 10
    running = peak = 0
    all_busy = trio.Event()
    snapshot: list[SubscriberStats] = []
    handle: SubscriptionHandle | None = None

    async def handler(msg: trionats.Msg) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == max_workers and not all_busy.is_set():
            assert handle is not None
            snapshot.append(handle.stats())
            all_busy.set()
        await all_busy.wait()
        await trio.sleep(0.001)  # simulated work
        running -= 1

    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_connection(nats_url) as pub,
        open_subscriber(nc, SubscriberConfig(max_workers=max_workers)) as subscriber,
    ):
        handle = await subscriber.start("work", handler)
        await publish_n(pub, "work", n)
        await wait_until(lambda: handle.stats().processed == n)
        assert peak == max_workers
        # While every slot was busy nothing more had been taken: the rest were pending.
        (busy,) = snapshot
        assert busy.in_flight == max_workers
        assert busy.received == busy.in_flight + busy.pending
        assert balanced(handle.stats())
        assert subscriber.stats() == handle.stats()


async def test_max_workers_shared_by_handles_and_per_handle_limit(nats_url: str) -> None:
    running = {"a": 0, "b": 0}
    peak = {"a": 0, "b": 0, "total": 0}
    gate = trio.Event()

    async def handler(msg: trionats.Msg) -> None:
        running[msg.subject] += 1
        peak[msg.subject] = max(peak[msg.subject], running[msg.subject])
        peak["total"] = max(peak["total"], running["a"] + running["b"])
        await gate.wait()
        running[msg.subject] -= 1

    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_connection(nats_url) as pub,
        open_subscriber(nc, SubscriberConfig(max_workers=5)) as subscriber,
    ):
        a = await subscriber.start("a", handler, max_workers=2)
        b = await subscriber.start("b", handler)
        await publish_n(pub, "a", 10)
        await publish_n(pub, "b", 10)
        await wait_until(lambda: a.stats().received == 10 and b.stats().received == 10)
        await trio.testing.wait_all_tasks_blocked()
        assert a.stats().in_flight == 2
        assert a.stats().in_flight + b.stats().in_flight == 5
        assert subscriber.stats().in_flight == 5
        assert subscriber.stats().pending == 15
        gate.set()
        await wait_until(lambda: subscriber.stats().processed == 20)
        assert peak["a"] == 2
        assert peak["total"] == 5
        assert [h.subject for h in subscriber.active()] == ["a", "b"]
        assert subscriber.stats().active == 2


async def test_queue_group_members_share_the_work(nats_url: str) -> None:
    seen: list[str] = []

    async def handler(msg: trionats.Msg) -> None:
        seen.append(msg.data.decode())

    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_connection(nats_url) as pub,
        open_subscriber(nc) as subscriber,
    ):
        one = await subscriber.start("jobs", handler, queue="workers")
        two = await subscriber.start("jobs", handler, queue="workers")
        assert (one.queue, one.subject) == ("workers", "jobs")
        await publish_n(pub, "jobs", 200)
        await wait_until(lambda: len(seen) == 200)
        assert sorted(seen, key=int) == [str(i) for i in range(200)]
        assert one.stats().processed + two.stats().processed == 200
        assert subscriber.stats().received == 200


# -- handler results, failures, timeouts -------------------------------------------------


async def test_reply_failure_isolation_and_timeout(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(msg: trionats.Msg) -> bytes | None:
        if msg.data == b"boom":
            raise KeyError("no\r\nsuch order")
        if msg.data == b"slow":
            await trio.sleep_forever()
        return b"echo:" + msg.data

    config = SubscriberConfig(max_workers=4, handler_timeout=0.2)
    with caplog.at_level(logging.WARNING, logger="trionats.subscriber"):
        async with (
            trionats.open_connection(nats_url) as nc,
            trionats.open_connection(nats_url) as client,
            open_subscriber(nc, config) as subscriber,
        ):
            handle = await subscriber.start("svc.echo", handler)
            ok = await client.request("svc.echo", b"hi", timeout=5)
            assert (ok.data, ok.headers) == (b"echo:hi", None)
            failed = await client.request("svc.echo", b"boom", timeout=5)
            assert failed.data == b""
            assert failed.headers is not None
            assert failed.headers["Nats-Service-Error-Code"] == "500"
            assert "KeyError" in failed.headers["Nats-Service-Error"]
            assert "\n" not in failed.headers["Nats-Service-Error"]
            slow = await client.request("svc.echo", b"slow", timeout=5)
            assert slow.headers is not None
            assert slow.headers["Nats-Service-Error-Code"] == "504"
            # The subscription survived both and still answers.
            again = await client.request("svc.echo", b"again", timeout=5)
            assert again.data == b"echo:again"
            # Plain messages (no reply subject) that fail are counted too.
            await client.publish("svc.echo", b"boom")
            await client.flush()
            await wait_until(lambda: handle.stats().failed == 2)
            s = handle.stats()
            assert (s.processed, s.failed, s.timed_out, s.cancelled) == (2, 2, 1, 0)
            assert balanced(s)
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 2  # once per failure
    assert all("svc.echo" in r.getMessage() and "KeyError" in r.getMessage() for r in failures)
    assert all(r.exc_info is not None for r in failures)
    timeouts = [r for r in caplog.records if "timed out" in r.getMessage()]
    assert len(timeouts) == 1


async def test_many_failures_do_not_disturb_other_handlers(nats_url: str) -> None:
    async def handler(msg: trionats.Msg) -> None:
        await trio.sleep(0.001)
        if int(msg.data) % 3 == 0:
            raise RuntimeError(f"bad {msg.data!r}")

    logging.getLogger("trionats.subscriber").disabled = True
    try:
        async with (
            trionats.open_connection(nats_url) as nc,
            trionats.open_connection(nats_url) as pub,
            open_subscriber(nc, SubscriberConfig(max_workers=8)) as subscriber,
        ):
            handle = await subscriber.start("mixed", handler)
            await publish_n(pub, "mixed", 300)
            await wait_until(lambda: handle.stats().processed + handle.stats().failed == 300)
            assert handle.stats().failed == 100
            assert handle.stats().processed == 200
            assert subscriber.active() == [handle]
    finally:
        logging.getLogger("trionats.subscriber").disabled = False


# -- pending limits -----------------------------------------------------------------------


async def test_pending_limits_enforce_a_counted_drop(nats_url: str) -> None:
    gate = trio.Event()

    async def handler(msg: trionats.Msg) -> None:
        await gate.wait()

    config = SubscriberConfig(max_workers=2, pending_msgs=5)
    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_connection(nats_url) as pub,
        open_subscriber(nc, config) as subscriber,
    ):
        events = nc.events()  # iteration ends when the connection closes
        handle = await subscriber.start("flood", handler)
        await publish_n(pub, "flood", 30)
        await wait_until(lambda: handle.stats().received == 30 and handle.stats().in_flight == 2)
        s = handle.stats()
        # The buffer holds at most 5; the read loop may fill it before the dispatcher has
        # taken the first two, so between 3 and 5 are still pending.
        assert s.in_flight == 2
        assert 3 <= s.pending <= 5
        assert s.dropped == 28 - s.pending
        assert balanced(s)
        assert nc.stats().dropped == s.dropped
        first = s.dropped
        gate.set()
        await wait_until(lambda: handle.stats().processed == 30 - first)
        # A second flood is a second transition into the dropping state.
        gate = trio.Event()
        await publish_n(pub, "flood", 30)
        await wait_until(lambda: handle.stats().received == 60 and handle.stats().in_flight == 2)
        s = handle.stats()
        assert s.dropped - first == 28 - s.pending
        gate.set()
        await wait_until(lambda: handle.stats().processed == 60 - handle.stats().dropped)
        assert balanced(handle.stats())
    slow = [e async for e in events if e.kind is trionats.EventKind.SLOW_CONSUMER]
    assert [e.subject for e in slow] == ["flood", "flood"]


async def test_pending_bytes_limit(nats_url: str) -> None:
    gate = trio.Event()

    async def handler(msg: trionats.Msg) -> None:
        await gate.wait()

    config = SubscriberConfig(max_workers=1, pending_bytes=250)
    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_connection(nats_url) as pub,
        open_subscriber(nc, config) as subscriber,
    ):
        handle = await subscriber.start("big", handler)
        for _ in range(6):
            await pub.publish("big", b"x" * 100)
        await pub.flush()
        await wait_until(lambda: handle.stats().received == 6 and handle.stats().in_flight == 1)
        s = handle.stats()
        # The buffer holds two (250 bytes); one of them may already be with the worker.
        assert s.in_flight == 1
        assert 1 <= s.pending <= 2
        assert s.pending_bytes == 100 * s.pending
        assert s.dropped == 5 - s.pending
        gate.set()


# -- stop ---------------------------------------------------------------------------------


async def test_stop_lets_in_flight_work_finish_and_unsubscribes(nats_url: str) -> None:
    gate = trio.Event()
    done: list[bytes] = []

    async def handler(msg: trionats.Msg) -> None:
        await gate.wait()
        await trio.sleep(0.001)
        done.append(msg.data)

    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_connection(nats_url) as pub,
        open_subscriber(nc, SubscriberConfig(max_workers=4)) as subscriber,
    ):
        handle = await subscriber.start("s", handler)
        await publish_n(pub, "s", 6)
        await wait_until(lambda: handle.stats().received == 6 and handle.stats().in_flight == 4)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle.stop, 30)
            await trio.testing.wait_all_tasks_blocked()
            assert not handle.stopped
            assert subscriber.active() == []  # no longer taking
            # Unsubscribed: the server sends no more.
            await nc.flush()
            await publish_n(pub, "s", 5)
            await pub.flush()
            s = handle.stats()
            assert (s.received, s.in_flight, s.pending, s.dropped) == (6, 4, 0, 2)
            gate.set()
        assert handle.stopped
        assert len(done) == 4
        s = handle.stats()
        assert (s.processed, s.cancelled, s.in_flight, s.active) == (4, 0, 0, 0)
        assert balanced(s)
        assert subscriber.stats().active == 0
        await handle.stop()  # twice is fine


async def test_stop_cancels_what_does_not_finish_in_time(nats_url: str) -> None:
    finished_after_stop: list[int] = []
    stopped = False

    async def handler(msg: trionats.Msg) -> None:
        try:
            await trio.sleep_forever()
        finally:
            if stopped:
                finished_after_stop.append(1)  # pragma: no cover

    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_connection(nats_url) as pub,
        open_subscriber(nc, SubscriberConfig(max_workers=3)) as subscriber,
    ):
        handle = await subscriber.start("hang", handler)
        await publish_n(pub, "hang", 3)
        await wait_until(lambda: handle.stats().in_flight == 3)
        start = trio.current_time()
        await handle.stop(timeout=0.2)
        stopped = True
        assert 0.2 <= trio.current_time() - start < 5
        s = handle.stats()
        assert (s.processed, s.timed_out, s.cancelled, s.in_flight) == (0, 3, 3, 0)
        assert balanced(s)
        await trio.testing.wait_all_tasks_blocked()
    assert finished_after_stop == []


async def test_stop_is_cancellable_and_still_completes(nats_url: str) -> None:
    async def handler(msg: trionats.Msg) -> None:
        await trio.sleep_forever()

    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_connection(nats_url) as pub,
        open_subscriber(nc) as subscriber,
    ):
        first = await subscriber.start("c1", handler)
        second = await subscriber.start("c2", handler)
        await publish_n(pub, "c1", 2)
        await publish_n(pub, "c2", 2)
        await wait_until(lambda: subscriber.stats().in_flight == 4)
        # Cancelled while waiting for the grace period: the rest is cancelled at once.
        with trio.move_on_after(0.1) as scope:
            await first.stop(timeout=60)
        assert scope.cancelled_caught
        assert first.stopped
        assert first.stats().cancelled == 2
        # Already cancelled when called: still stops, then Cancelled propagates.
        with trio.CancelScope() as scope:
            scope.cancel()
            await second.stop(timeout=60)
        assert scope.cancelled_caught
        assert second.stopped
        assert second.stats().cancelled == 2
        assert subscriber.stats().cancelled == 4
        assert subscriber.stats().active == 0


async def test_start_is_cancellable(nats_url: str) -> None:
    async def handler(msg: trionats.Msg) -> None:
        pass  # pragma: no cover

    async with trionats.open_connection(nats_url) as nc, open_subscriber(nc) as subscriber:
        with trio.CancelScope() as scope:
            scope.cancel()
            await subscriber.start("never", handler)
        assert scope.cancelled_caught
        assert subscriber.active() == []
        assert subscriber.stats().active == 0
        handle = await subscriber.start("after", handler)
        assert subscriber.active() == [handle]


async def test_leaving_the_block_gives_in_flight_handlers_the_grace_period(
    nats_url: str,
) -> None:
    async def handler(msg: trionats.Msg) -> None:
        await trio.sleep(0.05)

    async with trionats.open_connection(nats_url) as nc, trionats.open_connection(nats_url) as pub:
        async with open_subscriber(nc, SubscriberConfig(max_workers=8)) as subscriber:
            handle = await subscriber.start("g", handler)
            await publish_n(pub, "g", 8)
            await wait_until(lambda: handle.stats().in_flight == 8)
        s = subscriber.stats()
        assert (s.processed, s.cancelled, s.active, s.in_flight) == (8, 0, 0, 0)
        assert handle.stopped


async def test_an_exception_in_the_block_still_stops_gracefully(nats_url: str) -> None:
    async def handler(msg: trionats.Msg) -> None:
        await trio.sleep(0.05)

    async with trionats.open_connection(nats_url) as nc, trionats.open_connection(nats_url) as pub:
        subscribers = []

        async def body() -> None:
            async with open_subscriber(nc) as subscriber:
                subscribers.append(subscriber)
                handle = await subscriber.start("e", handler)
                await publish_n(pub, "e", 3)
                await wait_until(lambda: handle.stats().in_flight == 3)
                raise LookupError("user error")

        with pytest.raises(LookupError, match="user error"):  # not wrapped in a group
            await body()
        assert subscribers[0].stats().processed == 3


async def test_outer_cancel_stops_with_the_time_that_is_left(nats_url: str) -> None:
    stopped = False
    ran_after: list[str] = []

    async def handler(msg: trionats.Msg) -> None:
        try:
            if msg.data == b"quick":
                await trio.sleep(0.01)
            else:
                await trio.sleep_forever()
        finally:
            if stopped:
                ran_after.append(msg.data.decode())  # pragma: no cover

    config = SubscriberConfig(stop_timeout=60)
    async with trionats.open_connection(nats_url) as nc, trionats.open_connection(nats_url) as pub:
        start = trio.current_time()
        with trio.move_on_after(1) as scope:
            async with open_subscriber(nc, config) as subscriber:
                handle = await subscriber.start("o", handler)
                await pub.publish("o", b"slow")
                await pub.publish("o", b"slow")
                await publish_n(pub, "o", 0)
                await wait_until(lambda: handle.stats().in_flight == 2)
                await pub.publish("o", b"quick")
                await trio.sleep_forever()
        stopped = True
        assert scope.cancelled_caught
        assert trio.current_time() - start < 10  # not the 60 s stop_timeout
        s = subscriber.stats()
        assert (s.processed, s.cancelled, s.in_flight, s.active) == (1, 2, 0, 0)
        assert balanced(s)
        await trio.testing.wait_all_tasks_blocked()
    assert ran_after == []


async def test_subscription_ends_when_its_connection_closes(nats_url: str) -> None:
    async def handler(msg: trionats.Msg) -> None:
        pass

    async with trionats.open_connection(nats_url) as nc, open_subscriber(nc) as subscriber:
        handle = await subscriber.start("x", handler)
        await nc.aclose()
        with trio.fail_after(5):
            await handle.stop()
        assert handle.stopped
        assert subscriber.active() == []


async def test_subscriber_on_a_pool_borrows_one_connection(nats_url: str) -> None:
    async def handler(msg: trionats.Msg) -> bytes:
        return msg.data.upper()

    async with open_pool(PoolConfig(servers=[nats_url])) as pool:
        async with open_subscriber(pool) as subscriber:
            await subscriber.start("up", handler)
            assert pool.stats().borrowed == 1
            async with pool.borrow() as nc:
                reply = await nc.request("up", b"abc", timeout=5)
            assert reply.data == b"ABC"
        assert pool.stats().borrowed == 0
        assert subscriber.stats().processed == 1


async def test_open_subscriber_rejects_other_objects() -> None:
    with pytest.raises(TypeError, match="Connection or a Pool"):
        async with open_subscriber("nats://127.0.0.1:4222"):  # type: ignore[arg-type]
            pass  # pragma: no cover


# -- reconnect ----------------------------------------------------------------------------


async def test_subscriptions_recover_after_a_server_restart(
    nats_server: trionats.NatsServer,
) -> None:
    got: list[bytes] = []

    async def handler(msg: trionats.Msg) -> None:
        got.append(msg.data)

    async with (
        trionats.open_connection(nats_server.url, reconnect_time_wait=0.05) as nc,
        trionats.open_connection(nats_server.url, reconnect_time_wait=0.05) as pub,
        open_subscriber(nc) as subscriber,
    ):
        handle = await subscriber.start("r", handler, queue="q")
        await publish_n(pub, "r", 1)
        await wait_until(lambda: got == [b"0"])
        await nats_server.stop()
        await wait_until(lambda: not nc.is_connected and not pub.is_connected)
        await nats_server.start()
        await wait_until(lambda: nc.is_connected and pub.is_connected, timeout=15)
        # Both sides reconnected; the subscription is registered again without any help.
        with trio.fail_after(10):
            while b"after" not in got:
                await pub.publish("r", b"after")
                await pub.flush()
                await trio.sleep(0.02)
        assert subscriber.active() == [handle]
        assert balanced(handle.stats())
