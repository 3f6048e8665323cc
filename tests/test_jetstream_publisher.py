"""js.publisher(max_pending=): asynchronous JetStream publish with bounded outstanding
acks, against a real nats-server with JetStream."""

from __future__ import annotations

import pytest
import trio
from test_cancellation import cancel_at_every_checkpoint

import trionats
from trionats import PubAckFuture


async def test_bounded_outstanding_acks_and_every_future_resolved(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        js = nc.jetstream()
        await js.add_stream("S", ["s.>"])
        futures: list[PubAckFuture] = []
        most = 0
        async with js.publisher(max_pending=16) as pub:
            for i in range(500):
                futures.append(await pub.publish("s.a", b"x", msg_id=f"m-{i}"))
                most = max(most, sum(not f.done for f in futures))
        assert most <= 16
        assert all(f.done for f in futures)
        acks = [await f.result() for f in futures]
        assert [a.seq for a in acks] == list(range(1, 501))
        assert (await js.stream_info("S")).messages == 500


async def test_refused_message_is_an_error_on_its_future(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        js = nc.jetstream()
        await js.add_stream("S", ["s.>"])
        async with js.publisher(max_pending=4) as pub:
            ok = await pub.publish("s.a", b"1")
            nowhere = await pub.publish("nostream", b"2")
        assert (await ok.result()).seq == 1
        with pytest.raises(trionats.JetStreamError):
            await nowhere.result()


async def test_publish_cancelled_at_every_checkpoint(nats_url: str) -> None:
    """A cancelled pub.publish sent nothing; one that returned has a future that resolves:
    the stream holds exactly the messages whose futures carry a PubAck."""
    async with trionats.open_connection(nats_url) as nc:
        js = nc.jetstream()
        await js.add_stream("S", ["s.>"])
        futures: list[PubAckFuture] = []
        async with js.publisher(max_pending=2) as pub:

            async def op() -> None:
                for _ in range(3):
                    futures.append(await pub.publish("s.a", b"x"))

            async def check() -> None:
                pass

            await cancel_at_every_checkpoint(op, check)
        seqs = sorted([(await f.result()).seq for f in futures])
        assert seqs == list(range(1, len(futures) + 1))
        assert (await js.stream_info("S")).messages == len(futures)


async def test_a_cancelled_block_still_resolves_every_future(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        js = nc.jetstream()
        await js.add_stream("S", ["s.>"])
        futures: list[PubAckFuture] = []
        with trio.CancelScope() as scope:
            async with js.publisher(max_pending=64) as pub:
                for _ in range(50):
                    futures.append(await pub.publish("s.a", b"x"))
                scope.cancel()
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert all(f.done for f in futures)
        stored = [(await f.result()).seq for f in futures]
        assert (await js.stream_info("S")).messages == len(stored) == 50


async def test_publisher_bad_input(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        js = nc.jetstream()
        with pytest.raises(ValueError, match="max_pending"):
            js.publisher(max_pending=0)
        with pytest.raises(TypeError, match="timeout"):
            js.publisher(timeout="1")
        async with js.publisher() as pub:
            with pytest.raises(ValueError, match="msg_id"):
                await pub.publish("s.a", b"", msg_id="")
            with pytest.raises(TypeError):
                await pub.publish("s.a", "text")  # type: ignore[arg-type]
        with pytest.raises(trionats.TrionatsError, match="ended"):
            await pub.publish("s.a", b"")


async def test_fast_path_publish_cancelled_at_every_checkpoint(nats_url: str) -> None:
    """With room under max_pending, publish yields only every few hundred calls: a cancel
    at any of those yields (or at the next call's check) sends nothing more; every future
    returned carries a PubAck and the stream holds exactly those messages."""
    async with trionats.open_connection(nats_url) as nc:
        js = nc.jetstream()
        await js.add_stream("S", ["s.>"])
        futures: list[PubAckFuture] = []
        async with js.publisher(max_pending=10_000) as pub:

            async def op() -> None:
                for _ in range(600):
                    futures.append(await pub.publish("s.a", b"x"))

            async def check() -> None:
                pass

            steps = await cancel_at_every_checkpoint(op, check)
        assert steps >= 2  # the loop did yield, and was cancelled there
        seqs = sorted([(await f.result()).seq for f in futures])
        assert seqs == list(range(1, len(futures) + 1))
        assert (await js.stream_info("S")).messages == len(futures)


async def test_publish_in_a_cancelled_scope_sends_nothing(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        js = nc.jetstream()
        await js.add_stream("S", ["s.>"])
        async with js.publisher() as pub:
            with trio.CancelScope() as scope:
                scope.cancel()
                await pub.publish("s.a", b"x")
            assert scope.cancelled_caught
            last = await pub.publish("s.a", b"y")
        assert (await last.result()).seq == 1
        assert (await js.stream_info("S")).messages == 1


async def test_unanswered_publishes_time_out_inside_the_block(nats_url: str) -> None:
    """Nobody answers (a plain subscriber, no stream): each future ends with a
    TimeoutError after ``timeout``, while the block is still open, and frees its place."""
    async with (
        trionats.open_connection(nats_url) as nc,
        nc.subscribe("mute.>") as sub,
        nc.jetstream().publisher(max_pending=2, timeout=0.2) as pub,
    ):
        futures = [await pub.publish("mute.a", b"x") for _ in range(5)]  # waits for room
        for f in futures:
            with pytest.raises(trionats.TimeoutError, match="may be stored"):
                await f.result()
        assert sub.pending == 5


async def test_connection_closed_resolves_outstanding_futures(nats_url: str) -> None:
    async with (
        trionats.open_connection(nats_url) as listener,
        listener.subscribe("mute.>"),
        trionats.open_connection(nats_url) as nc,
        nc.jetstream().publisher(max_pending=8, timeout=30) as pub,
    ):
        futures = [await pub.publish("mute.a", b"x") for _ in range(3)]
        with trio.fail_after(10):
            await nc.aclose()
            for f in futures:
                with pytest.raises(trionats.ConnectionClosedError):
                    await f.result()
