"""Stopping, against a real nats-server on 127.0.0.1: handlers that shield themselves from
cancellation, ``timeout=None`` (no deadline of its own), and a frozen server."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio

import trionats
from trionats._server import _all_threads_stopped
from trionats._subscriber import SubscriberConfig, SubscriberStats, open_subscriber

LOGGER = "trionats.subscriber"


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


def warnings_from(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING and text in r.getMessage()
    ]


def is_descendant(task: trio.lowlevel.Task, nursery: trio.Nursery) -> bool:
    """``task`` runs inside ``nursery`` (as a child, or deeper)."""
    current: trio.Nursery | None = task.parent_nursery
    while current is not None:
        if current is nursery:
            return True
        current = current.parent_task.parent_nursery
    return False


# -- 1. a handler shielded from cancellation ----------------------------------------------


async def test_stop_returns_within_its_timeout_when_a_handler_shields_itself(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    release = trio.Event()
    handler_tasks: list[trio.lowlevel.Task] = []

    async def stubborn_handler(msg: trionats.Msg) -> None:
        handler_tasks.append(trio.lowlevel.current_task())
        with trio.CancelScope(shield=True), trio.move_on_after(5):  # shielded for up to 5 s
            await release.wait()

    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_connection(nats_url) as pub,
        open_subscriber(nc) as subscriber,
    ):
        handle = await subscriber.start("stuck.sub", stubborn_handler)
        await publish_n(pub, "stuck.sub", 1)
        await wait_until(lambda: handle.stats().in_flight == 1)

        start = trio.current_time()
        await handle.stop(timeout=0.5)
        elapsed = trio.current_time() - start
        assert 0.5 <= elapsed < 0.5 + 1.0, elapsed  # not the handler's 5 s

        # Warned, naming the subject, the handler and its task.
        (warning,) = warnings_from(caplog, "did not end")
        assert "'stuck.sub'" in warning
        assert "stubborn_handler" in warning
        (task,) = handler_tasks
        assert repr(task) in warning
        assert f"in {stubborn_handler.__qualname__} (" in warning  # where it is waiting

        # Still running, still counted, still inside the subscriber's nursery.
        assert not handle.stopped
        assert task in handle._workers.child_tasks  # type: ignore[union-attr]
        assert is_descendant(task, subscriber._nursery)
        s = handle.stats()
        assert (s.in_flight, s.processed, s.active) == (1, 0, 1)
        assert balanced(s)
        assert subscriber.active() == []  # no longer taking messages

        release.set()  # the handler ends later: its outcome is counted
        await wait_until(lambda: handle.stopped)
        s = handle.stats()
        assert (s.in_flight, s.processed, s.cancelled, s.active) == (0, 1, 0, 0)
        assert balanced(s)


async def test_cancelled_stop_is_bounded_with_a_shielded_handler(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    release = trio.Event()

    async def stubborn(msg: trionats.Msg) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await release.wait()

    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_connection(nats_url) as pub,
        open_subscriber(nc) as subscriber,
    ):
        handle = await subscriber.start("stuck.cancel", stubborn)
        await publish_n(pub, "stuck.cancel", 1)
        await wait_until(lambda: handle.stats().in_flight == 1)
        start = trio.current_time()
        with trio.move_on_after(0.3) as scope:
            await handle.stop(timeout=60)
        assert scope.cancelled_caught  # Cancelled propagated, after a bounded wait
        assert trio.current_time() - start < 0.3 + 1.0
        assert warnings_from(caplog, "handle.stop() (cancelled)")
        assert not handle.stopped
        release.set()
        await wait_until(lambda: handle.stopped)
        assert handle.stats().in_flight == 0


async def test_leaving_open_subscriber_waits_for_a_shielded_handler_and_logs_again(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The rule: the block's exit never abandons a handler. Once its grace period (plus
    0.25 s) is over it logs a WARNING, then waits until the handler ends."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    release = trio.Event()
    released_at: list[float] = []

    async def stubborn(msg: trionats.Msg) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await release.wait()

    async def release_after_the_exit_warning() -> None:
        await wait_until(lambda: bool(warnings_from(caplog, "leaving open_subscriber")))
        released_at.append(trio.current_time())
        release.set()

    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_connection(nats_url) as pub,
        trio.open_nursery() as helpers,
    ):
        async with open_subscriber(nc, SubscriberConfig(stop_timeout=0.3)) as subscriber:
            handle = await subscriber.start("stuck.exit", stubborn)
            await publish_n(pub, "stuck.exit", 1)
            await wait_until(lambda: handle.stats().in_flight == 1)
            helpers.start_soon(release_after_the_exit_warning)
            exit_started = trio.current_time()
        exited = trio.current_time()
        (warning,) = warnings_from(caplog, "leaving open_subscriber")
        assert "'stuck.exit'" in warning
        assert "stubborn" in warning
        assert released_at  # the exit waited for the handler ...
        assert exited >= released_at[0]
        assert released_at[0] - exit_started >= 0.3  # ... after the grace period
        assert handle.stopped
        s = subscriber.stats()
        assert (s.processed, s.in_flight, s.active) == (1, 0, 0)
        assert balanced(s)


# -- 2. timeout=None: no deadline of its own ------------------------------------------------


async def test_stop_none_waits_for_a_slow_handler(nats_url: str) -> None:
    async def slow(msg: trionats.Msg) -> None:
        await trio.sleep(0.3)  # the work itself, not a wait for an event

    # stop_timeout=0.01: stop(None) must not fall back to it.
    config = SubscriberConfig(stop_timeout=0.01)
    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_connection(nats_url) as pub,
        open_subscriber(nc, config) as subscriber,
    ):
        handle = await subscriber.start("slow.none", slow)
        await publish_n(pub, "slow.none", 2)
        await wait_until(lambda: handle.stats().in_flight == 2)
        await handle.stop(None)
        assert handle.stopped
        s = handle.stats()
        assert (s.processed, s.cancelled, s.timed_out, s.in_flight) == (2, 0, 0, 0)


async def test_stop_none_is_bounded_by_an_enclosing_cancel_scope(nats_url: str) -> None:
    async def forever(msg: trionats.Msg) -> None:
        await trio.sleep_forever()

    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_connection(nats_url) as pub,
        open_subscriber(nc) as subscriber,
    ):
        handle = await subscriber.start("forever.none", forever)
        await publish_n(pub, "forever.none", 2)
        await wait_until(lambda: handle.stats().in_flight == 2)
        start = trio.current_time()
        with trio.move_on_after(0.3) as scope:
            await handle.stop(None)
        assert scope.cancelled_caught
        assert 0.3 <= trio.current_time() - start < 0.3 + 1.0
        assert handle.stopped  # the stop was completed before Cancelled propagated
        s = handle.stats()
        assert (s.cancelled, s.in_flight) == (2, 0)
        assert balanced(s)


async def test_stop_timeout_none_in_the_config_waits_for_handlers_on_exit(nats_url: str) -> None:
    async def slow(msg: trionats.Msg) -> None:
        await trio.sleep(0.2)

    async with trionats.open_connection(nats_url) as nc, trionats.open_connection(nats_url) as pub:
        async with open_subscriber(nc, SubscriberConfig(stop_timeout=None)) as subscriber:
            handle = await subscriber.start("slow.exit", slow)
            await publish_n(pub, "slow.exit", 3)
            await wait_until(lambda: handle.stats().in_flight == 3)
        s = subscriber.stats()
        assert (s.processed, s.cancelled, s.in_flight, s.active) == (3, 0, 0, 0)


async def test_start_timeout_none_means_no_deadline_of_its_own(nats_url: str) -> None:
    async def handler(msg: trionats.Msg) -> bytes:
        return b"ok"

    async with trionats.open_connection(nats_url) as nc, open_subscriber(nc) as subscriber:
        await subscriber.start("no.deadline", handler, timeout=None)
        reply = await nc.request("no.deadline", b"", timeout=5)
        assert reply.data == b"ok"


# -- 7. a frozen server: every wait is bounded ---------------------------------------------


@asynccontextmanager
async def frozen(server: trionats.NatsServer) -> AsyncIterator[None]:
    """The server frozen for the block (the harness's ``freeze``), thawed after."""
    await server.freeze()
    try:
        yield
    finally:
        with trio.CancelScope(shield=True):
            await server.thaw()


async def test_start_on_a_frozen_server_times_out(nats_server: trionats.NatsServer) -> None:
    async with (
        trionats.open_connection(nats_server.url) as nc,
        open_subscriber(nc) as subscriber,
    ):
        async with frozen(nats_server):
            start = trio.current_time()
            with pytest.raises(trionats.TimeoutError, match=r"'frozen\.sub' within 0\.5 s"):
                await subscriber.start("frozen.sub", async_function, timeout=0.5)
            assert 0.5 <= trio.current_time() - start < 0.5 + 1.0
            assert subscriber.active() == []
            assert subscriber.stats().active == 0
        # The server is back: the subscriber works.
        handle = await subscriber.start("thawed", async_function)
        reply = await nc.request("thawed", b"", timeout=5)
        assert reply.data == b"function"
        assert subscriber.active() == [handle]


async def async_function(msg: trionats.Msg) -> bytes:
    return b"function"


async def test_start_timeout_argument(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc, open_subscriber(nc) as subscriber:
        with pytest.raises(TypeError, match=r"timeout .*'1'"):
            await subscriber.start("a", async_function, timeout="1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"timeout .*-1"):
            await subscriber.start("a", async_function, timeout=-1)
        assert subscriber.stats().active == 0


async def test_stop_and_leaving_the_block_on_a_frozen_server_are_bounded(
    nats_server: trionats.NatsServer,
) -> None:
    """Unsubscribing waits for no answer from the server: a frozen one cannot hang a stop."""

    async def forever(msg: trionats.Msg) -> None:
        await trio.sleep_forever()

    async with (
        trionats.open_connection(nats_server.url) as nc,
        trionats.open_connection(nats_server.url) as pub,
    ):
        try:
            async with open_subscriber(nc, SubscriberConfig(stop_timeout=0.2)) as subscriber:
                first = await subscriber.start("frozen.first", forever)
                second = await subscriber.start("frozen.second", forever)
                await publish_n(pub, "frozen.first", 1)
                await publish_n(pub, "frozen.second", 1)
                await wait_until(lambda: subscriber.stats().in_flight == 2)
                await nats_server.freeze()  # until after the subscriber's exit
                start = trio.current_time()
                await first.stop(timeout=0.2)
                assert 0.2 <= trio.current_time() - start < 0.2 + 1.0
                assert first.stopped
                exit_started = trio.current_time()
            assert trio.current_time() - exit_started < 0.2 + 1.0  # stop_timeout, not more
            assert nats_server.pid is not None
            assert _all_threads_stopped(nats_server.pid)  # still frozen (read from /proc)
        finally:
            with trio.CancelScope(shield=True):
                await nats_server.thaw()
        assert second.stopped
        s = subscriber.stats()
        assert (s.cancelled, s.in_flight, s.active) == (2, 0, 0)
        assert balanced(s)
