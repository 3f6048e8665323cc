"""The connection at its edges: cancel semantics, a server that closes on us, hostile
sizes, bounded memory and time, secrets. Every test runs against a real nats-server."""

from __future__ import annotations

import gc
import itertools
import logging
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from test_cancellation import cancel_at_every_checkpoint
from test_connection import _frozen

import trionats
from trionats._request import _Pending, _RequestTimer
from trionats._subscription import YIELD_EVERY
from trionats._validate import MAX_SUBJECT_BYTES


def _server_with(tmp_path: Path, config: str) -> Any:
    conf = tmp_path / "server.conf"
    conf.write_text(config)
    return trionats.open_nats_server(args=["-c", str(conf)])


# -- Cancellation means "did not happen" --------------------------------------------------
@pytest.mark.parametrize("since_yield", [0, YIELD_EVERY - 1], ids=["plain", "periodic-yield"])
async def test_publish_cancelled_at_every_checkpoint_sent_iff_it_returned(
    nats_url: str, since_yield: int
) -> None:
    """A publish that raised Cancelled sent nothing; one that returned sent its message.
    ``periodic-yield`` makes each call the 256th, the one that yields to the scheduler."""
    async with trionats.open_connection(nats_url) as nc, nc.subscribe("every.pub") as sub:
        returned: list[bytes] = []
        counter = iter(range(10_000))

        async def publish_once() -> None:
            payload = str(next(counter)).encode()
            nc._since_yield = since_yield
            await nc.publish("every.pub", payload)
            returned.append(payload)

        async def nothing() -> None:
            pass

        points = await cancel_at_every_checkpoint(publish_once, nothing)
        await nc.flush()
        received = [m.data for m in await sub.receive_batch()] if sub.pending else []
        assert received == returned
        assert points >= (2 if since_yield else 1)


async def test_respond_cancelled_at_every_checkpoint_sent_iff_it_returned(nats_url: str) -> None:
    async with (
        trionats.open_connection(nats_url) as nc,
        nc.subscribe("every.req") as requests,
        nc.subscribe("every.reply") as replies,
    ):
        returned: list[bytes] = []
        counter = iter(range(10_000))

        async def respond_once() -> None:
            payload = str(next(counter)).encode()
            await nc.publish("every.req", payload, reply="every.reply")
            msg = await requests.next_msg()
            nc._since_yield = YIELD_EVERY - 1  # the respond is the call that yields
            await msg.respond(payload)
            returned.append(payload)

        async def nothing() -> None:
            pass

        await cancel_at_every_checkpoint(respond_once, nothing)
        await nc.flush()
        received = [m.data for m in await replies.receive_batch()] if replies.pending else []
        assert received == returned


async def test_publish_waiting_for_a_frozen_server_is_cancellable_and_sent_nothing(
    nats_server: trionats.NatsServer,
) -> None:
    """Backpressure: with the outgoing buffer over pending_size a publish waits for the
    flusher; cancelled there, its message was not queued."""
    async with (
        trionats.open_connection(nats_server.url) as observer,
        observer.subscribe("bp") as sub,
        trionats.open_connection(nats_server.url, pending_size=64 * 1024) as nc,
    ):
        returned = 0
        payload = b"x" * 1024
        async with _frozen(nats_server):
            with trio.move_on_after(2) as scope:
                while True:  # the socket buffers fill, then the publish must wait
                    await nc.publish("bp", payload)
                    returned += 1
            assert scope.cancelled_caught
        await nc.flush(timeout=10)
        await observer.flush(timeout=10)
        # Bounded memory: what went out is pending_size plus the socket buffers (a few MB),
        # not everything the loop could produce in 2 s (146 MB on CPython 3.12.1, whose
        # writelines forgot to pause the protocol, before the bridge repaired it).
        assert returned * len(payload) < 32 * 1024 * 1024
        got = 0
        with trio.fail_after(10):
            while got < returned:
                got += len(await sub.receive_batch())
        await nc.flush(timeout=10)
        await observer.flush(timeout=10)
        assert sub.pending == 0  # not one message more than the publishes that returned
        assert got == returned


async def test_publish_waiting_for_the_flusher_wakes_when_the_server_dies(
    nats_server: trionats.NatsServer,
) -> None:
    """A publish held by backpressure on a frozen server must not hang when that server
    is killed: nats-py's flusher forgets its queue when the connection drops."""
    async with trionats.open_connection(
        nats_server.url, pending_size=64 * 1024, reconnect_time_wait=60
    ) as nc:
        outcome: list[str] = []

        async def publish_until_blocked() -> None:
            try:
                while True:
                    await nc.publish("bp.dead", b"x" * 1024)
            except trionats.ReconnectBufferFullError:
                outcome.append("reconnect buffer full")

        # Bounded: the publish gets held by backpressure, then must wake and fail.
        with trio.fail_after(20):
            async with _frozen(nats_server), trio.open_nursery() as nursery:
                nursery.start_soon(publish_until_blocked)
                while not nc._flush_waits:  # noqa: ASYNC110 - bounded polling
                    await trio.sleep(0.01)
                await nats_server.kill()
        assert outcome == ["reconnect buffer full"]


async def test_publish_during_a_reconnect_handshake_is_buffered(nats_url: str) -> None:
    """A reconnect passes through nats-py's CONNECTING state while it sends CONNECT; a
    publish then is buffered like any publish while reconnecting, not refused as if the
    connection were closed (it was, for an instant, in the reliability suite)."""
    async with trionats.open_connection(nats_url) as nc, nc.subscribe("hs") as sub:
        client = nc._client
        connected = client._status
        client._status = type(client).CONNECTING
        try:
            await nc.publish("hs", b"buffered")
        finally:
            client._status = connected
        await nc.flush()
        assert (await sub.next_msg()).data == b"buffered"


# -- No silent death ------------------------------------------------------------------------
async def test_headers_and_payload_together_are_checked_against_max_payload(
    tmp_path: Path,
) -> None:
    async with (
        _server_with(tmp_path, "max_payload: 1024\n") as server,
        trionats.open_connection(server.url) as nc,
        nc.subscribe("mp") as sub,
    ):
        assert nc.max_payload == 1024
        headers = {"Trace": "t" * 100}
        with pytest.raises(ValueError, match=r"headers \+ .*max_payload of 1024"):
            await nc.publish("mp", b"d" * 1000, headers=headers)
        hdr_len = len(nc._bridge.encode_headers(headers))
        await nc.publish("mp", b"d" * (1024 - hdr_len), headers=headers)  # exactly at it
        await nc.flush()
        msg = await sub.next_msg()
        assert len(msg.data) == 1024 - hdr_len
        assert msg.headers == headers


async def test_subjects_past_the_protocol_line_limit_are_refused(nats_url: str) -> None:
    """At the limit a subject is delivered; one byte past it is a ValueError before anything
    is sent (the server would answer -ERR and close the connection)."""
    at_limit = "a." + "b" * (MAX_SUBJECT_BYTES - 2)
    past = at_limit + "c"
    multibyte = "é" * (MAX_SUBJECT_BYTES // 2 + 1)  # 2 bytes each in UTF-8
    async with trionats.open_connection(nats_url) as nc, nc.subscribe(at_limit) as sub:
        await nc.publish(at_limit, b"fits")
        await nc.flush()
        assert (await sub.next_msg()).data == b"fits"
        for subject in (past, multibyte):
            with pytest.raises(ValueError, match="1024-byte limit"):
                await nc.publish(subject, b"")
            with pytest.raises(ValueError, match="1024-byte limit"):
                await nc.request(subject, b"", timeout=1)
            with pytest.raises(ValueError, match="1024-byte limit"):
                await nc.publish("ok", b"", reply=subject)
            with pytest.raises(ValueError, match="1024-byte limit"):
                async with nc.subscribe(subject):
                    pass  # pragma: no cover
        with pytest.raises(ValueError, match="1024-byte limit"):
            async with nc.subscribe("q", queue="q" * (MAX_SUBJECT_BYTES + 1)):
                pass  # pragma: no cover
        assert nc.is_connected  # nothing reached the server


@pytest.mark.parametrize(
    "prefix", ["", "bad prefix", "_INBOX.*", "_INBOX.>", "a..b", ".x", 5], ids=repr
)
async def test_inbox_prefix_is_validated_at_open(nats_url: str, prefix: object) -> None:
    error = TypeError if not isinstance(prefix, str) else ValueError
    with pytest.raises(error, match="inbox_prefix"):
        async with trionats.open_connection(nats_url, inbox_prefix=prefix):
            pass  # pragma: no cover


async def test_a_custom_inbox_prefix_works(nats_url: str) -> None:
    async with (
        trionats.open_connection(nats_url, inbox_prefix="_MY.inbox") as nc,
        nc.subscribe("echo.p") as sub,
        trio.open_nursery() as nursery,
    ):

        async def responder() -> None:
            msg = await sub.next_msg()
            assert msg.reply.startswith("_MY.inbox.")
            await msg.respond(b"ok")

        nursery.start_soon(responder)
        assert (await nc.request("echo.p", timeout=5)).data == b"ok"


_SMALL_CONTROL_LINE = "max_control_line: 256\n"


async def _kill_with_control_line(nc: trionats.Connection) -> None:
    """Publish a subject the client accepts but this server refuses: it sends -ERR and
    closes the connection."""
    await nc.publish("long." + "x" * 400, b"boom")


async def test_server_err_is_raised_by_the_next_operation_with_its_reason(
    tmp_path: Path,
) -> None:
    async with (
        _server_with(tmp_path, _SMALL_CONTROL_LINE) as server,
        trionats.open_connection(server.url) as nc,
    ):
        async with nc.events() as events:
            await _kill_with_control_line(nc)
            kinds = []
            with trio.fail_after(10):
                async for event in events:  # ends after CLOSED
                    kinds.append((event.kind, event.error))
        assert [k for k, _ in kinds][-2:] == [
            trionats.EventKind.ERROR,
            trionats.EventKind.CLOSED,
        ]
        error = kinds[-2][1]
        assert isinstance(error, trionats.ConnectionClosedError)
        assert "maximum control line" in str(error).lower()
        assert nc.is_closed
        assert isinstance(nc.last_error, trionats.TrionatsError)
        for operation in (
            lambda: nc.flush(timeout=5),
            lambda: nc.publish("x", b""),
            lambda: nc.request("x", b"", timeout=5),
        ):
            with pytest.raises(trionats.ConnectionClosedError, match="control line"):
                await operation()


async def test_server_err_wakes_waiting_requests_and_flushes(tmp_path: Path) -> None:
    async with (
        _server_with(tmp_path, _SMALL_CONTROL_LINE) as server,
        trionats.open_connection(server.url) as nc,
        nc.subscribe("slow") as sub,
    ):
        failures: list[str] = []

        async def wait_request() -> None:
            with pytest.raises(trionats.ConnectionClosedError, match="control line"):
                await nc.request("slow", b"", timeout=60)
            failures.append("request")

        async def wait_flush() -> None:
            # queued behind the PUB the server refuses: its PONG never comes
            with pytest.raises(trionats.ConnectionClosedError, match="control line"):
                await nc.flush(timeout=60)
            failures.append("flush")

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_request)
                await sub.next_msg()  # the request is out, its task waits
                await trio.testing.wait_all_tasks_blocked()
                async with _frozen(server):
                    await _kill_with_control_line(nc)
                    nursery.start_soon(wait_flush)
                    await trio.testing.wait_all_tasks_blocked()
                # thawed: the server reads the long PUB, sends -ERR and closes
        assert sorted(failures) == ["flush", "request"]


async def test_server_err_unnoticed_in_the_block_is_raised_when_it_exits(
    tmp_path: Path,
) -> None:
    async with _server_with(tmp_path, _SMALL_CONTROL_LINE) as server:

        async def block_that_never_looks() -> None:
            async with trionats.open_connection(server.url) as nc, nc.events() as events:
                await _kill_with_control_line(nc)
                with trio.fail_after(10):
                    async for _ in events:
                        pass  # until CLOSED

        with pytest.raises(trionats.ConnectionClosedError, match="control line"):
            await block_that_never_looks()


async def test_server_err_noticed_in_the_block_is_not_raised_again(tmp_path: Path) -> None:
    async with (
        _server_with(tmp_path, _SMALL_CONTROL_LINE) as server,
        trionats.open_connection(server.url) as nc,
        nc.events() as events,
    ):
        await _kill_with_control_line(nc)
        with trio.fail_after(10):
            async for _ in events:
                pass
        with pytest.raises(trionats.ConnectionClosedError):
            await nc.flush()


async def _blackhole_listener(
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accepts TCP connections and never says a word (no INFO)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    held: list[trio.SocketStream] = []
    async with listeners[0]:
        task_status.started(listeners[0].socket.getsockname()[1])
        try:
            while True:
                held.append(await listeners[0].accept())
        finally:
            for stream in held:
                stream.socket.close()


async def test_a_silent_server_does_not_eat_the_connect_budget(nats_url: str) -> None:
    """A listed server that accepts TCP and never sends INFO: the live one is still
    reached within connect_timeout, every time (the list order is random)."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_blackhole_listener)
        servers = [f"nats://127.0.0.1:{port}", nats_url]
        for _ in range(5):
            async with trionats.open_connection(servers, connect_timeout=2) as nc:
                assert nc.is_connected
                assert nc.connected_url == nats_url
        nursery.cancel_scope.cancel()


async def test_only_silent_servers_fail_within_connect_timeout() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_blackhole_listener)
        start = trio.current_time()
        with pytest.raises(trionats.ConnectError, match=f"127.0.0.1:{port}"):
            async with trionats.open_connection(f"nats://127.0.0.1:{port}", connect_timeout=1):
                pass  # pragma: no cover
        assert trio.current_time() - start < 1 + 1.0
        nursery.cancel_scope.cancel()


# -- Bounded memory and time ----------------------------------------------------------------
async def test_a_finished_request_releases_its_reply_at_once(nats_url: str) -> None:
    """With a long timeout, finished requests must not keep their replies until their
    deadline (they used to: 2,000 x 100 KB replies held 190 MB)."""
    big = b"r" * 100_000
    async with (
        trionats.open_connection(nats_url) as nc,
        nc.subscribe("big.reply") as sub,
        trio.open_nursery() as nursery,
    ):

        async def responder() -> None:
            async for msg in sub:
                await msg.respond(big)

        nursery.start_soon(responder)
        await nc.request("big.reply", timeout=60)  # warm up: the router exists
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(300):
                reply = await nc.request("big.reply", timeout=60)
                assert len(reply.data) == len(big)
            del reply
            gc.collect()
            retained = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert retained < 5_000_000, f"{retained:,} bytes retained by 300 finished requests"
        router = nc._router
        assert router is not None
        assert all(entry[2].msg is None for entry in router.timer._heap)
        nursery.cancel_scope.cancel()


class _FakeLoop:
    """The two methods the timer uses, on Trio's clock (the bridge loop's clock is too)."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, Any]] = []

    def time(self) -> float:
        return trio.current_time()

    def call_at(self, when: float, callback: Any) -> Any:
        entry = (when, callback)
        self.calls.append(entry)
        loop = self

        class Handle:
            def cancel(self) -> None:
                if entry in loop.calls:
                    loop.calls.remove(entry)

        return Handle()

    def run_due(self) -> None:
        now = trio.current_time()
        for entry in sorted(self.calls, key=lambda e: e[0]):
            if entry[0] <= now and entry in self.calls:
                self.calls.remove(entry)
                entry[1]()


async def test_request_timer_with_many_distinct_timeouts_wakes_in_deadline_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A pure test of the timer's logic (a fake loop standing in for asyncio's)."""
    loop = _FakeLoop()
    timer = _RequestTimer(loop)
    woken: list[float] = []

    async def waiter(timeout: float) -> None:
        pending = _Pending()
        pending.task = trio.lowlevel.current_task()
        timer.add(pending, timeout)

        def abort(_: Any) -> trio.lowlevel.Abort:  # pragma: no cover - never cancelled
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        woken.append(timeout)

    timeouts = [1 + (i * 7919 % 5000) / 1000 for i in range(5000)]  # 5,000 distinct values
    async with trio.open_nursery() as nursery:
        for t in timeouts:
            nursery.start_soon(waiter, t)
        await trio.testing.wait_all_tasks_blocked()
        assert len(loop.calls) == 1  # one armed timer, whatever the number of requests
        while len(woken) < len(timeouts):
            await trio.sleep(max(0.0, min(c[0] for c in loop.calls) - trio.current_time()))
            loop.run_due()
            await trio.testing.wait_all_tasks_blocked()
    # woken in deadline order, to the timer's granularity
    assert all(b >= a - _RequestTimer.GRANULARITY for a, b in itertools.pairwise(woken))


def test_request_timer_compacts_finished_entries() -> None:
    loop = _FakeLoop.__new__(_FakeLoop)
    loop.calls = []
    loop.time = lambda: 0.0  # type: ignore[method-assign]
    timer = _RequestTimer(loop)
    entries = []
    for _ in range(3000):
        pending = _Pending()
        timer.add(pending, 60.0)
        entries.append(pending)
    for pending in entries[:2900]:
        pending.active = False
        timer.finished()
    assert len(timer) <= 2 * 100 + _RequestTimer.COMPACT_MIN + 1
    assert {id(e[2]) for e in timer._heap} >= {id(p) for p in entries[2900:]}


async def test_subscribe_registration_is_bounded(nats_server: trionats.NatsServer) -> None:
    async with trionats.open_connection(nats_server.url) as nc, _frozen(nats_server):
        start = trio.current_time()
        with pytest.raises(trionats.TimeoutError, match="did not confirm"):
            async with nc.subscribe("frozen.sub", timeout=0.5):
                pass  # pragma: no cover
        assert trio.current_time() - start < 0.5 + 1.0
        assert not nc._subs  # nothing left registered
        # timeout=None: no deadline of its own, the enclosing scope bounds it
        with trio.move_on_after(0.3) as scope:
            async with nc.subscribe("frozen.sub2", timeout=None):
                pass  # pragma: no cover
        assert scope.cancelled_caught
        assert not nc._subs


# -- timeout=None means the same everywhere ---------------------------------------------------
async def test_timeout_none_means_only_the_enclosing_scopes(
    nats_server: trionats.NatsServer,
) -> None:
    async with trionats.open_connection(nats_server.url) as nc:
        async with nc.subscribe("slow.none") as sub:
            with trio.move_on_after(0.3) as scope:
                await nc.request("slow.none", timeout=None)
            assert scope.cancelled_caught
            assert sub.pending == 1
        async with _frozen(nats_server):
            with trio.move_on_after(0.3) as scope:
                await nc.flush(timeout=None)
            assert scope.cancelled_caught
        await nc.flush(timeout=None)
        with pytest.raises(TypeError, match="timeout"):
            await nc.flush(timeout="1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout"):
            await nc.flush(timeout=-1)


async def test_timeout_error_is_a_builtin_timeout_error(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc, nc.subscribe("t.o"):
        with pytest.raises(TimeoutError):
            await nc.request("t.o", timeout=0.05)


# -- drain --------------------------------------------------------------------------------------
async def test_drain_lets_a_running_handler_respond(nats_url: str) -> None:
    async with (
        trionats.open_connection(nats_url) as requester,
        trionats.open_connection(nats_url) as nc,
    ):
        async with nc.subscribe("drain.svc") as sub, trio.open_nursery() as nursery:
            got_request = trio.Event()
            go = trio.Event()
            replies: list[bytes] = []

            async def handler() -> None:
                async for msg in sub:
                    got_request.set()
                    await go.wait()  # still working when the drain starts
                    await msg.respond(b"answered during drain")

            async def request() -> None:
                replies.append((await requester.request("drain.svc", timeout=10)).data)

            nursery.start_soon(handler)
            nursery.start_soon(request)
            await got_request.wait()
            nursery.start_soon(nc.drain, 10)
            await trio.testing.wait_all_tasks_blocked()
            assert nc.is_draining
            assert not nc.is_closed
            go.set()
        assert replies == [b"answered during drain"]
        assert nc.is_closed


async def test_drain_timeout_none_is_bounded_by_the_enclosing_scope(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc, nc.subscribe("drain.none") as sub:
        await nc.publish("drain.none", b"never taken")
        await nc.flush()
        with trio.move_on_after(0.3) as scope:
            await nc.drain(timeout=None)  # the message is never taken: waits
        assert scope.cancelled_caught
        assert nc.is_closed
        assert sub.pending == 1


# -- Secrets ----------------------------------------------------------------------------------
async def test_credentials_in_urls_never_surface(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "pa55-s3cret-word"
    async with trionats.open_nats_server(args=["--user", "alice", "--pass", secret]) as server:
        url = f"nats://alice:{secret}@127.0.0.1:{server.port}"
        surfaces: list[str] = []
        async with trionats.open_connection(url, name="svc") as nc:
            surfaces += [repr(nc), str(nc.connected_url), str(nc.stats())]
            async with nc.events() as events:
                surfaces.append(repr(events))
        wrong = f"nats://alice:{secret}-wrong@127.0.0.1:{server.port}"
        with pytest.raises(trionats.ConnectError) as info:
            async with trionats.open_connection(wrong, connect_timeout=2):
                pass  # pragma: no cover
        surfaces += [str(info.value), repr(info.value)]
        cause: BaseException | None = info.value
        while cause is not None:
            surfaces.append(str(cause))
            cause = cause.__cause__ or cause.__context__
        with pytest.raises(ValueError, match="port") as bad:
            async with trionats.open_connection(f"nats://alice:{secret}@127.0.0.1:99999"):
                pass  # pragma: no cover
        surfaces.append(str(bad.value))
        token = "t0k3n-s3cret"
        with pytest.raises(trionats.ConnectError) as info2:
            async with trionats.open_connection(
                f"nats://{token}@127.0.0.1:{server.port}", connect_timeout=2
            ):
                pass  # pragma: no cover
        surfaces.append(str(info2.value))
    surfaces += [r.getMessage() for r in caplog.records]
    surfaces += [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert surfaces
    for text in surfaces:
        assert secret not in text, text
        assert token not in text, text
    assert any("***@127.0.0.1" in text for text in surfaces)


# -- Exception groups -------------------------------------------------------------------------
async def test_a_users_exception_group_comes_out_of_open_connection_intact(
    nats_url: str,
) -> None:
    leaf = ValueError("a")
    with pytest.raises(ExceptionGroup) as info:
        async with trionats.open_connection(nats_url):
            raise ExceptionGroup("mine", [leaf])
    assert info.value.message == "mine"
    assert info.value.exceptions == (leaf,)  # not wrapped in our nurseries' groups
    with pytest.raises(KeyError):  # a single error comes out bare
        async with trionats.open_connection(nats_url):
            raise KeyError("k")
