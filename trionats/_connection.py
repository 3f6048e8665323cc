"""The Trio face of one NATS connection: publish, request, subscribe, flush, drain, events.

Hot paths pay per batch, not per message (measurements in ``docs/bridge.md``):

* ``publish`` appends the PUB to nats-py's outgoing buffer synchronously, from the Trio
  task; only a forced flush of a full outgoing buffer goes through asyncio.
* delivery: each subscription *is* the nats-py subscription's pending queue; the read
  loop appends to it synchronously and wakes the Trio consumer only when it is parked.
* ``request`` is muxed on the Trio side: one wildcard inbox subscription routes replies
  straight to the parked requesting task.

Scheduling contract of the hot paths: every call checks for cancellation; a full yield to
the Trio scheduler happens every :data:`YIELD_EVERY` calls (and, for publish, whenever the
outgoing buffer holds more than :data:`YIELD_BYTES`), so a tight loop cannot starve other
tasks and still runs near raw nats-py speed.
"""

from __future__ import annotations

import itertools
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, final

import trio
from trio.lowlevel import Abort, checkpoint_if_cancelled, current_task, reschedule

from . import _errors
from ._events import ConnectionEvent, EventKind, EventStream
from ._request import _Pending, _ReplyRouter, _RequestTimer
from ._subscription import DEFAULT_PENDING_BYTES, DEFAULT_PENDING_MSGS, YIELD_EVERY, Subscription
from ._validate import (
    _PUBLISH_OK,
    check_data,
    check_headers,
    check_positive,
    check_publish_subject,
    check_queue,
    check_subscribe_subject,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ._bridge import NatsClient
    from ._msg import Msg

__all__ = ["YIELD_BYTES", "Connection", "ConnectionStats"]

log = logging.getLogger("trionats")

YIELD_BYTES = 256 * 1024
"""Outgoing bytes buffered before a publish yields so the flusher can write them."""

# The server answers a request nobody listens to with an empty message carrying this.
_STATUS_HEADER = "Status"
_NO_RESPONDERS = "503"


def _bridge() -> Any:
    """Import the bridge (and so trio_asyncio and nats) on first use."""
    from . import _bridge as bridge

    return bridge


@dataclass(frozen=True, slots=True)
class ConnectionStats:
    """A snapshot of a connection's counters.

    Attributes:
        in_msgs: messages received from the server.
        out_msgs: messages published.
        in_bytes: payload bytes received.
        out_bytes: payload bytes published.
        reconnects: successful reconnections.
        dropped: messages dropped because a subscription's pending limits were reached.
        events_dropped: events not delivered because an event stream's buffer was full.
    """

    in_msgs: int
    out_msgs: int
    in_bytes: int
    out_bytes: int
    reconnects: int
    dropped: int
    events_dropped: int


@final
class Connection:
    """One NATS connection, driven from Trio. Create it with :func:`open_connection`."""

    def __init__(self, client: NatsClient, *, name: str | None, close_timeout: float) -> None:
        self._client = client
        bridge = _bridge()
        self._append_publish = bridge.append_publish
        self._step = bridge.step  # bound once: _bridge() runs an import statement
        self.name = name
        self._close_timeout = close_timeout
        self._subs: set[Subscription] = set()
        self._event_streams: set[EventStream] = set()
        self._router: _ReplyRouter | None = None
        self._tokens = itertools.count()
        self._since_yield = 0
        self._dropped = 0
        self._events_dropped = 0
        self._closed = False
        self._draining = False
        self._pings: set[Any] = set()  # PONG futures being waited for (failed on close)

    # -- state -------------------------------------------------------------------------
    @property
    def is_connected(self) -> bool:
        """True while connected to a server (False while reconnecting or after close)."""
        return not self._closed and bool(self._client.is_connected)

    @property
    def is_closed(self) -> bool:
        return self._closed or bool(self._client.is_closed)

    @property
    def is_draining(self) -> bool:
        return self._draining

    @property
    def is_reconnecting(self) -> bool:
        return bool(self._client.is_reconnecting)

    @property
    def max_payload(self) -> int:
        """The largest payload the server accepts (from its INFO)."""
        return int(self._client._max_payload)

    @property
    def connected_url(self) -> str | None:
        url = self._client.connected_url
        return None if url is None else str(url.geturl())

    def stats(self) -> ConnectionStats:
        s = self._client.stats
        return ConnectionStats(
            in_msgs=s["in_msgs"],
            out_msgs=s["out_msgs"],
            in_bytes=s["in_bytes"],
            out_bytes=s["out_bytes"],
            reconnects=s["reconnects"],
            dropped=self._dropped,
            events_dropped=self._events_dropped,
        )

    def events(self, *, buffer: int = 256) -> EventStream:
        """Connection events (disconnected, reconnected, error, slow consumer, lame duck...).

        Registration happens here, so no event after this call is missed. Iteration ends
        when the connection closes.
        """
        if not isinstance(buffer, int) or isinstance(buffer, bool) or buffer < 1:
            raise ValueError(f"buffer must be an int >= 1, got {buffer!r}")
        stream = EventStream(self, buffer)
        if self._closed:
            stream.close()
        return stream

    def _emit(self, event: ConnectionEvent) -> None:
        if event.kind is EventKind.ERROR:
            log.warning("nats connection %s: %r", self.name or "", event.error)
        for stream in list(self._event_streams):
            stream._emit(event)

    def _check_open(self) -> None:
        if self._closed or self._client.is_closed:
            raise _errors.ConnectionClosedError("the connection is closed")
        if self._draining:
            raise _errors.ConnectionClosedError("the connection is draining")

    # -- publish -----------------------------------------------------------------------
    async def publish(
        self,
        subject: str,
        data: bytes = b"",
        *,
        reply: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Publish ``data`` on ``subject``.

        Appends to the outgoing buffer; the connection's flusher writes it out. Use
        :meth:`flush` to wait until the server has it. Checks for cancellation on every
        call; a cancelled publish sent nothing.

        Raises:
            ValueError: bad subject (empty, wildcard, whitespace), payload over max_payload.
            TypeError: data is not bytes-like, headers not ``dict[str, str]``.
            ConnectionClosedError: the connection is closed or draining.
        """
        await checkpoint_if_cancelled()
        if subject not in _PUBLISH_OK:
            check_publish_subject(subject)
        if type(data) is not bytes:
            check_data(data)
        if reply is not None:
            check_publish_subject(reply, "reply", cache=False)
        if headers is not None:
            check_headers(headers)
        await self._publish(subject, data, reply or "", headers)

    async def _publish(
        self, subject: str, data: Any, reply: str, headers: dict[str, str] | None
    ) -> None:
        client = self._client
        size = len(data)
        if size > client._max_payload:
            raise ValueError(
                f"payload of {size} bytes exceeds the server's max_payload of "
                f"{client._max_payload} bytes"
            )
        if self._closed or self._draining or client._status != 1:  # 1 == CONNECTED
            self._check_open()
            if not client.is_connected and (
                client._max_pending_size <= 0
                or size + client._pending_data_size > client._max_pending_size
            ):
                raise _errors.ReconnectBufferFullError(
                    "not connected and the reconnect buffer (pending_size) is full"
                )
        if headers is None:  # the hot path: a synchronous append, no coroutine
            coro = self._append_publish(client, subject, reply, data)
        else:
            coro = client._send_publish(subject, reply, data, size, headers)
        if coro is not None:  # the flusher's kick (once per batch), or a forced flush
            done, yielded = self._step(coro)
            if not done:  # a forced flush of a full buffer: wait for it (backpressure)
                await _bridge().finish_in_asyncio(coro, yielded)
                self._since_yield = 0
                return
        self._since_yield += 1
        if self._since_yield >= YIELD_EVERY or client._pending_data_size >= YIELD_BYTES:
            self._since_yield = 0
            await trio.lowlevel.checkpoint()

    # -- request -----------------------------------------------------------------------
    async def _ensure_router(self) -> _ReplyRouter:
        if self._router is None:
            prefix = self._client.new_inbox() + "."
            router = _ReplyRouter(prefix, _RequestTimer(_bridge().current_loop()))
            await self._nats_subscribe(prefix + "*", None, router)
            self._router = router
        return self._router

    async def request(
        self,
        subject: str,
        data: bytes = b"",
        *,
        timeout: float = 2.0,
        headers: dict[str, str] | None = None,
    ) -> Msg:
        """Publish a request and wait for the first reply.

        Any enclosing cancel scope also applies; a cancelled request leaves nothing behind
        (a late reply is discarded) and the connection stays usable.

        Raises:
            trionats.TimeoutError: no reply within ``timeout`` seconds.
            trionats.NoRespondersError: nobody is subscribed to ``subject``.
        """
        await checkpoint_if_cancelled()
        if subject not in _PUBLISH_OK:
            check_publish_subject(subject)
        if type(data) is not bytes:
            check_data(data)
        if type(timeout) is not float or not timeout > 0:
            check_positive("timeout", timeout)
        if headers is not None:
            check_headers(headers)
        self._check_open()
        router = self._router or await self._ensure_router()
        token = str(next(self._tokens))
        pending = _Pending()
        router.waiting[token] = pending
        try:
            await self._publish(subject, data, router.prefix + token, headers)
            if pending.msg is None:
                pending.task = current_task()
                router.timer.add(pending, timeout)

                def abort(_: Any) -> Abort:
                    pending.task = None
                    return Abort.SUCCEEDED

                await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            router.waiting.pop(token, None)
        msg = pending.msg
        if msg is None:
            if self._closed:
                raise _errors.ConnectionClosedError("the connection closed during the request")
            raise _errors.TimeoutError(f"no reply on {subject!r} within {timeout} s")
        headers_in = msg.headers
        if (
            headers_in is not None
            and headers_in.get(_STATUS_HEADER) == _NO_RESPONDERS
            and not msg.data
        ):
            raise _errors.NoRespondersError(f"no responders on {subject!r}")
        return msg

    # -- subscribe ---------------------------------------------------------------------
    async def _nats_subscribe(self, subject: str, queue: str | None, sink: Any) -> Any:
        """Subscribe in nats-py and make ``sink`` its pending queue; returns the nats sub."""
        coro = self._client.subscribe(subject, queue=queue or "")
        done, sub = self._step(coro)
        if not done:  # pragma: no cover - subscribe only suspends when the flusher queue is full
            coro.close()
            raise _errors.TrionatsError(f"nats-py subscribe suspended unexpectedly ({sub!r})")
        # Nothing can have arrived yet: the SUB is not written before we yield.
        sub._pending_queue = sink
        sub._pending_bytes_limit = 0  # we enforce the limits (and count the drops) ourselves
        return sub

    @asynccontextmanager
    async def subscribe(
        self,
        subject: str,
        *,
        queue: str | None = None,
        max_pending_msgs: int = DEFAULT_PENDING_MSGS,
        max_pending_bytes: int = DEFAULT_PENDING_BYTES,
    ) -> AsyncIterator[Subscription]:
        """Subscribe to ``subject`` (wildcards allowed) for the duration of the block.

        The subscription is registered on the server when the block is entered (a message
        published after that is received). Leaving the block unsubscribes.

        Example::

            async with nc.subscribe("orders.*", queue="workers") as sub:
                async for msg in sub:
                    ...

        Raises:
            ValueError / TypeError: bad subject, queue or limits.
        """
        check_subscribe_subject(subject)
        check_queue(queue)
        for name, value in (
            ("max_pending_msgs", max_pending_msgs),
            ("max_pending_bytes", max_pending_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        await checkpoint_if_cancelled()
        self._check_open()
        sub = Subscription(self, subject, queue, max_pending_msgs, max_pending_bytes)
        sub._nats_sub = await self._nats_subscribe(subject, queue, sub)
        self._subs.add(sub)
        try:
            await self.flush()
            yield sub
        finally:
            self._subs.discard(sub)
            self._unsubscribe_nowait(sub)

    def _unsubscribe_nowait(self, sub: Subscription, *, send_unsub: bool = True) -> None:
        """Stop routing messages to ``sub`` and end it (after what it has buffered)."""
        nats_sub = sub._nats_sub
        sub._end()
        if nats_sub is None:
            return
        sub._nats_sub = None
        self._client._remove_sub(nats_sub._id)
        if send_unsub:
            self._send_unsub(nats_sub)

    def _send_unsub(self, nats_sub: Any) -> None:
        """Queue an UNSUB; the server stops sending after it (in-flight messages still come)."""
        client = self._client
        if not client.is_connected:
            return  # nats-py does not replay removed subscriptions on reconnect
        coro = client._send_unsubscribe(nats_sub._id)
        try:
            done, _ = self._step(coro)
        except _errors.TrionatsError:  # pragma: no cover - the connection died meanwhile
            return
        if not done:  # pragma: no cover - the UNSUB is queued; only the kick is skipped
            coro.close()

    # -- flush / drain / close -----------------------------------------------------------
    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until the server has processed everything sent so far (a PING/PONG).

        Raises:
            trionats.TimeoutError: no PONG within ``timeout`` seconds.
        """
        check_positive("timeout", timeout)
        await checkpoint_if_cancelled()
        if self._closed or self._client.is_closed:
            raise _errors.ConnectionClosedError("the connection is closed")
        with trio.move_on_after(timeout) as scope:
            await self._ping()
        if scope.cancelled_caught:
            raise _errors.TimeoutError(f"flush did not complete within {timeout} s")

    async def _ping(self) -> None:
        """Send a PING and wait for its PONG, without an asyncio round trip.

        A cancelled wait leaves the PONG's future in nats-py's queue to be completed
        normally (cancelling it, as nats-py's own flush does via ``wait_for``, makes the
        late PONG raise InvalidStateError inside the read loop and kills it).
        """
        if not self._client.is_connected:
            raise _errors.ConnectionClosedError("not connected (the connection is reconnecting)")
        bridge = _bridge()
        future = bridge.send_ping(self._client)
        self._pings.add(future)
        try:
            await bridge.wait_future(future)
        finally:
            self._pings.discard(future)

    async def drain(self, timeout: float = 30.0) -> None:
        """Drain and close: stop subscriptions, deliver what was buffered, flush, close.

        Each subscription is unsubscribed on the server; after a round trip, every message
        the server sent for it is buffered, and subscribers have ``timeout`` seconds to take
        them (iteration then ends). Then pending publishes are flushed and the connection
        closes. A cancel cuts the waiting short but the connection is still closed (shielded,
        bounded by the close timeout) before ``Cancelled`` propagates.
        """
        check_positive("timeout", timeout)
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._draining = True
        try:
            with trio.move_on_after(timeout):
                subs = list(self._subs)
                # UNSUB first and keep routing: messages the server sent before it must
                # still reach the buffers. After the PONG nothing more can come.
                for sub in subs:
                    if sub._nats_sub is not None:
                        self._send_unsub(sub._nats_sub)
                if self._client.is_connected:
                    await self._ping()
                for sub in subs:
                    self._unsubscribe_nowait(sub, send_unsub=False)
                for sub in subs:
                    await sub._wait_emptied()
                if self._client.is_connected:
                    await self._ping()
        finally:
            await self.aclose()
        await checkpoint_if_cancelled()

    async def aclose(self) -> None:
        """Close the connection now (buffered publishes are still written). Idempotent.

        Shielded and bounded by the connection's ``close_timeout``, so it completes even in
        a cancelled scope and cannot hang.
        """
        if self._closed:
            return
        self._closed = True
        self._draining = False
        for sub in list(self._subs):
            sub._end()
        self._subs.clear()
        router = self._router
        if router is not None:
            router.timer.close()
            for pending in router.waiting.values():
                task = pending.task
                if task is not None:  # pragma: no cover - requests live inside the block
                    pending.task = None
                    reschedule(task)
        self._fail_pings("the connection closed")
        await _bridge().force_close(self._client, self._close_timeout)
        self._emit(ConnectionEvent(EventKind.CLOSED))
        for stream in list(self._event_streams):
            stream.close()

    # -- nats-py callbacks (run on the Trio thread, inside the asyncio loop) -------------
    async def _on_error(self, exc: Exception) -> None:
        self._emit(ConnectionEvent(EventKind.ERROR, error=_bridge().translate(exc)))

    def _fail_pings(self, why: str) -> None:
        """Flushes in flight fail now rather than at their timeout: no PONG will come."""
        for future in self._pings:
            if not future.done():
                future.set_exception(_errors.ConnectionClosedError(why))

    async def _on_disconnected(self) -> None:
        # nats-py forgets the PONGs it waits for when it reconnects.
        self._fail_pings("disconnected during the flush")
        if not self._closed:
            self._emit(ConnectionEvent(EventKind.DISCONNECTED))

    async def _on_reconnected(self) -> None:
        self._emit(ConnectionEvent(EventKind.RECONNECTED))

    async def _on_discovered(self) -> None:
        self._emit(ConnectionEvent(EventKind.SERVER_DISCOVERED))

    async def _on_lame_duck(self) -> None:
        self._emit(ConnectionEvent(EventKind.LAME_DUCK))

    async def _on_closed(self) -> None:
        # Closed by nats-py itself (e.g. reconnect attempts exhausted): end subscriptions.
        if not self._closed:
            error = _errors.ConnectionClosedError("the connection was closed by the client library")
            for sub in list(self._subs):
                sub._end(error)

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else "connected" if self.is_connected else "connecting"
        return f"<trionats.Connection {self.name or ''} {self.connected_url} {state}>"
