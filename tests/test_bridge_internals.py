"""The nats-py behaviour _bridge.py relies on beyond its public API.

If an upgrade of nats-py changes any of this, these tests fail loudly (rather than
trionats silently getting slower or losing messages). pyproject.toml bounds nats-py to
the versions these tests cover; ``.ci/run`` runs them with the lowest and the newest.
"""

from __future__ import annotations

import inspect

import nats.aio.client
import nats.aio.subscription
import nats.protocol.command
import trio

import trionats


def test_send_publish_signature_and_buffer_append() -> None:
    params = list(inspect.signature(nats.aio.client.Client._send_publish).parameters)
    assert params == ["self", "subject", "reply", "payload", "payload_size", "headers"]
    source = inspect.getsource(nats.aio.client.Client._send_command)
    assert "self._pending.append(cmd)" in source
    assert "force_flush=True" in source


def test_flusher_completes_each_kick_unless_done() -> None:
    """The bridge kicks the flusher with a shared object whose done() is True.

    nats-py's flusher takes one item from ``_flush_queue`` per write and completes it
    only ``if not future.done()`` (2.10+; 2.9 called set_result unconditionally).
    """
    source = inspect.getsource(nats.aio.client.Client._flusher)
    assert "await self._flush_queue.get()" in source
    assert "if not future.done():" in source
    assert "self._transport.writelines(self._pending[:])" in source


def test_protocol_command_builders() -> None:
    assert list(inspect.signature(nats.protocol.command.pub_cmd).parameters) == [
        "subject",
        "reply",
        "payload",
    ]
    assert list(inspect.signature(nats.protocol.command.hpub_cmd).parameters) == [
        "subject",
        "reply",
        "hdr",
        "payload",
    ]
    assert nats.protocol.command.pub_cmd("a", "r", b"xy") == b"PUB a r 2\r\nxy\r\n"


def test_msg_class_is_how_messages_are_built() -> None:
    source = inspect.getsource(nats.aio.client.Client._build_message)
    assert "self.msg_class(" in source
    for keyword in ("subject=", "reply=", "data=", "headers=", "_client=", "_sid="):
        assert keyword in source


def test_subscription_without_callback_uses_pending_queue_put_nowait() -> None:
    source = inspect.getsource(nats.aio.client.Client._process_msg)
    assert "sub._pending_queue.put_nowait(msg)" in source
    assert "sub._pending_bytes_limit > 0" in source
    start = inspect.getsource(nats.aio.subscription.Subscription._start)
    assert "create_task" in start
    assert "if self._cb" in start


def test_private_attributes_used_exist() -> None:
    client = nats.aio.client.Client()
    for name in ("_pending_data_size", "_max_payload", "_max_pending_size", "stats", "_status"):
        assert hasattr(client, name), name
    assert nats.aio.client.Client.CONNECTED == 1
    for name in (
        "_remove_sub",
        "_send_unsubscribe",
        "new_inbox",
        "_subs",
        "_pongs",
        "_pending",
        "_flush_pending",
        "_flush_queue",
    ):
        assert hasattr(client, name), name


async def test_publish_does_not_suspend_below_the_pending_size(nats_url: str) -> None:
    """The hot path: a publish completes in one coroutine step (a buffer append)."""
    async with trionats.open_connection(nats_url) as nc:
        client = nc._client
        suspended = 0
        for _ in range(1000):
            coro = client._send_publish("x", "", b"y" * 100, 100, None)
            try:
                coro.send(None)
            except StopIteration:
                continue
            suspended += 1  # pragma: no cover
            coro.close()  # pragma: no cover
        assert suspended == 0
        await nc.flush()


async def test_publish_beyond_pending_size_still_delivers(nats_url: str) -> None:
    """Past pending_size nats-py suspends for a forced flush; we finish it in asyncio."""
    async with (
        trionats.open_connection(nats_url, pending_size=64 * 1024) as nc,
        nc.subscribe("big", max_pending_msgs=10_000) as sub,
    ):
        for i in range(2000):
            await nc.publish("big", i.to_bytes(4, "big") + b"z" * 200)
        await nc.flush()
        got = [int.from_bytes(m.data[:4], "big") for m in await sub.receive_batch()]
        assert got == list(range(2000))


async def test_flush_returns_only_after_the_server_processed_earlier_publishes(
    nats_url: str,
) -> None:
    """Our PING goes behind the buffered publishes (nats-py's _send_ping writes it ahead)."""
    async with trionats.open_connection(nats_url) as nc, nc.subscribe("order") as sub:
        for round_ in range(50):
            for i in range(100):
                await nc.publish("order", b"%d" % i)
            await nc.flush()
            assert sub.pending == 100, round_
            await sub.receive_batch()


def test_trio_asyncio_main_loop_structure() -> None:
    """_bridge swaps in a batched _main_loop_one; it relies on these internals."""
    import trio_asyncio
    import trio_asyncio._base
    import trio_asyncio._handles

    main_loop = inspect.getsource(trio_asyncio._base.BaseTrioEventLoop._main_loop)
    assert "await self._main_loop_one()" in main_loop
    one = inspect.getsource(trio_asyncio._base.BaseTrioEventLoop._main_loop_one)
    for needle in ("self._timers", "self._q_recv", "AsyncHandle", "obj._started.wait()"):
        assert needle in one, needle
    assert hasattr(trio_asyncio._handles, "AsyncHandle")
    assert "current_loop" in dir(trio_asyncio)


async def test_batched_loop_runs_callbacks_in_order_and_timers() -> None:
    import asyncio

    from trionats import _bridge

    async with _bridge.loop_scope():
        loop = _bridge.current_loop()
        order: list[int] = []
        for i in range(500):  # more than one batch
            loop.call_soon(order.append, i)
        fired = trio.Event()
        loop.call_later(0.01, fired.set)
        await _bridge.run_aio(asyncio.sleep, 0)
        with trio.fail_after(5):
            await fired.wait()
        assert order == list(range(500))


def test_try_append_builds_the_pub_command_nats_py_builds() -> None:
    """try_append builds PUB inline (no pub_cmd call): the same bytes as nats-py's."""
    from trionats import _bridge

    client = nats.aio.client.Client()
    client._status = nats.aio.client.Client.CONNECTED
    client._max_payload = 1024
    cases = [("a", "", b""), ("a.b", "_INBOX.x", b"xy"), ("s", "", bytearray(b"\r\n"))]
    for subject, reply, payload in cases:
        client._pending = []
        assert _bridge.try_append(client, subject, reply, payload, None, False) == _bridge.APPENDED
        assert client._pending == [nats.protocol.command.pub_cmd(subject, reply, payload)]
