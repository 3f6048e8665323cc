"""The latency fast paths: the inline I/O task, and the direct write before a task parks.

Each path keeps the guarantees of the one it shortcuts: the asyncio callback order, the
order of the bytes on the wire, backpressure, and cancellation at every checkpoint.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import trio
import trio.testing
from test_cancellation import cancel_at_every_checkpoint

import trionats
from trionats import _bridge


@pytest.fixture
def direct_writes(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every write_now outcome (True: written from the calling task)."""
    outcomes: list[bool] = []
    original = _bridge.write_now

    def counting(client: Any, ready: Any) -> bool:
        done = original(client, ready)
        outcomes.append(done)
        return done

    monkeypatch.setattr(_bridge, "write_now", counting)
    return outcomes


async def _echo(sub: trionats.Subscription) -> None:
    async for msg in sub:
        await msg.respond(msg.data)


# -- the direct write ----------------------------------------------------------------
async def test_request_direct_write_cancelled_at_every_checkpoint(
    nats_url: str, direct_writes: list[bool]
) -> None:
    async with (
        trionats.open_connection(nats_url) as nc,
        nc.subscribe("lat.echo") as sub,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(_echo, sub)
        await nc.request("lat.echo", b"warm", timeout=5)
        direct_writes.clear()

        async def check() -> None:
            assert nc._router is not None
            assert not nc._router.waiting
            assert (await nc.request("lat.echo", b"usable", timeout=5)).data == b"usable"

        points = await cancel_at_every_checkpoint(
            lambda: nc.request("lat.echo", b"x", timeout=5), check
        )
        assert points >= 2
        assert any(direct_writes)  # the fast path was taken
        nursery.cancel_scope.cancel()


async def test_flush_direct_write_cancelled_at_every_checkpoint(
    nats_url: str, direct_writes: list[bool]
) -> None:
    async with trionats.open_connection(nats_url) as nc, nc.subscribe("lat.f") as sub:
        sent = 0

        async def publish_and_flush() -> None:
            nonlocal sent
            await nc.publish("lat.f", b"%d" % sent)
            sent += 1
            await nc.flush(timeout=5)

        async def check() -> None:
            await nc.flush(timeout=5)
            # every publish that returned arrived, in order, whatever the flush did
            got = [int(m.data) for m in await sub.receive_batch()] if sub.pending else []
            assert got == sorted(got)

        direct_writes.clear()
        await cancel_at_every_checkpoint(publish_and_flush, check)
        assert any(direct_writes)


async def test_direct_write_keeps_the_order_on_the_wire(
    nats_url: str, direct_writes: list[bool]
) -> None:
    """Publishes buffered before a request go out ahead of it (the whole buffer goes)."""
    async with (
        trionats.open_connection(nats_url) as responder,
        trionats.open_connection(nats_url) as nc,
        responder.subscribe("lat.order.>") as sub,
        trio.open_nursery() as nursery,
    ):
        seen: list[bytes] = []

        async def serve() -> None:
            async for msg in sub:
                seen.append(msg.data)
                if msg.reply:
                    await msg.respond(b"ok")

        nursery.start_soon(serve)
        await nc.request("lat.order.req", b"warm", timeout=5)
        for round_ in range(20):
            seen.clear()
            for i in range(30):
                await nc.publish("lat.order.pub", b"%d" % i)
            await nc.request("lat.order.req", b"req", timeout=5)
            assert seen == [b"%d" % i for i in range(30)] + [b"req"], round_
        assert any(direct_writes)
        nursery.cancel_scope.cancel()


async def test_concurrent_requesters_write_once_per_pass(
    nats_url: str, direct_writes: list[bool]
) -> None:
    """100 requesters parking in one scheduling round: one direct write, the flusher does
    the rest (in one write), and every request is answered."""
    async with (
        trionats.open_connection(nats_url) as responder,
        trionats.open_connection(nats_url) as nc,
        responder.subscribe("lat.many") as sub,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(_echo, sub)
        await nc.request("lat.many", b"warm", timeout=5)
        direct_writes.clear()
        replies: list[bytes] = []

        async def one(i: int) -> None:
            replies.append((await nc.request("lat.many", b"%d" % i, timeout=10)).data)

        async with trio.open_nursery() as requesters:
            for i in range(100):
                requesters.start_soon(one, i)
        assert sorted(replies) == sorted(b"%d" % i for i in range(100))
        requester_writes = direct_writes[:100]
        assert requester_writes.count(True) < 10, direct_writes
        nursery.cancel_scope.cancel()


async def test_responder_parking_writes_its_reply(nats_url: str, direct_writes: list[bool]) -> None:
    async with (
        trionats.open_connection(nats_url) as responder,
        trionats.open_connection(nats_url) as nc,
        responder.subscribe("lat.park") as sub,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(_echo, sub)
        for i in range(50):
            assert (await nc.request("lat.park", b"%d" % i, timeout=5)).data == b"%d" % i
        # requester and responder both wrote directly (at most one per loop pass)
        assert direct_writes.count(True) >= 50
        nursery.cancel_scope.cancel()


class _Transport:
    def __init__(self, buffered: int = 0, closing: bool = False) -> None:
        self.buffered = buffered
        self.closing = closing

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered


class _Writer:
    def __init__(self, transport: _Transport) -> None:
        self.transport = transport
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


def _stub_client(transport: _Transport) -> tuple[Any, _Writer]:
    from nats.aio.transport import TcpTransport

    client = _bridge.new_client()
    client._status = client.CONNECTED
    client._transport = TcpTransport()  # type: ignore[no-untyped-call]
    writer = _Writer(transport)
    client._transport._io_writer = writer  # type: ignore[assignment]
    client._pending = [b"PUB a 1\r\nx\r\n", b"PING\r\n"]
    client._pending_data_size = sum(map(len, client._pending))
    return client, writer


def test_write_now_writes_the_whole_buffer_once_per_pass() -> None:
    client, writer = _stub_client(_Transport())
    ready = _bridge._Ready()
    assert _bridge.write_now(client, ready)
    assert writer.written == [b"PUB a 1\r\nx\r\nPING\r\n"]
    assert client._pending == []
    assert client._pending_data_size == 0
    client._pending = [b"PING\r\n"]
    client._pending_data_size = 6
    assert not _bridge.write_now(client, ready)  # same pass: left to the flusher
    ready.passes += 1
    assert _bridge.write_now(client, ready)
    assert writer.written[-1] == b"PING\r\n"


@pytest.mark.parametrize(
    "case", ["unsent bytes", "closing", "not connected", "nothing buffered", "own loop"]
)
def test_write_now_declines(case: str) -> None:
    """Backpressure (bytes still unsent), a closing or lost connection, an empty buffer,
    a loop we did not set up: nothing is written, the buffer is left for the flusher."""
    client, writer = _stub_client(
        _Transport(buffered=1 if case == "unsent bytes" else 0, closing=case == "closing")
    )
    ready: Any = _bridge._Ready()
    if case == "not connected":
        client._status = client.RECONNECTING
    if case == "nothing buffered":
        client._pending, client._pending_data_size = [], 0
    if case == "own loop":
        ready = None
    pending = list(client._pending)
    assert not _bridge.write_now(client, ready)
    assert writer.written == []
    assert client._pending == pending


# -- the loop and the inline I/O task ------------------------------------------------
async def test_inline_reads_keep_the_callback_order() -> None:
    """What a read queues runs in the I/O task, after everything queued before it, and
    more than a batch of it is finished by the main loop, in order."""
    async with _bridge.loop_scope():
        loop: Any = _bridge.current_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        order: list[int] = []
        done = trio.Event()
        total = 3 * _bridge._LOOP_BATCH

        def on_readable() -> None:
            b.recv(100)
            for i in range(100, 100 + total):
                loop.call_soon(order.append, i)
            loop.call_soon(done.set)

        try:
            loop.add_reader(b.fileno(), on_readable)
            await trio.testing.wait_all_tasks_blocked()
            for i in range(100):  # queued first: they run first
                loop.call_soon(order.append, i)
            a.send(b"x")
            with trio.fail_after(5):
                await done.wait()
            assert order == list(range(100 + total))
        finally:
            loop.remove_reader(b.fileno())
            a.close()
            b.close()


async def test_inline_read_that_stops_the_loop() -> None:
    """loop.stop() run inline (it raises TrioAsyncioExit) still stops the loop cleanly."""
    async with _bridge.loop_scope():
        loop: Any = _bridge.current_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)

        def on_readable() -> None:
            b.recv(100)
            loop.stop()

        try:
            loop.add_reader(b.fileno(), on_readable)
            await trio.testing.wait_all_tasks_blocked()
            a.send(b"x")
            with trio.fail_after(5):
                await loop.wait_stopped()
        finally:
            a.close()
            b.close()


async def test_timer_queued_by_a_read_fires() -> None:
    """A TimerHandle a read queues goes to the timers; the parked main loop wakes for it."""
    async with _bridge.loop_scope():
        loop: Any = _bridge.current_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        fired = trio.Event()

        def on_readable() -> None:
            b.recv(100)
            loop.call_later(0.01, fired.set)

        try:
            loop.add_reader(b.fileno(), on_readable)
            loop.call_later(3600, lambda: None)  # the main loop waits with a far timer
            await trio.testing.wait_all_tasks_blocked()
            a.send(b"x")
            with trio.fail_after(5):
                await fired.wait()
        finally:
            loop.remove_reader(b.fileno())
            a.close()
            b.close()


async def test_asyncio_task_and_threadsafe_callbacks_still_run() -> None:
    async with _bridge.loop_scope():
        loop: Any = _bridge.current_loop()
        got: list[str] = []
        done = trio.Event()

        def from_thread() -> None:
            loop.call_soon_threadsafe(got.append, "thread")
            loop.call_soon_threadsafe(done.set)

        await trio.to_thread.run_sync(from_thread)
        with trio.fail_after(5):
            await done.wait()
        assert await _bridge.run_aio(asyncio.sleep, 0, "slept") == "slept"
        assert got == ["thread"]


@pytest.mark.parametrize(
    ("target", "name", "expected"),
    [
        ("trio_asyncio._base.BaseTrioEventLoop", "_io_task", "BaseTrioEventLoop._io_task using"),
        (
            "trio_asyncio._async.TrioEventLoop",
            "_queue_handle",
            "TrioEventLoop._queue_handle using _q_send",
        ),
        ("nats.aio.transport.TcpTransport", "write", "TcpTransport.write using _io_writer"),
    ],
)
def test_check_internals_covers_the_fast_paths(
    monkeypatch: pytest.MonkeyPatch, target: str, name: str, expected: str
) -> None:
    """An upgrade that changes what the fast paths rely on fails loudly at connect."""
    import importlib

    module_name, cls_name = target.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)

    def changed(*args: object, **kwargs: object) -> None:
        pass  # pragma: no cover

    monkeypatch.setattr(cls, name, changed)
    monkeypatch.setattr(_bridge, "_internals_checked", False)
    monkeypatch.setattr(_bridge, "_internals_problem", None)
    with pytest.raises(trionats.TrionatsError, match=expected):
        _bridge.check_internals()
