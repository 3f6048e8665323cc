"""JetStream: streams, consumers, publish, JsMsg acks, against a real nats-server with
JetStream (its store in the fixture's temp dir)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
import trio
from test_cancellation import cancel_at_every_checkpoint

import trionats
from trionats import AckPolicy, DeliverPolicy, JetStreamError, MsgAlreadyAckedError
from trionats._jetstream import JsMsg, MsgMetadata
from trionats._msg import Msg


async def _pending(js: trionats.JetStream, stream: str, consumer: str) -> tuple[int, int]:
    info = await js.consumer_info(stream, consumer)
    return info.num_pending, info.num_ack_pending


async def test_stream_lifecycle(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        js = nc.jetstream()
        info = await js.add_stream("ORDERS", ["orders.>"], storage="memory")
        assert info.name == "ORDERS"
        assert info.subjects == ("orders.>",)
        assert info.messages == 0
        assert info.config["storage"] == "memory"
        for i in range(3):
            ack = await js.publish(f"orders.{i % 2}", b"x")
            assert ack == trionats.PubAck(stream="ORDERS", seq=i + 1)
        info = await js.stream_info("ORDERS")
        assert (info.messages, info.first_seq, info.last_seq) == (3, 1, 3)
        info = await js.update_stream("ORDERS", ["orders.>", "more.>"], storage="memory")
        assert info.subjects == ("orders.>", "more.>")
        assert (await js.publish("more.x", b"y")).seq == 4
        assert await js.purge_stream("ORDERS", subject="orders.0") == 2
        assert await js.purge_stream("ORDERS", keep=1) == 1
        assert (await js.stream_info("ORDERS")).messages == 1
        assert await js.delete_stream("ORDERS") is True
        with pytest.raises(JetStreamError) as e:
            await js.stream_info("ORDERS")
        assert (e.value.code, e.value.err_code) == (404, 10059)
        assert "stream not found" in str(e.value)


async def test_add_stream_conflict_is_a_jetstream_error(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        js = nc.jetstream()
        await js.add_stream("A", ["a.>"])
        await js.add_stream("A", ["a.>"])  # idempotent
        with pytest.raises(JetStreamError) as e:
            await js.add_stream("B", ["a.>"])  # overlapping subjects
        assert e.value.code == 400
        assert e.value.err_code != 0


async def test_publish_dedup_and_expectations(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        js = nc.jetstream()
        await js.add_stream("S", ["s.>"], duplicate_window=60)
        first = await js.publish("s.a", b"1", msg_id="o-1", headers={"k": "v"})
        again = await js.publish("s.a", b"1", msg_id="o-1")
        assert (first.seq, first.duplicate) == (1, False)
        assert (again.seq, again.duplicate) == (1, True)
        assert (await js.publish("s.a", b"2", expected_last_seq=1, msg_id="o-2")).seq == 2
        with pytest.raises(JetStreamError) as e:
            await js.publish("s.a", b"3", expected_last_seq=1)
        assert e.value.err_code == 10071  # wrong last sequence
        assert (await js.publish("s.a", b"3", expected_last_msg_id="o-2")).seq == 3
        with pytest.raises(JetStreamError):
            await js.publish("s.a", b"4", expected_last_msg_id="o-1")
        assert (await js.publish("s.a", b"4", expected_stream="S")).seq == 4
        with pytest.raises(JetStreamError):
            await js.publish("s.a", b"5", expected_stream="OTHER")
        with pytest.raises(JetStreamError) as e:
            await js.publish("nostream.x", b"")
        assert e.value.code == 503
        assert (await js.stream_info("S")).messages == 4


async def test_jetstream_not_enabled() -> None:
    async with (
        trionats.open_nats_server(jetstream=False) as server,
        trionats.open_connection(server.url) as nc,
    ):
        with pytest.raises(JetStreamError) as e:
            await nc.jetstream().add_stream("S", ["s"])
        assert e.value.code == 503
        assert "not enabled" in str(e.value)


async def test_consumers_durable_ephemeral_filter_policies(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        js = nc.jetstream()
        await js.add_stream("S", ["s.>"])
        for i in range(6):
            await js.publish(f"s.{'a' if i % 2 else 'b'}", str(i).encode())
        durable = await js.add_consumer(
            "S", "d", ack_wait=7, max_deliver=5, backoff=[1, 2], filter_subject="s.a"
        )
        assert durable.durable
        assert durable.name == "d"
        assert durable.ack_wait == 1.0  # the server takes backoff[0] as ack_wait
        assert durable.max_deliver == 5
        assert durable.config["backoff"] == [10**9, 2 * 10**9]
        assert durable.num_pending == 3  # the filter: only s.a
        eph = await js.add_consumer("S", inactive_threshold=30)
        assert not eph.durable
        assert eph.name
        assert eph.num_pending == 6
        new = await js.add_consumer("S", "n", deliver_policy=DeliverPolicy.NEW)
        assert new.num_pending == 0
        last = await js.add_consumer("S", "l", deliver_policy=DeliverPolicy.LAST)
        assert last.num_pending == 1
        by_seq = await js.add_consumer(
            "S", "q", deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=4
        )
        assert by_seq.num_pending == 3
        future = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        by_time = await js.add_consumer(
            "S", "t", deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=future
        )
        assert by_time.num_pending == 0
        async with js.pull_subscribe("S", "q") as psub:
            msgs = await psub.fetch(3, timeout=2)
        assert [m.data for m in msgs] == [b"3", b"4", b"5"]
        assert await js.delete_consumer("S", "q") is True
        with pytest.raises(JetStreamError) as e:
            await js.consumer_info("S", "q")
        assert e.value.code == 404


@pytest.mark.parametrize(
    ("call", "exc", "text"),
    [
        (lambda js: js.add_stream("a.b", ["x"]), ValueError, "'a.b'"),
        (lambda js: js.add_stream(3, ["x"]), TypeError, "name"),
        (lambda js: js.add_stream("S", "x"), TypeError, "subjects"),
        (lambda js: js.add_stream("S", ["x"], storage="disk"), ValueError, "'disk'"),
        (lambda js: js.add_stream("S", ["x"], max_age=-1), ValueError, "max_age"),
        (lambda js: js.add_consumer("S", "d", ack_wait="1"), TypeError, "ack_wait"),
        (lambda js: js.add_consumer("S", "d", max_deliver=0), ValueError, "max_deliver"),
        (lambda js: js.add_consumer("S", "d", deliver_policy="all"), TypeError, "deliver"),
        (
            lambda js: js.add_consumer("S", "d", deliver_policy=DeliverPolicy.BY_START_SEQUENCE),
            TypeError,
            "opt_start_seq",
        ),
        (
            lambda js: js.add_consumer(
                "S",
                "d",
                deliver_policy=DeliverPolicy.BY_START_TIME,
                opt_start_time=datetime.datetime(2020, 1, 1),
            ),
            ValueError,
            "timezone",
        ),
        (lambda js: js.add_consumer("S", "d", backoff=1), TypeError, "backoff"),
        (lambda js: js.publish("s.a", b"", msg_id=""), ValueError, "msg_id"),
        (lambda js: js.publish("s.a", b"", msg_id=5), TypeError, "msg_id"),
        (lambda js: js.publish("s.a", b"", expected_last_seq=-1), ValueError, "expected_last"),
        (lambda js: js.publish("s.a", "text"), TypeError, "str"),
        (lambda js: js.publish("s.*", b""), ValueError, "s.*"),
        (lambda js: js.publish("s.a", b"", timeout=0), ValueError, "timeout"),
    ],
)
async def test_bad_input(nats_url: str, call: Any, exc: type[Exception], text: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        js = nc.jetstream()
        await js.add_stream("S", ["s.>"])
        with pytest.raises(exc, match=None) as e:
            await call(js)
        assert text in str(e.value)
        assert (await js.publish("s.a", b"ok")).seq == 1  # still usable


async def test_publish_cancelled_at_every_checkpoint(nats_url: str) -> None:
    """A cancelled publish sent nothing, or may have stored its message: retrying with the
    same msg_id never stores it twice, and nothing is lost."""
    async with trionats.open_connection(nats_url) as nc:
        js = nc.jetstream()
        await js.add_stream("S", ["s.>"])
        done: list[int] = []

        async def op() -> None:
            ack = await js.publish("s.a", b"x", msg_id=f"m-{len(done)}")
            done.append(ack.seq)

        async def check() -> None:
            ack = await js.publish("s.a", b"x", msg_id=f"m-{len(done)}")  # retry: dedup
            done.append(ack.seq)

        steps = await cancel_at_every_checkpoint(op, check)
        assert steps >= 1
        info = await js.stream_info("S")
        assert info.messages == len(set(done)) == info.last_seq


def test_metadata_parses_both_reply_forms() -> None:
    old = MsgMetadata._parse("$JS.ACK.ORDERS.w.2.10.11.1700000000000000000.5")
    assert (old.stream, old.consumer, old.num_delivered, old.stream_seq) == ("ORDERS", "w", 2, 10)
    assert (old.consumer_seq, old.num_pending, old.domain) == (11, 5, None)
    assert old.timestamp.year == 2023
    new = MsgMetadata._parse("$JS.ACK.hub.ACCHASH.ORDERS.w.1.3.4.1700000000000000000.0.rnd")
    assert (new.domain, new.stream, new.consumer, new.stream_seq) == ("hub", "ORDERS", "w", 3)
    assert MsgMetadata._parse("$JS.ACK._.H.S.c.1.2.3.4.5.r").domain is None
    with pytest.raises(JetStreamError):
        MsgMetadata._parse("$JS.ACK.S.c.1.2")


def test_jsmsg_metadata_is_parsed_on_first_use() -> None:
    conn: Any = None  # never used: nothing is sent
    ok = JsMsg(conn, Msg(conn, "s.a", "$JS.ACK.S.c.1.7.8.1700000000000000000.0", b"x", None))
    assert ok._metadata is None
    assert ok.metadata.stream_seq == 7
    assert ok.metadata is ok.metadata
    bad = JsMsg(conn, Msg(conn, "s.a", "$JS.ACK.S.c.1.2", b"x", None))
    with pytest.raises(JetStreamError, match="not a JetStream message reply subject"):
        _ = bad.metadata


async def _setup(nc: trionats.Connection, n: int, **consumer: Any) -> trionats.JetStream:
    js = nc.jetstream()
    await js.add_stream("S", ["s.>"])
    for i in range(n):
        await js.publish("s.a", str(i).encode())
    await js.add_consumer("S", "c", **consumer)
    return js


async def test_jsmsg_acks_and_metadata(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        js = await _setup(nc, 5, ack_wait=30)
        async with js.pull_subscribe("S", "c") as psub:
            msgs = await psub.fetch(5, timeout=2)
            assert [m.data for m in msgs] == [b"0", b"1", b"2", b"3", b"4"]
            m0 = msgs[0]
            assert m0.metadata.stream == "S"
            assert m0.metadata.consumer == "c"
            assert (m0.metadata.stream_seq, m0.metadata.consumer_seq) == (1, 1)
            assert m0.metadata.num_delivered == 1
            assert m0.metadata.num_pending == 4
            age = datetime.datetime.now(datetime.UTC) - m0.metadata.timestamp
            assert datetime.timedelta(0) <= age < datetime.timedelta(seconds=60)
            await m0.ack()
            await msgs[1].ack_sync()
            await msgs[2].in_progress()
            await msgs[2].in_progress()
            await msgs[2].term()
            await msgs[3].nak()
            await msgs[4].nak(delay=30)
            for m in msgs:
                assert m.is_acked
                with pytest.raises(MsgAlreadyAckedError):
                    await m.ack()
                with pytest.raises(MsgAlreadyAckedError):
                    await m.in_progress()
            # the plain nak is redelivered at once, the delayed one not yet
            again = await psub.fetch(1, timeout=2)
            assert again[0].data == b"3"
            assert again[0].metadata.num_delivered == 2
            await again[0].ack()
            await nc.flush()
            info = await js.consumer_info("S", "c")
            assert info.num_ack_pending == 1  # msg 4, naked with a delay
            assert info.ack_floor_stream_seq == 4  # seq 5 naked with a delay


async def test_jsmsg_nak_bad_delay(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        js = await _setup(nc, 1)
        async with js.pull_subscribe("S", "c") as psub:
            (m,) = await psub.fetch(1, timeout=2)
            with pytest.raises(ValueError, match="delay"):
                await m.nak(delay=-1)
            with pytest.raises(TypeError, match="delay"):
                await m.nak(delay="1")  # type: ignore[arg-type]
            assert not m.is_acked
            await m.ack()


async def test_ack_cancelled_at_every_checkpoint(nats_url: str) -> None:
    """A cancelled ack sent nothing (the message stays unacked and can be acked again);
    one that returned was sent: none acked that was not meant to be, none lost."""
    async with trionats.open_connection(nats_url) as nc:
        js = await _setup(nc, 1, ack_wait=30)
        async with js.pull_subscribe("S", "c") as psub:
            (m,) = await psub.fetch(1, timeout=2)

            async def op() -> None:
                if not m.is_acked:  # a run whose cancel fired after the ack returned
                    await m.ack()

            async def check() -> None:
                await nc.flush()
                pending = (await js.consumer_info("S", "c")).num_ack_pending
                assert pending == (0 if m.is_acked else 1)

            await cancel_at_every_checkpoint(op, check)
            assert m.is_acked
            assert await _pending(js, "S", "c") == (0, 0)


async def test_fetch_cancelled_at_every_checkpoint_loses_nothing(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        js = await _setup(nc, 20, ack_wait=30)
        seen: list[bytes] = []
        async with js.pull_subscribe("S", "c") as psub:

            async def op() -> None:
                if len(seen) == 20:
                    return
                msgs = await psub.fetch(2, timeout=2)
                with trio.CancelScope(shield=True):  # only the fetch is cancelled here
                    for m in msgs:
                        seen.append(m.data)
                        await m.ack()

            async def check() -> None:
                pass

            while len(seen) < 20:
                await cancel_at_every_checkpoint(op, check)
        assert sorted(seen, key=int) == [str(i).encode() for i in range(20)]
        await nc.flush()
        assert await _pending(js, "S", "c") == (0, 0)


async def test_leaving_pull_subscribe_naks_what_was_not_handed_out(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        js = await _setup(nc, 3, ack_wait=30)
        async with js.pull_subscribe("S", "c") as psub:
            with trio.CancelScope() as scope:
                got = 0
                orig = psub._sub.next_msg

                async def next_and_cancel() -> Any:
                    nonlocal got
                    msg = await orig()
                    got += 1
                    if got == 2:
                        scope.cancel()
                    return msg

                psub._sub.next_msg = next_and_cancel  # type: ignore[method-assign]
                await psub.fetch(3, timeout=2)
            assert scope.cancelled_caught
            psub._sub.next_msg = orig  # type: ignore[method-assign]
            # all three were delivered; each was naked on leaving: the server redelivers
            # them at once (ack_wait is 30 s)
        async with js.pull_subscribe("S", "c") as psub:
            with trio.fail_after(5):
                again = await psub.fetch(3, timeout=4)
            assert [m.metadata.num_delivered for m in again] == [2, 2, 2]
            for m in again:
                await m.ack()


def test_ack_policy_names() -> None:
    assert {p.name for p in AckPolicy} == {
        "ACK_FIRST",
        "ACK_AFTER",
        "NAK_ON_ERROR",
        "TERM_ON_ERROR",
        "MANUAL",
    }
