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
