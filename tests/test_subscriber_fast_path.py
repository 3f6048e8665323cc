"""The subscriber's fast path (no ``handler_timeout``: the handler runs inline in the worker),
against a real nats-server on 127.0.0.1: cancelled at every checkpoint of its workers, the
outcomes it counts and the replies it sends, and the wake-ups it saves."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from polling import wait_until
from test_cancellation import CancelAtStep

import trionats
from trionats._subscriber import SubscriberConfig, SubscriberStats, open_subscriber


def balanced(s: SubscriberStats) -> bool:
    return s.received == (
        s.processed + s.failed + s.timed_out + s.dropped + s.in_flight + s.pending
    )


@pytest.mark.parametrize("max_workers", [1, 3])
async def test_fast_path_cancelled_at_every_worker_checkpoint(
    nats_url: str, max_workers: int
) -> None:
    """An outer cancel at every step of the workers: every message the subscription
    received is counted exactly once, every handler that started has one outcome, and
    nothing is left running."""
    logging.getLogger("trionats.subscriber").disabled = True  # the expected failures
    try:
        async with (
            trionats.open_connection(nats_url) as nc,
            trionats.open_connection(nats_url) as pub,
        ):
            n = 1
            while True:
                started = 0

                async def handler(msg: trionats.Msg) -> bytes | None:
                    nonlocal started
                    started += 1
                    await trio.lowlevel.checkpoint()
                    if msg.data == b"fail":
                        raise ValueError("expected")
                    if msg.data == b"block":
                        await trio.sleep(0.001)
                    return b"ok"  # a reply when the message is a request

                # A subject of its own: what a cancelled run published may still arrive.
                subject = f"fast.path.{n}"
                scope = trio.CancelScope()
                instrument = CancelAtStep(n, f"trionats.subscriber worker {subject!r}", scope)
                handle = None
                trio.lowlevel.add_instrument(instrument)
                try:
                    with scope:
                        config = SubscriberConfig(max_workers=max_workers, stop_timeout=5)
                        async with open_subscriber(nc, config) as subscriber:
                            handle = h = await subscriber.start(subject, handler)
                            for data in (b"a", b"fail", b"block", b"b", b"fail", b"c"):
                                await pub.publish(subject, data, reply="fast.path.nobody")
                            for data in (b"d", b"block", b"fail", b"e"):
                                await pub.publish(subject, data)
                            await pub.flush()
                            await wait_until(
                                lambda h=h: h.stats().processed + h.stats().failed == 10
                            )
                finally:
                    trio.lowlevel.remove_instrument(instrument)
                assert handle is not None
                s = handle.stats()
                assert balanced(s), s
                assert (s.in_flight, s.pending, s.active) == (0, 0, 0), s
                assert handle.stopped
                # each handler that started was counted once, whatever ended it
                assert s.processed + s.failed + s.timed_out == started, (s, started)
                assert s.received <= 10
                if not instrument.fired:
                    assert (s.received, s.processed, s.failed) == (10, 7, 3), s
                    break
                n += 1
                assert n < 500, "the workers never completed"
            assert n > 10  # the cancel did land at many different points
            # The connection is still usable.
            await nc.flush()
    finally:
        logging.getLogger("trionats.subscriber").disabled = False


async def test_fast_path_replies_and_counts_failures(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The outcomes of test_reply_failure_isolation_and_timeout, without handler_timeout."""

    async def handler(msg: trionats.Msg) -> bytes | None:
        if msg.data == b"boom":
            raise KeyError("no\r\nsuch order")
        if msg.data == b"none":
            return None
        return b"echo:" + msg.data

    with caplog.at_level(logging.WARNING, logger="trionats.subscriber"):
        async with (
            trionats.open_connection(nats_url) as nc,
            trionats.open_connection(nats_url) as client,
            open_subscriber(nc, SubscriberConfig(max_workers=4)) as subscriber,
        ):
            handle = await subscriber.start("svc.fast", handler)
            ok = await client.request("svc.fast", b"hi", timeout=5)
            assert (ok.data, ok.headers) == (b"echo:hi", None)
            failed = await client.request("svc.fast", b"boom", timeout=5)
            assert failed.data == b""
            assert failed.headers is not None
            assert failed.headers["Nats-Service-Error-Code"] == "500"
            assert "KeyError" in failed.headers["Nats-Service-Error"]
            assert "\n" not in failed.headers["Nats-Service-Error"]
            await client.publish("svc.fast", b"boom")  # no reply subject
            await client.publish("svc.fast", b"none")
            await client.flush()
            await wait_until(lambda: handle.stats().failed == 2)
            await wait_until(lambda: handle.stats().processed == 2)
            s = handle.stats()
            assert (s.processed, s.failed, s.timed_out, s.cancelled) == (2, 2, 0, 0)
            assert balanced(s)
            assert s.handler_duration.count == 4  # every outcome is timed
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 2
    assert all("svc.fast" in r.getMessage() and "KeyError" in r.getMessage() for r in failures)
    assert all(r.exc_info is not None for r in failures)


async def test_a_no_op_flood_is_handled_without_waking_every_worker(nats_url: str) -> None:
    """Handlers that never block finish before a helper could run: one worker takes the
    whole burst, and at most one helper is started to watch, not one per message."""
    n = 2000
    handled = 0

    async def handler(msg: trionats.Msg) -> None:
        nonlocal handled
        handled += 1

    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_connection(nats_url) as pub,
        open_subscriber(nc, SubscriberConfig(max_workers=64)) as subscriber,
    ):
        handle = await subscriber.start("flood.noop", handler)
        for _ in range(n):
            await pub.publish("flood.noop", b"x")
        await pub.flush()
        await wait_until(lambda: handle.stats().processed == n)
        assert handled == n
        assert handle._n_workers <= 2, handle._n_workers
        s = handle.stats()
        assert balanced(s)
        assert s.handler_duration.count == n


async def test_blocking_handlers_take_every_free_slot_of_a_burst(nats_url: str) -> None:
    """A helper that finds the buffer untouched (its waker blocked in its handler) wakes
    one worker per buffered message at once, up to the free slots."""
    running = 0
    all_busy = trio.Event()
    release = trio.Event()

    async def handler(msg: trionats.Msg) -> None:
        nonlocal running
        running += 1
        if running == 8:
            all_busy.set()
        await release.wait()

    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_connection(nats_url) as pub,
        open_subscriber(nc, SubscriberConfig(max_workers=8)) as subscriber,
    ):
        handle = await subscriber.start("burst.block", handler)
        for _ in range(20):
            await pub.publish("burst.block", b"x")
        await pub.flush()
        with trio.fail_after(10):
            await all_busy.wait()
        await wait_until(lambda: handle.stats().received == 20)
        await trio.testing.wait_all_tasks_blocked()
        s = handle.stats()
        assert s.in_flight == 8
        assert s.pending == 12  # nothing taken beyond the free slots
        assert handle._n_workers == 8
        release.set()
        await wait_until(lambda: handle.stats().processed == 20)
        assert balanced(handle.stats())
