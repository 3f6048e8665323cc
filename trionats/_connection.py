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
outgoing buffer holds more than 256 KiB), so a tight loop cannot starve other
tasks and still runs near raw nats-py speed.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, final

import trio
from trio.lowlevel import Abort, checkpoint_if_cancelled, current_task

from . import _errors
from ._events import ConnectionEvent, EventKind, EventStream
from ._log import RateLimiter, conn_fields
from ._request import _Pending, _ReplyRouter, _RequestTimer
from ._subscription import DEFAULT_PENDING_BYTES, DEFAULT_PENDING_MSGS, YIELD_EVERY, Subscription
from ._validate import (
    _PUBLISH_OK,
    check_data,
    check_headers,
    check_int,
    check_publish_subject,
    check_queue,
    check_seconds,
    check_subscribe_subject,
    redact,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable
    from types import TracebackType

    from ._bridge import NatsClient
    from ._jetstream import JetStream
    from ._msg import Msg
    from ._otel import NatsTracer
    from ._validate import ServerURL

__all__ = ["Connection", "ConnectionStats"]

log = logging.getLogger("trionats.connection")


@final
class _Done:
    """An awaitable that is complete: awaiting it returns None at once, in C."""

    __slots__ = ()
    __await__ = ().__iter__


_DONE: Awaitable[None] = _Done()  # type: ignore[assignment]
"""What a method that never waits returns to be awaited (``_publish``, the pool's exit)."""

_limited = RateLimiter(log)  # repeated events: errors (reconnect attempts), slow consumers


# The server answers a request nobody listens to with an empty message carrying this.
# A server -ERR for a SUB the account may not make: the server never registered it.
_DENIED_SUBSCRIPTION = re.compile(
    r'permissions violation for subscription to "([^"]*)"(?: using queue "([^"]*)")?', re.I
)

_STATUS_HEADER = "Status"
_NO_RESPONDERS = "503"


def _bridge() -> Any:
    """Import the bridge (and so trio_asyncio and nats) on first use."""
    from . import _bridge as bridge

    return bridge


# Events logged (rate-limited): level and message; the arguments are the connection's
# name, then the error (ERROR) or the subject (SLOW_CONSUMER).
_LOGGED = {
    EventKind.ERROR: (logging.WARNING, "nats connection %r: %s"),
    EventKind.DISCONNECTED: (logging.WARNING, "nats connection %r lost; reconnecting"),
    EventKind.RECONNECTED: (logging.INFO, "nats connection %r reconnected"),
    EventKind.SLOW_CONSUMER: (
        logging.WARNING,
        "nats connection %r: slow consumer on %r, dropping messages (pending limits reached)",
    ),
    EventKind.LAME_DUCK: (logging.INFO, "nats connection %r: the server entered lame duck mode"),
    EventKind.CLOSED: (logging.DEBUG, "nats connection %r closed"),
}


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


_T = TypeVar("_T")


@final
class _AsyncWithOnly(AbstractAsyncContextManager[_T]):
    """An ``async with`` block whose ``await`` is a ``TypeError`` saying what to write.

    People arrive with nats-py's habits (``await nc.subscribe(...)``); Python's own error
    for awaiting a context manager does not say what to do instead.
    """

    __slots__ = ("_cm", "_hint")

    def __init__(self, cm: AbstractAsyncContextManager[_T], hint: str) -> None:
        self._cm = cm
        self._hint = hint

    async def __aenter__(self) -> _T:
        return await self._cm.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._cm.__aexit__(exc_type, exc, tb)

    def __await__(self) -> NoReturn:
        raise TypeError(self._hint)


@final
class Connection:
    """One NATS connection, driven from Trio. Create it with :func:`open_connection`."""

    def __init__(
        self,
        client: NatsClient,
        *,
        name: str | None,
        close_timeout: float,
        servers: tuple[ServerURL, ...] = (),
    ) -> None:
        self._client = client
        bridge = _bridge()
        self._bridge = bridge  # bound once: _bridge() runs an import statement
        self._try_append = bridge.try_append
        self._ready = bridge.ready_queue()  # for write_now: None on a user's own loop
        self.name = name
        self._servers = servers
        self._close_timeout = close_timeout
        self._subs: set[Subscription] = set()
        self._event_streams: set[EventStream] = set()
        self._router: _ReplyRouter | None = None
        self._tokens = itertools.count()
        self._since_yield = 0
        self._dropped = 0
        self._events_dropped = 0
        # _closed: no new operation may start (set by aclose, by the final step of a
        # drain, and when the connection died). _released: the nats-py client is closed.
        self._closed = False
        self._released = False
        self._draining = False
        self._death: _errors.ConnectionClosedError | None = None  # why it died, if it did
        self._death_seen = False  # an operation has raised _death to the caller
        self._last_error: _errors.TrionatsError | None = None
        self._pings: set[Any] = set()  # PONG futures being waited for (failed on close)
        self._flush_waits: set[Any] = set()  # flusher futures publishes wait for (backpressure)
        self._tracer: NatsTracer | None = None  # set by connect(); None: tracing off
        self._last_url: str | None = None  # the server last connected to (redacted)

    # -- state -------------------------------------------------------------------------
    @property
    def is_connected(self) -> bool:
        """True while connected to a server (False while reconnecting or after close)."""
        return not self._closed and bool(self._client.is_connected)

    @property
    def is_closed(self) -> bool:
        """True once the connection is closed (by :meth:`aclose`, a drain, or the server)."""
        return self._closed or bool(self._client.is_closed)

    @property
    def is_draining(self) -> bool:
        """True while :meth:`drain` runs."""
        return self._draining

    @property
    def is_reconnecting(self) -> bool:
        """True while the connection is lost and being re-established."""
        return bool(self._client.is_reconnecting)

    @property
    def tracing(self) -> bool:
        """True when this connection records OpenTelemetry spans (decided when it opened).

        See ``open_connection(..., tracing=...)``.
        """
        return self._tracer is not None

    @property
    def max_payload(self) -> int:
        """The largest message, headers included, the server accepts (from its INFO)."""
        return int(self._bridge.max_payload(self._client))

    @property
    def connected_url(self) -> str | None:
        """The server this connection is on, credentials redacted; None when not connected."""
        url = self._client.connected_url
        return None if url is None else redact(str(url.geturl()))

    @property
    def last_error(self) -> _errors.TrionatsError | None:
        """The last error the server or the client library reported, or None.

        A server ``-ERR`` that closed the connection, a permissions violation, a failed
        reconnect attempt... Credentials never appear in it.
        """
        return self._last_error

    def stats(self) -> ConnectionStats:
        """A snapshot of the connection's counters."""
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
        when the connection closes (after the CLOSED event).
        """
        check_int("buffer", buffer, minimum=1)
        stream = EventStream(self, buffer)
        if self._closed:
            stream.close()
        return stream

    def _emit(self, event: ConnectionEvent) -> None:
        if event.kind in _LOGGED:
            self._log_event(event)
        for stream in list(self._event_streams):
            stream._emit(event)

    def _log_event(self, event: ConnectionEvent) -> None:
        """Log an event: rate-limited per connection and kind (errors per error type)."""
        kind = event.kind
        level, text = _LOGGED[kind]
        key: tuple[object, ...] = (id(self), kind)
        args: tuple[object, ...] = (self.name or "",)
        extra = conn_fields(self, "connection")
        if self._last_url is not None:
            extra.setdefault("server", self._last_url)
        if kind is EventKind.CLOSED:  # report what was suppressed, forget this connection
            _limited.flush(lambda k: isinstance(k, tuple) and k[0] == key[0])
            log.log(level, text, *args, extra=extra)
            return
        if kind is EventKind.ERROR:
            key += (type(event.error),)
            args += (event.error,)
        elif kind is EventKind.SLOW_CONSUMER:
            key += (event.subject,)
            args += (event.subject,)
            extra["subject"] = event.subject
        _limited.log(level, key, text, *args, extra=extra)

    def _check_open(self) -> None:
        if self._closed or self._client.is_closed:
            raise self._closed_error()

    def _closed_error(self) -> _errors.ConnectionClosedError:
        """The error an operation on a closed connection raises (the server's reason, if any)."""
        death = self._death
        if death is None:
            return _errors.ConnectionClosedError("the connection is closed")
        self._death_seen = True
        error = _errors.ConnectionClosedError(str(death))
        error.__cause__ = death.__cause__
        return error

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
        :meth:`flush` to wait until the server has it.

        Cancellation: a publish that raises ``Cancelled`` sent nothing; one that returns
        has queued its message. It checks for cancellation on every call, may wait (a
        cancellable wait, before queueing) while the outgoing buffer is over
        ``pending_size``, and yields to the scheduler every :data:`YIELD_EVERY` calls or
        when 256 KiB are waiting to be written, without ever raising
        ``Cancelled`` after the message is queued.

        Raises:
            ValueError: bad subject (empty, wildcard, whitespace, too long), headers and
                payload together over the server's max_payload.
            TypeError: data is not bytes-like, headers not ``dict[str, str]``.
            ConnectionClosedError: the connection is closed (with the server's reason
                when the server closed it).
            ReconnectBufferFullError: reconnecting, and the reconnect buffer is full.
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
        if self._tracer is not None:
            return await self._tracer.publish(self, subject, data, reply or "", headers)
        await self._publish(subject, data, reply or "", headers)

    def _publish(
        self,
        subject: str,
        data: Any,
        reply: str,
        headers: dict[str, str] | None,
        wake: bool = True,
    ) -> Awaitable[None]:
        """Queue a validated message; the caller has checked for cancellation already,
        and awaits what this returns at once.

        A plain method, not a coroutine: on the hot path (appended, no yield due) it
        returns an awaitable that is done already, so a publish runs no coroutine of its
        own. Otherwise it returns the yield, or the wait for room (which yields once it
        has appended). A closed connection raises here, before the await; a message
        too big or a full reconnect buffer when the returned awaitable is awaited.

        With ``wake`` False the flusher is not kicked: the caller writes the buffer
        (``write_now``) or kicks the flusher itself right after this returns.
        """
        if self._closed:
            raise self._closed_error()
        hdr = None if headers is None else self._bridge.encode_headers(headers)
        outcome = self._try_append(self._client, subject, reply, data, hdr, wake)
        if outcome == 0:  # APPENDED: the hot path
            self._since_yield += 1
            if self._since_yield < YIELD_EVERY:
                return _DONE
        elif outcome != 1:  # not appended: wait for room, or fail; nothing was sent
            return self._publish_slow(outcome, subject, data, reply, hdr)
        self._since_yield = 0
        return trio.lowlevel.cancel_shielded_checkpoint()  # noqa: ASYNC105 - the caller awaits it

    def _write_pending(self) -> None:
        """A task is about to wait for the server: write the buffer now if it can
        (``write_now``: the socket is idle, once per loop pass); else the flusher will."""
        client = self._client
        if client._pending_data_size:
            self._bridge.write_now(client, self._ready)

    async def _publish_slow(
        self, outcome: int, subject: str, data: Any, reply: str, hdr: bytes | None
    ) -> None:
        """``_publish`` when the message was not appended: wait for room and append (then
        yield, as an appended publish does), or raise what ``outcome`` says."""
        bridge = self._bridge
        while outcome == bridge.MUST_WAIT:
            # Backpressure: wait for the flusher before queueing, so a cancel here means
            # the message was not sent. A lost or closed connection ends the wait too
            # (nats-py's flusher forgets its queue when the connection drops).
            future = bridge.flushed(self._client)
            self._flush_waits.add(future)
            try:
                await bridge.wait_future(future)
            finally:
                self._flush_waits.discard(future)
            if self._closed:
                raise self._closed_error()
            outcome = self._try_append(self._client, subject, reply, data, hdr)
        if outcome <= bridge.APPENDED_YIELD:
            self._since_yield = 0
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if outcome == bridge.TOO_BIG:
            limit = bridge.max_payload(self._client)
            size = len(data) + (0 if hdr is None else len(hdr))
            extra = "" if hdr is None else f" ({len(hdr)} of headers + {len(data)} of data)"
            raise ValueError(
                f"message of {size} bytes{extra} exceeds the server's max_payload of {limit} bytes"
            )
        if outcome == bridge.RECONNECT_BUFFER_FULL:
            raise _errors.ReconnectBufferFullError(
                "not connected and the reconnect buffer (pending_size) is full"
            )
        raise self._closed_error()

    # -- request -----------------------------------------------------------------------
    async def _ensure_router(self) -> _ReplyRouter:
        if self._router is None:
            prefix = self._client.new_inbox() + "."
            router = _ReplyRouter(prefix, _RequestTimer(self._bridge.current_loop()))
            self._bridge.subscribe_nowait(self._client, prefix + "*", None, router)
            self._router = router
        return self._router

    async def request(
        self,
        subject: str,
        data: bytes = b"",
        *,
        timeout: float | None = 2.0,
        headers: dict[str, str] | None = None,
    ) -> Msg:
        """Publish a request and wait for the first reply.

        Any enclosing cancel scope also applies. A request cancelled before it was queued
        sent nothing; one cancelled while waiting for its reply leaves nothing behind (a
        late reply is discarded) and the connection stays usable.

        Args:
            subject: where to send the request.
            data: the payload.
            timeout: seconds to wait for the reply; None: no deadline of its own, only
                the enclosing cancel scopes.
            headers: optional headers.

        Raises:
            trionats.TimeoutError: no reply within ``timeout`` seconds.
            trionats.NoRespondersError: nobody is subscribed to ``subject``.
            trionats.ConnectionClosedError: the connection closed before the reply came.
        """
        await checkpoint_if_cancelled()
        if subject not in _PUBLISH_OK:
            check_publish_subject(subject)
        if type(data) is not bytes:
            check_data(data)
        if timeout is not None and (type(timeout) is not float or not 0 < timeout < math.inf):
            check_seconds("timeout", timeout)
        if headers is not None:
            check_headers(headers)
        if self._tracer is not None:
            return await self._tracer.request(self, subject, data, timeout, headers)
        return await self._request(subject, data, timeout, headers)

    async def _request(
        self, subject: str, data: Any, timeout: float | None, headers: dict[str, str] | None
    ) -> Msg:
        """A validated request; the caller has checked for cancellation already."""
        self._check_open()
        router = self._router or await self._ensure_router()
        token = str(next(self._tokens))
        pending = _Pending()
        router.waiting[token] = pending
        timer = router.timer
        timed = False
        try:
            await self._publish(subject, data, router.prefix + token, headers, False)
            # About to wait for the server: write the request now rather than wake the
            # flusher (one scheduling round later), when the socket is idle.
            if not self._bridge.write_now(self._client, self._ready):
                self._bridge.kick(self._client)
            if pending.msg is None and pending.error is None:
                pending.task = current_task()
                if timeout is not None:
                    timer.add(pending, timeout)
                    timed = True

                def abort(_: Any) -> Abort:
                    pending.task = None
                    return Abort.SUCCEEDED

                await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            router.waiting.pop(token, None)
            pending.active = False
            if timed:
                timer.finished()
        msg = pending.msg
        pending.msg = None  # the timer may keep the entry until its deadline: not the reply
        if msg is None:
            if pending.error is not None:
                raise self._closed_error() from None
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
    def subscribe(
        self,
        subject: str,
        *,
        queue: str | None = None,
        max_pending_msgs: int = DEFAULT_PENDING_MSGS,
        max_pending_bytes: int = DEFAULT_PENDING_BYTES,
        timeout: float | None = 10.0,
        cb: None = None,
    ) -> AbstractAsyncContextManager[Subscription]:
        """Subscribe to ``subject`` (wildcards allowed) for the duration of the block.

        The subscription is registered on the server when the block is entered (a message
        published after that is received): entering waits for the server's confirmation
        (a PING/PONG), at most ``timeout`` seconds. Leaving the block unsubscribes.

        Example::

            async with nc.subscribe("orders.*", queue="workers") as sub:
                async for msg in sub:
                    ...

        Args:
            subject: the subject, wildcards allowed as whole tokens.
            queue: a queue group name: each message goes to one member of the group.
            max_pending_msgs: messages buffered before new ones are dropped (counted).
            max_pending_bytes: payload bytes buffered before new messages are dropped.
            timeout: seconds to wait for the registration; None: no deadline of its own.
            cb: not supported (nats-py's callback style): a ``TypeError`` that points at
                :func:`trionats.open_subscriber`, which runs a handler per message.

        ``await nc.subscribe(...)`` (nats-py's habit) is a ``TypeError`` saying to write
        ``async with nc.subscribe(...) as sub:``.

        Raises:
            ValueError / TypeError: bad subject, queue, limits or timeout.
            trionats.TimeoutError: the server did not confirm within ``timeout``.
            trionats.ConnectionClosedError: the connection is closed or draining.
        """
        if cb is not None:
            raise TypeError(
                f"subscribe({subject!r}, cb={cb!r}): trionats has no callback subscriptions; "
                "to run a handler per message use trionats.open_subscriber(nc) and "
                f"`await subscriber.start({subject!r}, handler)`, or iterate: "
                f"`async with nc.subscribe({subject!r}) as sub: async for msg in sub: ...`"
            )
        return _AsyncWithOnly(
            self._subscribe(subject, queue, max_pending_msgs, max_pending_bytes, timeout),
            f"nc.subscribe({subject!r}) is not awaitable: it is an async context manager "
            f"(not nats-py's `await nc.subscribe(...)`); write "
            f"`async with nc.subscribe({subject!r}) as sub:` and then `async for msg in sub:`",
        )

    @asynccontextmanager
    async def _subscribe(
        self,
        subject: str,
        queue: str | None,
        max_pending_msgs: int,
        max_pending_bytes: int,
        timeout: float | None,
    ) -> AsyncIterator[Subscription]:
        check_subscribe_subject(subject)
        check_queue(queue)
        check_int("max_pending_msgs", max_pending_msgs, minimum=1)
        check_int("max_pending_bytes", max_pending_bytes, minimum=1)
        timeout = check_seconds("timeout", timeout, allow_none=True)
        await checkpoint_if_cancelled()
        self._check_open()
        if self._draining:
            raise _errors.ConnectionClosedError("the connection is draining")
        sub = Subscription(self, subject, queue, max_pending_msgs, max_pending_bytes)
        sub._nats_sub = self._bridge.subscribe_nowait(self._client, subject, queue, sub)
        self._subs.add(sub)
        try:
            try:
                await self.flush(timeout=timeout)
            except _errors.TimeoutError:
                raise _errors.TimeoutError(
                    f"the server did not confirm the subscription to {subject!r} within {timeout} s"
                ) from None
            yield sub
        finally:
            self._subs.discard(sub)
            self._unsubscribe_nowait(sub)
            sub._finished()

    def _unsubscribe_nowait(self, sub: Subscription, *, send_unsub: bool = True) -> None:
        """Stop routing messages to ``sub`` and end it (after what it has buffered)."""
        nats_sub = sub._nats_sub
        sub._end()
        if nats_sub is None:
            return
        sub._nats_sub = None
        self._bridge.unsubscribe_nowait(
            self._client, nats_sub, send_unsub=send_unsub and not self._released
        )

    # -- flush / drain / close -----------------------------------------------------------
    async def flush(self, timeout: float | None = 10.0) -> None:
        """Wait until the server has processed everything sent so far (a PING/PONG).

        Never returns on a connection that is closed or lost: a flush in flight fails
        when the connection is lost or closed, rather than waiting for its timeout.

        Args:
            timeout: seconds; None: no deadline of its own, only the enclosing scopes.

        Raises:
            trionats.TimeoutError: no PONG within ``timeout`` seconds.
            trionats.ConnectionClosedError: the connection is closed (with the server's
                reason when the server closed it), or was lost during the flush.
        """
        timeout = check_seconds("timeout", timeout, allow_none=True)
        await checkpoint_if_cancelled()
        self._check_open()
        with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
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
            if self._closed or self._client.is_closed:
                raise self._closed_error()
            raise _errors.ConnectionClosedError("not connected (the connection is reconnecting)")
        bridge = self._bridge
        future = bridge.send_ping(self._client, self._ready)
        self._pings.add(future)
        try:
            await bridge.wait_future(future)
        finally:
            self._pings.discard(future)

    async def drain(self, timeout: float | None = 30.0) -> None:
        """Drain and close: stop subscriptions, let consumers finish, flush, close.

        Each subscription is unsubscribed on the server; after a round trip, every message
        the server sent for it is buffered. Consumers then have until ``timeout`` to take
        them and finish: a subscription counts as finished when its consumer comes back
        for more after the last message (iteration ends) or its ``subscribe`` block exits,
        so a handler still working on the last message can still respond. Publishing
        (replies included) is allowed until the final flush; then the connection closes.
        A cancel cuts the waiting short but the connection is still closed (shielded,
        bounded by the close timeout) before ``Cancelled`` propagates.

        Args:
            timeout: seconds for the whole drain; None: no deadline of its own.
        """
        timeout = check_seconds("timeout", timeout, allow_none=True)
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._draining = True
        try:
            with trio.move_on_after(math.inf if timeout is None else timeout):
                subs = list(self._subs)
                # UNSUB first and keep routing: messages the server sent before it must
                # still reach the buffers. After the PONG nothing more can come.
                for sub in subs:
                    if sub._nats_sub is not None:
                        self._bridge.send_unsub_nowait(self._client, sub._nats_sub)
                if self._client.is_connected:
                    await self._ping()
                for sub in subs:
                    self._unsubscribe_nowait(sub, send_unsub=False)
                for sub in subs:
                    await sub._wait_finished()
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
        if self._released:
            return
        self._closed = True
        self._released = True
        self._draining = False
        self._end_everything(_errors.ConnectionClosedError("the connection closed"))
        await self._bridge.force_close(self._client, self._close_timeout)
        self._emit(ConnectionEvent(EventKind.CLOSED))
        for stream in list(self._event_streams):
            stream.close()

    def _end_everything(self, error: _errors.ConnectionClosedError) -> None:
        """End subscriptions, wake waiting requests and flushes: nothing more will come."""
        for sub in list(self._subs):
            sub._end(error if self._death is not None else None)
        router = self._router
        if router is not None:
            router.timer.close()
            router.fail_all(error)
        self._fail_pings(error)
        self._release_flush_waits()

    def _fail_pings(self, error: BaseException) -> None:
        """Flushes in flight fail now rather than at their timeout: no PONG will come."""
        for future in self._pings:
            if not future.done():
                future.set_exception(error)

    def _release_flush_waits(self) -> None:
        """Publishes waiting for the flusher retry now: it will not write (lost, closed)."""
        for future in self._flush_waits:
            if not future.done():
                future.set_result(None)

    # -- nats-py callbacks (run on the Trio thread, inside the asyncio loop) -------------
    def _reason(self) -> _errors.TrionatsError | None:
        """What nats-py recorded as the last error, translated and redacted."""
        exc = self._bridge.last_error(self._client)
        if exc is None:
            return None
        error = self._bridge.translate(exc)
        if not isinstance(error, _errors.TrionatsError):  # pragma: no cover - translate's rule
            error = _errors.TrionatsError(redact(str(error)))
        return error

    async def _on_error(self, exc: Exception) -> None:
        error = self._bridge.translate(exc)
        if isinstance(error, _errors.TrionatsError):
            self._last_error = error
        self._end_denied_subscriptions(error)
        self._emit(ConnectionEvent(EventKind.ERROR, error=error))

    def _end_denied_subscriptions(self, error: BaseException) -> None:
        """A subscription the server refused (permissions) ends with that error.

        The server never registered it, so it would otherwise wait forever, silently.
        """
        denied = _DENIED_SUBSCRIPTION.search(str(error))
        if denied is None:
            return
        subject, queue = denied.group(1), denied.group(2)
        for sub in list(self._subs):
            if sub.subject == subject and sub.queue == queue:
                sub._end(
                    _errors.SubscriptionClosedError(
                        f"the server refused the subscription to {subject!r}: {error}"
                    )
                )
                self._unsubscribe_nowait(sub, send_unsub=False)

    async def _on_disconnected(self) -> None:
        # nats-py forgets the PONGs it waits for when it reconnects.
        reason = self._reason() if self._client.is_closed else None
        why = "the connection was lost during the flush"
        self._fail_pings(_errors.ConnectionClosedError(f"{why}: {reason}" if reason else why))
        self._release_flush_waits()
        if not self._closed:
            self._emit(ConnectionEvent(EventKind.DISCONNECTED))

    async def _on_reconnected(self) -> None:
        self._last_url = self.connected_url
        self._emit(ConnectionEvent(EventKind.RECONNECTED))

    async def _on_discovered(self) -> None:
        self._emit(ConnectionEvent(EventKind.SERVER_DISCOVERED))

    async def _on_lame_duck(self) -> None:
        self._emit(ConnectionEvent(EventKind.LAME_DUCK))

    async def _on_closed(self) -> None:
        """nats-py closed the connection itself: a server -ERR, or reconnects exhausted."""
        if self._closed:
            return  # our own aclose
        self._closed = True
        reason = self._reason()
        if reason is not None:
            death = _errors.ConnectionClosedError(f"the server closed the connection: {reason}")
            death.__cause__ = reason
            self._last_error = reason
        else:
            death = _errors.ConnectionClosedError(
                "the connection closed: the client library gave up reconnecting"
            )
        self._death = death
        self._end_everything(death)
        self._emit(ConnectionEvent(EventKind.ERROR, error=death))
        self._emit(ConnectionEvent(EventKind.CLOSED))
        for stream in list(self._event_streams):
            stream.close()

    # -- JetStream ---------------------------------------------------------------------
    def jetstream(self, *, prefix: str = "$JS.API", timeout: float = 5.0) -> JetStream:
        """A :class:`~trionats.JetStream` context on this connection (no I/O here).

        Args:
            prefix: the JetStream API prefix (another for a domain or an account import).
            timeout: seconds each JetStream API request and publish waits for its answer.

        Example::

            js = nc.jetstream()
            await js.add_stream("ORDERS", ["orders.>"])
            ack = await js.publish("orders.new", b"...", msg_id="o-1")
        """
        from ._jetstream import JetStream

        return JetStream(self, prefix=prefix, timeout=timeout)

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else "connected" if self.is_connected else "connecting"
        return f"<trionats.Connection {self.name or ''} {self.connected_url} {state}>"
