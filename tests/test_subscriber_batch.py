"""Batch handlers (``subscriber.start_batch``) against a real nats-server."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from polling import wait_until

import trionats
from trionats import Msg, SubscriberConfig, SubscriberStats, open_subscriber


def balanced(s: SubscriberStats) -> bool:
    return s.received == (
        s.processed + s.failed + s.timed_out + s.dropped + s.in_flight + s.pending
    )


async def publish_n(nc: trionats.Connection, subject: str, n: int) -> None:
    for i in range(n):
        await nc.publish(subject, str(i).encode())
    await nc.flush()


async def test_bad_arguments(nats_url: str) -> None:
    async def handler(msgs: list[Msg]) -> None: ...

    def sync(msgs: list[Msg]) -> None: ...

    async with trionats.open_connection(nats_url) as nc, open_subscriber(nc) as subscriber:
        with pytest.raises(ValueError, match="max_batch"):
            await subscriber.start_batch("b.x", handler, max_batch=0)
        with pytest.raises(TypeError, match="max_batch"):
            await subscriber.start_batch("b.x", handler, max_batch=2.0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_wait"):
            await subscriber.start_batch("b.x", handler, max_wait=-1)
        with pytest.raises(ValueError, match="max_workers"):
            await subscriber.start_batch("b.x", handler, max_workers=0)
        with pytest.raises(TypeError, match="async"):
            await subscriber.start_batch("b.x", sync)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="subject"):
            await subscriber.start_batch("", handler)
        assert subscriber.active() == []


async def test_full_batches_go_at_once(nats_url: str) -> None:
    sizes: list[int] = []
    batches: list[list[int]] = []

    async def handler(msgs: list[Msg]) -> None:
        sizes.append(len(msgs))
        batches.append([int(m.data) for m in msgs])

    async with (
        trionats.open_connection(nats_url) as pub,
        trionats.open_connection(nats_url) as subc,
        open_subscriber(subc) as subscriber,
    ):
        handle = await subscriber.start_batch("b.size", handler, max_batch=10, max_wait=600)
        await publish_n(pub, "b.size", 30)
        await wait_until(lambda: handle.stats().processed == 30)
        s = handle.stats()
        assert balanced(s)
        assert s.received == 30
        assert s.handler_duration.count == 3  # one value per run
        assert sizes == [10, 10, 10]
    # each batch holds consecutive messages, in order; batches may run concurrently
    assert sorted(batches) == [list(range(k, k + 10)) for k in (0, 10, 20)]


async def test_a_partial_batch_goes_after_max_wait(nats_url: str) -> None:
    sizes: list[int] = []

    async def handler(msgs: list[Msg]) -> None:
        sizes.append(len(msgs))

    async with (
        trionats.open_connection(nats_url) as pub,
        trionats.open_connection(nats_url) as subc,
        open_subscriber(subc) as subscriber,
    ):
        handle = await subscriber.start_batch("b.wait", handler, max_batch=100, max_wait=0.05)
        await publish_n(pub, "b.wait", 5)
        await wait_until(lambda: handle.stats().processed == 5)
        assert sum(sizes) == 5
        assert all(n <= 5 for n in sizes)


async def test_a_batch_of_n_takes_n_slots(nats_url: str) -> None:
    release = trio.Event()
    sizes: list[int] = []

    async def handler(msgs: list[Msg]) -> None:
        sizes.append(len(msgs))
        await release.wait()

    async with (
        trionats.open_connection(nats_url) as pub,
        trionats.open_connection(nats_url) as subc,
        open_subscriber(subc, SubscriberConfig(max_workers=4)) as subscriber,
    ):
        handle = await subscriber.start_batch("b.slots", handler, max_batch=10, max_wait=0)
        await publish_n(pub, "b.slots", 10)
        await wait_until(lambda: handle.stats().pending + handle.stats().in_flight == 10)
        await wait_until(lambda: handle.stats().in_flight == 4)
        await trio.testing.wait_all_tasks_blocked()
        s = subscriber.stats()
        assert (s.in_flight, s.pending) == (4, 6)
        assert balanced(s)
        assert all(n <= 4 for n in sizes)
        release.set()
        await wait_until(lambda: handle.stats().processed == 10)
        assert sum(sizes) == 10
        assert all(n <= 4 for n in sizes)


async def test_slots_are_shared_with_single_message_handlers(nats_url: str) -> None:
    release = trio.Event()
    singles = 0

    async def batch(msgs: list[Msg]) -> None:
        await release.wait()

    async def single(msg: Msg) -> None:
        nonlocal singles
        singles += 1

    async with (
        trionats.open_connection(nats_url) as pub,
        trionats.open_connection(nats_url) as subc,
        open_subscriber(subc, SubscriberConfig(max_workers=5)) as subscriber,
    ):
        bh = await subscriber.start_batch("b.share", batch, max_batch=5, max_wait=600)
        sh = await subscriber.start("b.single", single)
        await publish_n(pub, "b.share", 5)
        await wait_until(lambda: bh.stats().in_flight == 5)
        await publish_n(pub, "b.single", 3)
        await wait_until(lambda: sh.stats().pending == 3)  # delivered, and waiting
        await trio.testing.wait_all_tasks_blocked()
        assert singles == 0  # every slot is held by the batch
        assert sh.stats().pending == 3
        release.set()
        await wait_until(lambda: singles == 3)


async def test_failure_counts_each_message_and_answers_requests(nats_url: str) -> None:
    async def handler(msgs: list[Msg]) -> None:
        raise RuntimeError("bad batch")

    async with (
        trionats.open_connection(nats_url) as pub,
        trionats.open_connection(nats_url) as subc,
        open_subscriber(subc) as subscriber,
    ):
        handle = await subscriber.start_batch("b.fail", handler, max_batch=3, max_wait=0.01)
        reply = await pub.request("b.fail", b"q", timeout=5)
        assert reply.headers is not None
        assert reply.headers["Nats-Service-Error-Code"] == "500"
        assert "bad batch" in reply.headers["Nats-Service-Error"]
        await publish_n(pub, "b.fail", 4)
        await wait_until(lambda: handle.stats().failed == 5)
        assert balanced(handle.stats())


async def test_timeout_counts_each_message(nats_url: str) -> None:
    async def handler(msgs: list[Msg]) -> None:
        await trio.sleep_forever()

    config = SubscriberConfig(handler_timeout=0.05)
    async with (
        trionats.open_connection(nats_url) as pub,
        trionats.open_connection(nats_url) as subc,
        open_subscriber(subc, config) as subscriber,
    ):
        handle = await subscriber.start_batch("b.slow", handler, max_batch=2, max_wait=0.01)
        reply = await pub.request("b.slow", b"q", timeout=5)
        assert reply.headers is not None
        assert reply.headers["Nats-Service-Error-Code"] == "504"
        await publish_n(pub, "b.slow", 2)
        await wait_until(lambda: handle.stats().timed_out == 3)
        s = handle.stats()
        assert s.cancelled == 0
        assert balanced(s)


async def test_handler_replies_itself(nats_url: str) -> None:
    async def handler(msgs: list[Msg]) -> None:
        for m in msgs:
            await m.respond(b"ok " + m.data)

    async with (
        trionats.open_connection(nats_url) as pub,
        trionats.open_connection(nats_url) as subc,
        open_subscriber(subc) as subscriber,
    ):
        await subscriber.start_batch("b.rr", handler, max_wait=0.01)
        replies = []
        async with trio.open_nursery() as nursery:

            async def ask(i: int) -> None:
                replies.append((await pub.request("b.rr", b"%d" % i, timeout=5)).data)

            for i in range(20):
                nursery.start_soon(ask, i)
        assert sorted(replies) == sorted(b"ok %d" % i for i in range(20))


async def test_stop_cancels_running_batches_and_drops_the_rest(nats_url: str) -> None:
    started = trio.Event()

    async def handler(msgs: list[Msg]) -> None:
        started.set()
        await trio.sleep_forever()

    async with (
        trionats.open_connection(nats_url) as pub,
        trionats.open_connection(nats_url) as subc,
        open_subscriber(subc, SubscriberConfig(max_workers=3)) as subscriber,
    ):
        handle = await subscriber.start_batch("b.stop", handler, max_batch=3, max_wait=0)
        await publish_n(pub, "b.stop", 10)
        await started.wait()
        await wait_until(lambda: handle.stats().pending + handle.stats().in_flight == 10)
        await handle.stop(timeout=0)
        assert handle.stopped
        s = handle.stats()
        assert (s.received, s.cancelled, s.timed_out, s.dropped, s.in_flight, s.pending) == (
            10,
            3,
            3,
            7,
            0,
            0,
        )
        assert balanced(s)
        assert subscriber.active() == []
        assert "stopped" in repr(handle)


async def test_stop_lets_running_batches_finish(nats_url: str) -> None:
    started = trio.Event()
    release = trio.Event()

    async def handler(msgs: list[Msg]) -> None:
        started.set()
        await release.wait()

    async with (
        trionats.open_connection(nats_url) as pub,
        trionats.open_connection(nats_url) as subc,
        open_subscriber(subc) as subscriber,
    ):
        handle = await subscriber.start_batch("b.grace", handler, max_batch=5, max_wait=600)
        await publish_n(pub, "b.grace", 5)
        await started.wait()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle.stop, 10)
            await trio.testing.wait_all_tasks_blocked()
            assert not handle.stopped
            release.set()
        s = handle.stats()
        assert (s.processed, s.cancelled, s.dropped) == (5, 0, 0)


async def test_a_cancelled_stop_finishes_the_stop(nats_url: str) -> None:
    async def handler(msgs: list[Msg]) -> None:
        await trio.sleep_forever()

    async with (
        trionats.open_connection(nats_url) as pub,
        trionats.open_connection(nats_url) as subc,
        open_subscriber(subc) as subscriber,
    ):
        handle = await subscriber.start_batch("b.cstop", handler, max_batch=2, max_wait=0)
        await publish_n(pub, "b.cstop", 2)
        await wait_until(lambda: handle.stats().in_flight == 2)
        with trio.move_on_after(0.05) as scope:
            await handle.stop(timeout=60)
        assert scope.cancelled_caught
        assert handle.stopped
        assert handle.stats().cancelled == 2


async def test_a_cancelled_start_leaves_nothing(nats_server: trionats.NatsServer) -> None:
    async def handler(msgs: list[Msg]) -> None: ...

    async with trionats.open_connection(nats_server.url) as nc, open_subscriber(nc) as subscriber:
        await nats_server.freeze()  # the subscription is never confirmed
        try:
            with trio.move_on_after(0.2) as scope:
                await subscriber.start_batch("b.never", handler)
            assert scope.cancelled_caught
        finally:
            await nats_server.thaw()
        assert subscriber.active() == []
        assert subscriber.stats().active == 0


async def test_leaving_the_subscriber_stops_batches(nats_url: str) -> None:
    async def handler(msgs: list[Msg]) -> None:
        await trio.sleep(0.01)

    async with (
        trionats.open_connection(nats_url) as pub,
        trionats.open_connection(nats_url) as subc,
    ):
        async with open_subscriber(subc) as subscriber:
            handle = await subscriber.start_batch("b.leave", handler, max_batch=50, max_wait=0.01)
            assert isinstance(handle, trionats.BatchHandle)
            assert subscriber.active() == [handle]
            await publish_n(pub, "b.leave", 200)
            await wait_until(lambda: handle.stats().received == 200)
        assert handle.stopped
        s = subscriber.stats()
        assert balanced(s)
        assert s.in_flight == 0
        assert s.active == 0
