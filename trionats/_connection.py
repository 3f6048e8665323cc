"""The Trio face of one NATS connection: publish, request, subscribe, flush, drain, events.

Hot paths pay per batch, not per message (see ../shared/BRIDGE_FINDINGS.md):

* ``publish`` steps nats-py's publish coroutine from the Trio task (it is a buffer
  append); only a forced flush of a full outgoing buffer goes through asyncio.
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

import enum
import functools
import itertools
import logging
import math
import ssl
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, final

import trio
from trio.lowlevel import Abort, checkpoint_if_cancelled, current_task, reschedule

from . import _errors
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
    from collections.abc import AsyncIterator, Sequence
    from types import TracebackType

    from ._bridge import NatsClient

__all__ = [
    "YIELD_BYTES",
    "YIELD_EVERY",
    "Connection",
    "ConnectionEvent",
    "ConnectionStats",
    "EventKind",
    "EventStream",
    "Msg",
    "Subscription",
    "connect",
    "open_connection",
]

log = logging.getLogger("trionats")

YIELD_EVERY = 256
"""Hot-path calls between two full yields to the Trio scheduler."""
YIELD_BYTES = 256 * 1024
"""Outgoing bytes buffered before a publish yields so the flusher can write them."""

# The server answers a request nobody listens to with an empty message carrying this.
_STATUS_HEADER = "Status"
_NO_RESPONDERS = "503"

DEFAULT_PENDING_MSGS = 128 * 1024
DEFAULT_PENDING_BYTES = 256 * 1024 * 1024


def _bridge() -> Any:
    """Import the bridge (and so trio_asyncio and nats) on first use."""
    from . import _bridge as bridge

    return bridge


@final
class Msg:
    """A message received from NATS.

    Attributes:
        subject: the subject it was published to.
        data: the payload.
        reply: the reply subject ("" when there is none).
        headers: the headers, or None.
    """

    __slots__ = ("_conn", "data", "headers", "reply", "subject")

    def __init__(
        self,
        _conn: Connection,
        subject: str,
        reply: str,
        data: bytes,
        headers: dict[str, str] | None,
        _client: object = None,
        _sid: int = 0,
    ) -> None:
        self._conn = _conn
        self.subject = subject
        self.reply = reply
        self.data = data
        self.headers = headers

    async def respond(self, data: bytes = b"", *, headers: dict[str, str] | None = None) -> None:
        """Publish ``data`` to this message's reply subject.

        Raises:
            ValueError: the message has no reply subject.
        """
        if not self.reply:
            raise ValueError(f"message on {self.subject!r} has no reply subject to respond to")
        await checkpoint_if_cancelled()
        if type(data) is not bytes:
            check_data(data)
        if headers is not None:
            check_headers(headers)
        # The reply subject came from the server: no need to validate (or cache) it.
        await self._conn._publish(self.reply, data, "", headers)

    def __repr__(self) -> str:
        return (
            f"<Msg subject={self.subject!r} reply={self.reply!r} "
            f"data={self.data[:32]!r}{'...' if len(self.data) > 32 else ''}>"
        )


class EventKind(enum.Enum):
    """What happened to a connection."""

    DISCONNECTED = "disconnected"
    RECONNECTED = "reconnected"
    ERROR = "error"
    SLOW_CONSUMER = "slow_consumer"
    LAME_DUCK = "lame_duck"
    SERVER_DISCOVERED = "server_discovered"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    """One connection event.

    Attributes:
        kind: what happened.
        error: the error, for ERROR events.
        subject: the subscription's subject, for SLOW_CONSUMER events.
    """

    kind: EventKind
    error: BaseException | None = None
    subject: str | None = None


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
class EventStream:
    """Connection events as an async iterator; ends when the connection closes.

    Use as ``async with nc.events() as events: async for event in events: ...`` or iterate
    directly. The buffer holds ``buffer`` events; beyond that events are counted as dropped
    (``nc.stats().events_dropped``) rather than blocking the connection.
    """

    def __init__(self, conn: Connection, buffer: int) -> None:
        self._conn = conn
        self._send, self._receive = trio.open_memory_channel[ConnectionEvent](buffer)
        conn._event_streams.add(self)

    def _emit(self, event: ConnectionEvent) -> None:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self._conn._events_dropped += 1
        except trio.ClosedResourceError:  # pragma: no cover - removed before closing
            pass

    def close(self) -> None:
        """Stop receiving events; iteration ends after the buffered ones."""
        self._conn._event_streams.discard(self)
        self._send.close()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> ConnectionEvent:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        self._receive.close()


@final
class Subscription:
    """Messages of one subscription, as an async iterator.

    Created by ``async with nc.subscribe(...) as sub``. It is also the nats-py
    subscription's pending queue: the read loop appends messages here synchronously,
    bounded by ``max_pending_msgs`` / ``max_pending_bytes``; beyond them a message is
    dropped and counted (``dropped``), and one SLOW_CONSUMER event is emitted per
    transition into the dropping state.
    """

    def __init__(
        self, conn: Connection, subject: str, queue: str | None, max_msgs: int, max_bytes: int
    ) -> None:
        self._conn = conn
        self.subject = subject
        self.queue = queue
        self._max_msgs = max_msgs
        self._max_bytes = max_bytes
        self._buffer: deque[Msg] = deque()
        self._bytes = 0
        self._waiter: trio.lowlevel.Task | None = None
        self._dropping = False
        self._ended = False  # no more messages will be added; iteration ends when empty
        self._closed_error: BaseException | None = None
        self._since_yield = 0
        self._emptied: trio.Event | None = None
        self._nats_sub: Any = None
        self.delivered = 0
        self.dropped = 0

    # -- producer side: called synchronously by nats-py's read loop -------------------
    def put_nowait(self, msg: Msg) -> None:
        size = len(msg.data)
        if (
            self._ended
            or len(self._buffer) >= self._max_msgs
            or self._bytes + size > self._max_bytes
        ):
            self.dropped += 1
            self._conn._dropped += 1
            if not self._dropping and not self._ended:
                self._dropping = True
                self._conn._emit(ConnectionEvent(EventKind.SLOW_CONSUMER, subject=self.subject))
            return
        self._buffer.append(msg)
        self._bytes += size
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            reschedule(waiter)

    def qsize(self) -> int:
        return len(self._buffer)

    def empty(self) -> bool:
        return not self._buffer

    def _end(self, error: BaseException | None = None) -> None:
        """No more messages: iteration ends after the buffered ones (or raises ``error``)."""
        self._ended = True
        if error is not None and self._closed_error is None:
            self._closed_error = error
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            reschedule(waiter)
        if not self._buffer and self._emptied is not None:
            self._emptied.set()

    # -- consumer side -----------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Messages buffered, not yet taken."""
        return len(self._buffer)

    @property
    def pending_bytes(self) -> int:
        """Payload bytes buffered, not yet taken."""
        return self._bytes

    @property
    def ended(self) -> bool:
        """True once no more messages will be added (unsubscribed, drained or closed)."""
        return self._ended

    @property
    def has_waiter(self) -> bool:
        """True while a task is parked waiting for a message on this subscription."""
        return self._waiter is not None

    async def wait_nonempty(self) -> None:
        """Wait until a message is buffered or the subscription has ended; takes nothing.

        For consumers that decide per message whether they can take it (the subscriber
        takes one only when a worker slot is free). Only one task may wait at a time.
        """
        if self._buffer or self._ended:
            await trio.lowlevel.checkpoint()
            return
        await self._wait()

    def take_nowait(self) -> Msg:
        """Take the oldest buffered message.

        Raises:
            trio.WouldBlock: nothing is buffered.
        """
        if not self._buffer:
            raise trio.WouldBlock
        return self._take()

    def _take(self) -> Msg:
        msg = self._buffer.popleft()
        self._bytes -= len(msg.data)
        self.delivered += 1
        self._dropping = False
        if not self._buffer and self._ended and self._emptied is not None:
            self._emptied.set()
        return msg

    async def _wait(self) -> None:
        if self._waiter is not None:
            raise trio.BusyResourceError("another task is already receiving from this subscription")
        self._waiter = current_task()

        def abort(_: Any) -> Abort:
            self._waiter = None
            return Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def _yield_sometimes(self) -> None:
        self._since_yield += 1
        if self._since_yield >= YIELD_EVERY:
            self._since_yield = 0
            await trio.lowlevel.checkpoint()
        else:
            await checkpoint_if_cancelled()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Msg:
        if self._buffer:
            await self._yield_sometimes()
            if self._buffer:
                return self._take()
        while not self._buffer:
            if self._ended:
                await checkpoint_if_cancelled()
                if self._closed_error is not None:
                    raise self._closed_error
                raise StopAsyncIteration
            self._since_yield = 0
            await self._wait()
        return self._take()

    async def next_msg(self) -> Msg:
        """The next message; raises SubscriptionClosedError when the subscription ended."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            raise _errors.SubscriptionClosedError(
                f"subscription on {self.subject!r} has ended"
            ) from None

    async def receive_batch(self, max_msgs: int | None = None) -> list[Msg]:
        """Wait for at least one message, then take everything buffered (up to ``max_msgs``).

        One wake-up hands over a whole batch, the cheapest way to consume at high rates.
        Returns an empty list when the subscription has ended.
        """
        if not self._buffer:
            while not self._buffer and not self._ended:
                await self._wait()
            if not self._buffer:
                await checkpoint_if_cancelled()
                if self._closed_error is not None:
                    raise self._closed_error
                return []
        await self._yield_sometimes()
        n = len(self._buffer) if max_msgs is None else min(max_msgs, len(self._buffer))
        return [self._take() for _ in range(n)]

    async def _wait_emptied(self) -> None:
        if self._buffer:
            self._emptied = trio.Event()
            await self._emptied.wait()

    async def unsubscribe(self) -> None:
        """Remove interest now; buffered messages are still delivered, then iteration ends."""
        await checkpoint_if_cancelled()
        self._conn._unsubscribe_nowait(self)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def __repr__(self) -> str:
        return f"<Subscription {self.subject!r} queue={self.queue!r} pending={self.pending}>"


class _Pending:
    """A request waiting for its reply: the parked task (while parked) and the reply."""

    __slots__ = ("msg", "task")

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.msg: Msg | None = None


@final
class _RequestTimer:
    """Request timeouts without a cancel scope per request.

    Entering and leaving a Trio cancel scope costs more than the rest of a request's
    Trio-side work (profiled: ~25% of a request at 100 concurrent requesters). Requests
    with the same timeout have non-decreasing deadlines, so each distinct timeout value
    gets a FIFO queue (O(1) per request); one asyncio timer on the bridge loop (which
    runs on Trio's clock, so MockClock applies) fires at the earliest deadline, no more
    often than every :attr:`GRANULARITY` seconds, and wakes the expired requests.
    A request that completes leaves a stale entry that the next firing discards.
    """

    GRANULARITY = 0.005

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        self._queues: dict[float, deque[tuple[float, _Pending]]] = {}
        self._handle: Any = None
        self._armed_at = math.inf

    def add(self, pending: _Pending, timeout: float) -> None:
        deadline = self._loop.time() + timeout
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = deque()
        queue.append((deadline, pending))
        if deadline < self._armed_at:
            self._arm(deadline)

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_at(when, self._fire)
        self._armed_at = when

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = math.inf
        now = self._loop.time()
        next_at = math.inf
        for timeout, queue in list(self._queues.items()):
            while queue and queue[0][0] <= now:
                pending = queue.popleft()[1]
                task = pending.task
                if task is not None:
                    pending.task = None
                    reschedule(task)  # woken with msg None: timed out
            if queue:
                next_at = min(next_at, queue[0][0])
            else:
                del self._queues[timeout]
        if next_at < math.inf:
            self._arm(max(next_at, now + self.GRANULARITY))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._queues.clear()


@final
class _ReplyRouter:
    """The request mux: one wildcard inbox subscription, replies routed by token."""

    def __init__(self, prefix: str, timer: _RequestTimer) -> None:
        self.prefix = prefix
        self.timer = timer
        self.prefix_len = len(prefix)
        self.waiting: dict[str, _Pending] = {}

    def put_nowait(self, msg: Msg) -> None:
        pending = self.waiting.pop(msg.subject[self.prefix_len :], None)
        if pending is None:
            return  # late reply to a request that timed out or was cancelled
        pending.msg = msg
        task = pending.task
        if task is not None:
            pending.task = None
            reschedule(task)

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True


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


def _normalize_servers(servers: str | Sequence[str]) -> list[str]:
    if isinstance(servers, str):
        servers = [s.strip() for s in servers.split(",")]
    if not isinstance(servers, list | tuple):
        raise TypeError(f"servers must be a URL or a list of URLs, got {servers!r}")
    result: list[str] = []
    for url in servers:
        if not isinstance(url, str) or not url:
            raise ValueError(f"servers: each server must be a non-empty URL string, got {url!r}")
        if "://" not in url:
            url = "nats://" + url
        scheme, _, rest = url.partition("://")
        if scheme not in ("nats", "tls", "ws", "wss") or not rest or rest.startswith(":"):
            raise ValueError(f"servers: malformed NATS URL {url!r}")
        host_port = rest.rsplit("@", 1)[-1].split("/", 1)[0]
        if ":" in host_port:
            port = host_port.rsplit(":", 1)[1]
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"servers: bad port in {url!r}")
        result.append(url)
    if not result:
        raise ValueError("servers must not be empty")
    return result


def _is_fatal_connect_error(exc: BaseException) -> bool:
    """Errors that another attempt cannot fix: TLS verification, bad credentials."""
    return isinstance(exc, ssl.SSLError) or "authorization" in str(exc).lower()


async def connect(
    servers: str | Sequence[str] = "nats://127.0.0.1:4222",
    *,
    name: str | None = None,
    connect_timeout: float = 5.0,
    close_timeout: float = 5.0,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    nkeys_seed: str | None = None,
    nkeys_seed_str: str | None = None,
    user_credentials: str | None = None,
    tls: ssl.SSLContext | None = None,
    tls_hostname: str | None = None,
    allow_reconnect: bool = True,
    max_reconnect_attempts: int = -1,
    reconnect_time_wait: float = 2.0,
    ping_interval: float = 120.0,
    max_outstanding_pings: int = 2,
    no_echo: bool = False,
    pending_size: int = 2 * 1024 * 1024,
    inbox_prefix: str = "_INBOX",
) -> Connection:
    """Connect without a context manager; the caller must ``await conn.aclose()``.

    Needs a trio-asyncio loop in this task tree (the pool opens one). Most code wants
    :func:`open_connection`, which owns the loop and the close.
    """
    server_list = _normalize_servers(servers)
    check_positive("connect_timeout", connect_timeout)
    check_positive("close_timeout", close_timeout)
    check_positive("reconnect_time_wait", reconnect_time_wait)
    check_positive("ping_interval", ping_interval)
    if tls is not None and not isinstance(tls, ssl.SSLContext):
        raise TypeError(f"tls must be an ssl.SSLContext, got {type(tls).__name__}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    bridge = _bridge()
    client = bridge.new_client()
    conn = Connection(client, name=name, close_timeout=close_timeout)
    client.msg_class = functools.partial(Msg, conn)
    errors: list[BaseException] = []
    scope = trio.CancelScope(deadline=trio.current_time() + connect_timeout)
    fatal = False

    async def on_error(exc: Exception) -> None:
        nonlocal fatal
        if not client.is_connected and not conn._closed and client._status in (0, 4):
            errors.append(exc)  # still connecting: reported in the ConnectError
            if _is_fatal_connect_error(exc):
                fatal = True  # retrying cannot help: fail now, not at the deadline
                scope.cancel()
            return
        await conn._on_error(exc)

    options: dict[str, Any] = dict(
        servers=server_list,
        name=name,
        error_cb=on_error,
        disconnected_cb=conn._on_disconnected,
        reconnected_cb=conn._on_reconnected,
        discovered_server_cb=conn._on_discovered,
        closed_cb=conn._on_closed,
        lame_duck_mode_cb=conn._on_lame_duck,
        connect_timeout=connect_timeout,
        # First connect: try each server twice, quickly; connect_timeout bounds the whole.
        allow_reconnect=True,
        max_reconnect_attempts=1,
        reconnect_time_wait=min(reconnect_time_wait, 0.05),
        ping_interval=ping_interval,
        max_outstanding_pings=max_outstanding_pings,
        no_echo=no_echo,
        pending_size=pending_size,
        inbox_prefix=inbox_prefix,
        user=user,
        password=password,
        token=token,
        nkeys_seed=nkeys_seed,
        nkeys_seed_str=nkeys_seed_str,
        user_credentials=user_credentials,
        tls=tls,
        tls_hostname=tls_hostname,
        skip_subject_validation=True,  # validated here, with clearer errors
    )
    where = ", ".join(server_list)
    ok = False
    try:
        try:
            with scope:
                await bridge.run_aio(client.connect, **options)
        except _errors.ConnectError as exc:
            cause = errors[-1] if errors else exc.__cause__
            raise _errors.ConnectError(f"could not connect to {where}: {cause or exc}") from cause
        if scope.cancelled_caught:
            if fatal:
                raise _errors.ConnectError(f"could not connect to {where}: {errors[-1]}") from (
                    errors[-1]
                )
            raise _errors.ConnectError(
                f"could not connect to {where} within {connect_timeout} s"
                + (f" (last error: {errors[-1]})" if errors else "")
            )
        ok = True
    finally:
        if not ok:
            conn._closed = True
            await bridge.force_close(client, close_timeout)
    client.options["allow_reconnect"] = allow_reconnect
    client.options["max_reconnect_attempts"] = max_reconnect_attempts
    client.options["reconnect_time_wait"] = reconnect_time_wait
    return conn


@asynccontextmanager
async def open_connection(
    servers: str | Sequence[str] = "nats://127.0.0.1:4222",
    **options: Any,
) -> AsyncIterator[Connection]:
    """Connect to NATS for the duration of the block.

    Works from a plain ``trio.run(main)``: the asyncio loop nats-py needs is opened (and
    closed) here when none is running in this task tree.

    Leaving the block normally flushes what was published and closes; leaving it by an
    exception or a cancel closes at once. Either way the close is shielded and bounded by
    ``close_timeout``, and no asyncio or Trio task is left behind.

    Example::

        async with trionats.open_connection("nats://127.0.0.1:4222", name="svc") as nc:
            await nc.publish("greet.joe", b"hello")
            reply = await nc.request("svc.echo", b"hi", timeout=2)

    Args:
        servers: a URL (``nats://host:port``), a comma-separated list, or a list of URLs.
        name: the client name shown by the server.
        connect_timeout: seconds for the whole first connect (all servers); then
            :class:`trionats.ConnectError`.
        close_timeout: bound on the shutdown of the connection.
        **options: ``user``, ``password``, ``token``, ``nkeys_seed`` (a seed file),
            ``nkeys_seed_str`` (the seed itself), ``user_credentials`` (a creds file),
            ``tls`` (an ``ssl.SSLContext``), ``tls_hostname``,
            ``allow_reconnect``, ``max_reconnect_attempts`` (-1: forever),
            ``reconnect_time_wait``, ``ping_interval``, ``max_outstanding_pings``,
            ``no_echo``, ``pending_size`` (reconnect buffer bytes), ``inbox_prefix``.

    Raises:
        ConnectError: no server could be reached within ``connect_timeout``.
        TypeError: an unknown option.
    """
    async with _bridge().loop_scope():
        conn = await connect(servers, **options)
        try:
            yield conn
        except BaseException:
            await conn.aclose()
            raise
        else:
            if not conn._closed:
                with trio.move_on_after(conn._close_timeout, shield=True):
                    try:
                        if conn.is_connected:
                            await conn.flush(timeout=conn._close_timeout)
                    except _errors.TrionatsError:
                        pass
            await conn.aclose()
