"""Connection behaviour against a real nats-server on 127.0.0.1."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

import trionats
from trionats.testing import monitor_json, wait_for_connections


async def test_publish_subscribe_roundtrip(nats_url: str) -> None:
    async with trionats.open_connection(nats_url, name="t") as nc:
        assert nc.is_connected
        async with nc.subscribe("orders.*") as sub:
            await nc.publish("orders.new", b"one", headers={"k": "v"})
            await nc.publish("orders.old", bytearray(b"two"))
            await nc.publish("other", b"not for us")
            first = await sub.next_msg()
            second = await sub.next_msg()
        assert (first.subject, first.data, first.headers) == ("orders.new", b"one", {"k": "v"})
        assert (second.subject, second.data) == ("orders.old", b"two")
        assert first.reply == ""
        stats = nc.stats()
        assert stats.out_msgs == 3
        assert stats.in_msgs == 2


async def test_message_published_right_after_subscribe_is_received(nats_url: str) -> None:
    async with (
        trionats.open_connection(nats_url) as pub,
        trionats.open_connection(nats_url) as subc,
        subc.subscribe("fresh") as sub,
    ):
        await pub.publish("fresh", b"x")
        with trio.fail_after(5):
            msg = await sub.next_msg()
        assert msg.data == b"x"


async def test_request_reply_and_respond(nats_url: str) -> None:
    async with (
        trionats.open_connection(nats_url) as nc,
        nc.subscribe("svc.echo") as sub,
        trio.open_nursery() as nursery,
    ):

        async def responder() -> None:
            async for msg in sub:
                await msg.respond(b"re:" + msg.data, headers={"h": msg.headers["q"]})

        nursery.start_soon(responder)
        replies = []

        async def one(i: int) -> None:
            reply = await nc.request("svc.echo", str(i).encode(), headers={"q": str(i)})
            replies.append((reply.data, reply.headers))

        async with trio.open_nursery() as inner:
            for i in range(50):
                inner.start_soon(one, i)
        assert sorted(replies) == sorted((f"re:{i}".encode(), {"h": str(i)}) for i in range(50))
        nursery.cancel_scope.cancel()


async def test_request_no_responders(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        with pytest.raises(trionats.NoRespondersError, match=r"nobody\.home"):
            await nc.request("nobody.home", b"?")
        assert nc._router is not None
        assert not nc._router.waiting


async def test_request_timeout(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc, nc.subscribe("silent"):
        t0 = trio.current_time()
        with pytest.raises(trionats.TimeoutError, match="silent"):
            await nc.request("silent", b"?", timeout=0.2)
        elapsed = trio.current_time() - t0
        assert 0.2 <= elapsed < 2
        assert nc._router is not None
        assert not nc._router.waiting
        # the connection stays usable
        await nc.flush()


async def test_late_reply_after_timeout_is_discarded(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc, nc.subscribe("slow") as sub:
        with pytest.raises(trionats.TimeoutError):
            await nc.request("slow", b"1", timeout=0.05)
        msg = await sub.next_msg()
        await msg.respond(b"too late")
        await nc.flush()
        # the reply went nowhere; a new request gets its own reply
        async with trio.open_nursery() as nursery:

            async def answer() -> None:
                m = await sub.next_msg()
                await m.respond(b"on time")

            nursery.start_soon(answer)
            reply = await nc.request("slow", b"2", timeout=5)
        assert reply.data == b"on time"


@pytest.mark.parametrize(
    ("subject", "error", "match"),
    [
        ("", ValueError, "empty"),
        ("a..b", ValueError, "empty token"),
        (".a", ValueError, "empty token"),
        ("a.*", ValueError, "wildcard"),
        ("a.>", ValueError, "wildcard"),
        ("a b", ValueError, "whitespace"),
        (b"bytes", TypeError, "str"),
        (None, TypeError, "str"),
    ],
)
async def test_publish_rejects_bad_subjects(
    nats_url: str, subject: object, error: type[Exception], match: str
) -> None:
    async with trionats.open_connection(nats_url) as nc:
        with pytest.raises(error, match=match):
            await nc.publish(subject, b"x")  # type: ignore[arg-type]
        with pytest.raises(error, match=match):
            await nc.request(subject, b"x")  # type: ignore[arg-type]
        assert nc.stats().out_msgs == 0


async def test_publish_rejects_bad_data_headers_and_oversize(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        with pytest.raises(TypeError, match=r"data must be bytes.*encode"):
            await nc.publish("a", "text")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="headers"):
            await nc.publish("a", b"", headers={"k": 1})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="header name"):
            await nc.publish("a", b"", headers={"bad key": "v"})
        with pytest.raises(ValueError, match="max_payload"):
            await nc.publish("a", b"x" * (nc.max_payload + 1))
        with pytest.raises(ValueError, match="reply"):
            await nc.publish("a", b"", reply="in.*")
        with pytest.raises(ValueError, match="timeout"):
            await nc.request("a", b"", timeout=0)
        assert nc.stats().out_msgs == 0
        await nc.publish("a", b"x" * nc.max_payload)  # exactly the limit is fine


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"subject": "a..b"}, "empty token"),
        ({"subject": "a.>.b"}, "last token"),
        ({"subject": "a.b*"}, "whole tokens"),
        ({"subject": "a", "queue": ""}, "queue"),
        ({"subject": "a", "queue": "q w"}, "queue"),
        ({"subject": "a", "max_pending_msgs": 0}, "max_pending_msgs"),
        ({"subject": "a", "max_pending_bytes": -1}, "max_pending_bytes"),
    ],
)
async def test_subscribe_rejects_bad_arguments(
    nats_url: str, kwargs: dict[str, object], match: str
) -> None:
    async with trionats.open_connection(nats_url) as nc:
        with pytest.raises(ValueError, match=match):
            async with nc.subscribe(**kwargs):  # type: ignore[arg-type]
                pass  # pragma: no cover


@pytest.mark.parametrize(
    ("servers", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "servers must not be empty"),
        ("http://127.0.0.1:4222", {}, ValueError, "scheme"),
        ("nats://127.0.0.1:99999", {}, ValueError, "port"),
        (42, {}, TypeError, "servers"),
        ("nats://127.0.0.1:4222", {"connect_timeout": 0}, ValueError, "connect_timeout"),
        ("nats://127.0.0.1:4222", {"no_such_option": 1}, TypeError, "no_such_option"),
        ("nats://127.0.0.1:4222", {"tls": "yes"}, TypeError, "tls"),
    ],
)
async def test_open_connection_rejects_bad_input(
    servers: object, kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        async with trionats.open_connection(servers, **kwargs):  # type: ignore[arg-type]
            pass  # pragma: no cover


async def test_connect_to_a_closed_port_fails_fast() -> None:
    port = trionats._server.free_port()
    t0 = time.monotonic()
    with pytest.raises(trionats.ConnectError, match=f"127.0.0.1:{port}"):
        async with trionats.open_connection(f"nats://127.0.0.1:{port}", connect_timeout=5):
            pass  # pragma: no cover
    assert time.monotonic() - t0 < 3


async def test_connect_timeout_against_a_silent_listener_closes_the_socket() -> None:
    """A listener that accepts but never sends INFO: fail within connect_timeout and close
    the socket (nats-py alone leaks it; the peer would never see EOF)."""
    peer_closed = trio.Event()
    accepted = trio.Event()

    async def silent(stream: trio.SocketStream) -> None:
        accepted.set()
        while await stream.receive_some(1024):
            pass
        peer_closed.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, silent, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        t0 = trio.current_time()
        with pytest.raises(trionats.ConnectError, match=r"within 0\.5 s"):
            async with trionats.open_connection(f"nats://127.0.0.1:{port}", connect_timeout=0.5):
                pass  # pragma: no cover
        assert trio.current_time() - t0 < 2
        assert accepted.is_set()
        with trio.fail_after(5):
            await peer_closed.wait()
        nursery.cancel_scope.cancel()


async def test_closing_leaves_no_connection_on_the_server(
    nats_server: trionats.NatsServer,
) -> None:
    async with trionats.open_connection(nats_server.url):
        assert await wait_for_connections(nats_server, 1) == 1
    assert await wait_for_connections(nats_server, 0) == 0


async def test_client_name_is_sent(nats_server: trionats.NatsServer) -> None:
    async with trionats.open_connection(nats_server.url, name="svc-name"):
        connz = await monitor_json(nats_server, "/connz")
    assert [c.get("name") for c in connz["connections"]] == ["svc-name"]


async def events_within(
    events: trionats.EventStream, seconds: float
) -> list[tuple[trionats.EventKind, str | None]]:
    """(kind, subject) of every event the stream yields within ``seconds`` (a duration:
    what must not come is checked by waiting for it that long)."""
    kinds = []
    with trio.move_on_after(seconds):
        async for event in events:
            kinds.append((event.kind, event.subject))
    return kinds


async def test_pending_limit_drops_are_counted_with_one_event_per_transition(
    nats_url: str,
) -> None:
    async with (
        trionats.open_connection(nats_url) as nc,
        nc.events() as events,
        nc.subscribe("flood", max_pending_msgs=10) as sub,
    ):
        for i in range(25):
            await nc.publish("flood", str(i).encode())
        await nc.flush()
        assert sub.pending == 10
        assert sub.dropped == 15
        assert nc.stats().dropped == 15
        batch = await sub.receive_batch()
        assert [m.data for m in batch] == [str(i).encode() for i in range(10)]
        # leaving the dropping state and entering it again is a second event
        for i in range(12):
            await nc.publish("flood", str(i).encode())
        await nc.flush()
        assert sub.dropped == 17
        assert await events_within(events, 0.2) == [(trionats.EventKind.SLOW_CONSUMER, "flood")] * 2


async def test_a_consumer_hovering_at_its_limit_reports_one_episode(nats_url: str) -> None:
    # Taking one message and dropping the next again is the same episode: it ends only
    # once the consumer has taken every buffered message (no event per message).
    async def flood(n: int) -> None:
        for i in range(n):
            await nc.publish("hover", str(i).encode())
        await nc.flush()

    async with (
        trionats.open_connection(nats_url) as nc,
        nc.events() as events,
        nc.subscribe("hover", max_pending_msgs=3) as sub,
    ):
        await flood(5)
        for _ in range(4):
            sub.take_nowait()
            await flood(2)
        assert (sub.pending, sub.dropped) == (3, 2 + 4)
        while sub.pending:
            sub.take_nowait()
        await flood(4)  # caught up, then over the limit again: a second episode
        assert sub.dropped == 7
        assert await events_within(events, 0.2) == [(trionats.EventKind.SLOW_CONSUMER, "hover")] * 2


async def test_pending_bytes_limit(nats_url: str) -> None:
    async with (
        trionats.open_connection(nats_url) as nc,
        nc.subscribe("big", max_pending_bytes=1000) as sub,
    ):
        for _ in range(5):
            await nc.publish("big", b"x" * 300)
        await nc.flush()
        assert (sub.pending, sub.pending_bytes, sub.dropped) == (3, 900, 2)


async def test_queue_group_splits_messages(nats_url: str) -> None:
    async with (
        trionats.open_connection(nats_url) as nc,
        nc.subscribe("work", queue="q") as a,
        nc.subscribe("work", queue="q") as b,
    ):
        for i in range(200):
            await nc.publish("work", str(i).encode())
        await nc.flush()
        assert a.pending + b.pending == 200
        assert a.pending > 0
        assert b.pending > 0


async def test_drain_delivers_buffered_messages_then_ends_iteration(nats_url: str) -> None:
    got: list[bytes] = []
    async with (
        trionats.open_connection(nats_url) as pub,
        trionats.open_connection(nats_url) as nc,
        nc.subscribe("d") as sub,
    ):
        for i in range(100):
            await pub.publish("d", str(i).encode())
        await pub.flush()

        async def consume() -> None:
            async for msg in sub:
                got.append(msg.data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await nc.drain(timeout=10)
        assert nc.is_closed
    assert got == [str(i).encode() for i in range(100)]


async def test_use_after_close_raises_connection_closed(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        await nc.aclose()
        await nc.aclose()  # idempotent
        with pytest.raises(trionats.ConnectionClosedError):
            await nc.publish("a", b"x")
        with pytest.raises(trionats.ConnectionClosedError):
            await nc.request("a", b"x")
        with pytest.raises(trionats.ConnectionClosedError):
            await nc.flush()
        with pytest.raises(trionats.ConnectionClosedError):
            async with nc.subscribe("a"):
                pass  # pragma: no cover


async def test_events_and_resubscribe_across_server_restart(
    nats_server: trionats.NatsServer,
) -> None:
    async with (
        trionats.open_connection(nats_server.url, reconnect_time_wait=0.05) as nc,
        nc.events() as events,
        nc.subscribe("after.restart") as sub,
    ):
        await nats_server.stop()
        kinds: list[trionats.EventKind] = []
        with trio.fail_after(10):
            async for event in events:
                kinds.append(event.kind)
                if event.kind is trionats.EventKind.DISCONNECTED:
                    break
        assert not nc.is_connected
        await nats_server.start()
        with trio.fail_after(15):
            async for event in events:
                kinds.append(event.kind)
                if event.kind is trionats.EventKind.RECONNECTED:
                    break
        assert nc.is_connected
        assert nc.stats().reconnects == 1
        await nc.publish("after.restart", b"back")
        with trio.fail_after(5):
            msg = await sub.next_msg()
        assert msg.data == b"back"


async def test_event_stream_ends_when_connection_closes(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        events = nc.events()
    kinds = [event.kind async for event in events]
    assert kinds == [trionats.EventKind.CLOSED]


async def test_subscription_ends_when_block_exits(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        async with nc.subscribe("x") as sub:
            pass
        with pytest.raises(trionats.SubscriptionClosedError):
            await sub.next_msg()
        assert await sub.receive_batch() == []
        # the server no longer routes to it
        await nc.publish("x", b"1")
        await nc.flush()
        assert sub.pending == 0


async def test_two_receivers_on_one_subscription_is_an_error(nats_url: str) -> None:
    async with (
        trionats.open_connection(nats_url) as nc,
        nc.subscribe("x") as sub,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(sub.next_msg)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await sub.next_msg()
        nursery.cancel_scope.cancel()


async def test_open_connection_inside_existing_trio_asyncio_loop(nats_url: str) -> None:
    import trio_asyncio

    async with trio_asyncio.open_loop() as loop:
        async with trionats.open_connection(nats_url) as nc:
            await nc.flush()
        assert trio_asyncio.current_loop.get() is loop


@asynccontextmanager
async def _frozen(server: trionats.NatsServer) -> AsyncIterator[None]:
    """The server frozen (SIGSTOP: it answers nothing, no PONG) for the block, thawed after
    (the harness's ``freeze``/``thaw``; a server the block killed stays dead)."""
    await server.freeze()
    try:
        yield
    finally:
        with trio.CancelScope(shield=True):
            await server.thaw()


async def _flush_must_fail_fast(nc: trionats.Connection, outcome: list[str], match: str) -> None:
    with pytest.raises(trionats.ConnectionClosedError, match=match):
        await nc.flush(timeout=60)
    outcome.append("failed fast")


async def test_flush_in_flight_fails_when_the_connection_closes(
    nats_server: trionats.NatsServer,
) -> None:
    async with trionats.open_connection(nats_server.url) as nc, _frozen(nats_server):
        outcome: list[str] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_flush_must_fail_fast, nc, outcome, "closed")
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(10):
                await nc.aclose()
        assert outcome == ["failed fast"]


async def test_unsubscribe_delivers_what_was_buffered_then_ends(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc, nc.subscribe("u") as sub:
        for i in range(3):
            await nc.publish("u", b"%d" % i)
        await nc.flush()
        await sub.unsubscribe()
        await nc.publish("u", b"after")
        await nc.flush()
        assert [m.data async for m in sub] == [b"0", b"1", b"2"]
        with trio.CancelScope() as scope:  # a cancelled unsubscribe did nothing
            scope.cancel()
            await sub.unsubscribe()


async def test_wait_nonempty_and_take_nowait(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc, nc.subscribe("w") as sub:
        with pytest.raises(trio.WouldBlock):
            sub.take_nowait()
        assert not sub.has_waiter
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sub.wait_nonempty)
            await trio.testing.wait_all_tasks_blocked()
            assert sub.has_waiter
            await nc.publish("w", b"1")
        assert sub.pending == 1  # waiting took nothing
        assert sub.take_nowait().data == b"1"
        assert not sub.ended
        await sub.unsubscribe()
        assert sub.ended
        with trio.fail_after(1):
            await sub.wait_nonempty()  # returns at once: ended


async def test_flush_in_flight_fails_on_disconnect(nats_server: trionats.NatsServer) -> None:
    async with trionats.open_connection(nats_server.url, reconnect_time_wait=0.05) as nc:
        async with _frozen(nats_server):
            outcome: list[str] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_flush_must_fail_fast, nc, outcome, "connection was lost")
                await trio.testing.wait_all_tasks_blocked()
                await nats_server.kill()  # the socket closes: a disconnect
            assert outcome == ["failed fast"]
        await nats_server.start()
        with trio.fail_after(15):
            while not nc.is_connected:  # noqa: ASYNC110 - bounded polling for the reconnect
                await trio.sleep(0.01)
        await nc.flush(timeout=5)
