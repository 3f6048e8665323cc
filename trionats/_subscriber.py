"""The concurrent subscriber: bounded worker slots over one or more subscriptions.

``open_subscriber(nc)`` owns a nursery. Each ``await subscriber.start(subject, handler)``
subscribes and runs persistent worker tasks for that subscription, started lazily, at most
``min(handle max_workers, subscriber max_workers)`` (a task per message measured 17 µs/msg).
A worker takes a message only when a slot is free (no over-fetch); one idle worker always
watches the subscription, or the shared "slot freed" parking lot when every slot is taken,
so no message waits while a slot is free. Without a ``handler_timeout`` the handler runs
inline in the worker's loop, and a burst wakes one helper, not one worker per message (a
handler that never blocks is done before the helper runs; the helper wakes the rest only
if it finds the buffer untouched): a no-op handler costs about what a bare
``async for msg in sub`` loop does (benchmarks/bench_subscriber.py). Messages that the
handlers cannot keep up with wait in the subscription's own
bounded buffer (``pending_msgs`` / ``pending_bytes``); beyond that the connection drops and
counts them and emits one SLOW_CONSUMER event per dropping episode (it ends once the
buffer is empty).

Accounting is kept in two small synchronous classes (:class:`_SubscriberCore`,
:class:`_HandleCore`) that the property tests drive without any I/O. ``received`` is never
counted separately: it is computed from the subscription's own counters
(``delivered + dropped + pending``), so the invariant::

    received == processed + failed + timed_out + dropped + in_flight + pending

holds exactly at every instant, not only when things are quiet.

Shutdown order of one handle (``handle.stop()``, leaving ``open_subscriber``, or an outer
cancel): stop taking messages -> unsubscribe (the server sends no more to this member of the
queue group) -> messages still buffered are discarded and counted as dropped -> in-flight
handlers get the grace period -> the rest are cancelled and counted -> done. An outer cancel
cuts the grace period to what is left of the caller's deadline (zero when already cancelled),
but still completes every step before ``Cancelled`` propagates. ``timeout=None`` (on
``stop``, ``start`` and in :class:`SubscriberConfig`) means no deadline of its own: only the
enclosing cancel scopes bound the wait.

A handler that shields itself from cancellation cannot be cancelled. A stop still returns
at most ``_CANCEL_GRACE`` (0.25 s) after its deadline: it logs a WARNING naming the subject,
the handler and the stuck task, and leaves that task where it is, in the subscriber's
nursery (nothing escapes structure): it is still counted ``in_flight``, its outcome is
counted when it ends, and ``handle.stopped`` becomes True only then. Leaving
``open_subscriber`` cannot abandon it either: once its own grace period is over, the exit
logs the same WARNING, then waits for the handler to end (no cancel scope can cut that
wait short, since the handler is shielded from them all).
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, final

import trio
from trio.lowlevel import Abort, ParkingLot, current_task, reschedule, wait_task_rescheduled

from . import _errors
from ._jetstream import AckPolicy, JetStream, JsMsg, PullSubscription, _check_name
from ._log import RateLimiter, conn_fields
from ._metrics import EMPTY, Histogram, LatencySnapshot, merged_snapshot
from ._validate import (
    check_bool,
    check_int,
    check_queue,
    check_seconds,
    check_subscribe_subject,
    redact,
)

if TYPE_CHECKING:
    from types import FrameType

    from ._connection import Connection
    from ._msg import Msg
    from ._pool import Pool
    from ._subscriber_batch import BatchHandle, BatchHandler
    from ._subscription import Subscription

__all__ = [
    "Handler",
    "JetStreamHandle",
    "JsHandler",
    "Subscriber",
    "SubscriberConfig",
    "SubscriberStats",
    "SubscriptionHandle",
    "open_subscriber",
]

log = logging.getLogger("trionats.subscriber")
_limited = RateLimiter(log)  # repeated events: handler failures, timeouts, failed replies

Handler = Callable[["Msg"], Awaitable[bytes | None]]
"""``async def handler(msg) -> bytes | None``; returned bytes answer a request."""

JsHandler = Callable[[JsMsg], Awaitable[object]]
"""``async def handler(msg: JsMsg) -> None`` for :meth:`Subscriber.start_jetstream`."""

_MAX_ERROR_HEADER = 256
_YIELD_EVERY = 64
"""Messages one worker handles between two full yields to the Trio scheduler."""


_CANCEL_GRACE = 0.25
"""Seconds a stop waits, after cancelling the handlers still running, before it reports the
ones that do not end (shielded from cancellation) and returns without them."""

_DEFAULT_START_TIMEOUT = 10.0


class _Default(enum.Enum):
    """The default of ``handle.stop(timeout=...)``: the subscriber's ``stop_timeout``."""

    DEFAULT = "default"

    def __repr__(self) -> str:
        return "<the subscriber's stop_timeout>"


_DEFAULT = _Default.DEFAULT


def _unwrap_partial(obj: object) -> object:
    while isinstance(obj, functools.partial):
        obj = obj.func
    return obj


def _is_async_callable(obj: object) -> bool:
    """``obj(...)`` runs an ``async def``: a function, a bound method, a partial of one, or
    an object whose ``__call__`` is ``async def``."""
    target = _unwrap_partial(obj)
    if inspect.iscoroutinefunction(target):
        return True
    if isinstance(target, type) or not callable(target):
        return False
    return inspect.iscoroutinefunction(getattr(target, "__call__", None))  # noqa: B004


def _callable_name(obj: object) -> str:
    """``module.QualifiedName`` of a handler (of its class, for a callable object)."""
    target = _unwrap_partial(obj)
    name = getattr(target, "__qualname__", None)
    if not isinstance(name, str):
        name = type(target).__qualname__
    module = getattr(target, "__module__", None)
    if not isinstance(module, str):
        module = type(target).__module__
    name = f"{module}.{name}"
    return f"functools.partial({name})" if target is not obj else name


def _check_handler(handler: object) -> None:
    if not _is_async_callable(handler):
        what = _callable_name(handler) if callable(handler) else type(handler).__name__
        raise TypeError(f"handler must be an async function (async def), got {what}: {handler!r}")


@final
@dataclass(frozen=True, slots=True)
class SubscriberConfig:
    """Limits and timeouts of a :class:`Subscriber`, validated on creation.

    Attributes:
        max_workers: handlers running at once, over all subscriptions of the subscriber.
        pending_msgs: messages each subscription buffers while every worker is busy;
            beyond that (or ``pending_bytes``) messages are dropped and counted.
        pending_bytes: payload bytes each subscription buffers.
        handler_timeout: seconds one handler may run before it is cancelled and counted as
            ``timed_out`` (None: no limit).
        stop_timeout: grace period, in seconds, that leaving ``open_subscriber`` (and
            ``handle.stop()`` without a timeout) gives in-flight handlers (None: no
            deadline of its own, only the enclosing cancel scopes).
        metrics: time every handler run into ``SubscriberStats.handler_duration`` (two
            clock reads and a histogram update per message; False turns that off).

    Raises:
        TypeError: a field has the wrong type (``max_workers="x"``); the message names the
            field and the value.
        ValueError: a field has a wrong value (``max_workers=0``, ``pending_msgs=-1``).

    Example::

        config = SubscriberConfig(max_workers=16, handler_timeout=30)
    """

    max_workers: int = 64
    pending_msgs: int = 128 * 1024
    pending_bytes: int = 256 * 1024 * 1024
    handler_timeout: float | None = None
    stop_timeout: float | None = 5.0
    metrics: bool = True

    def __post_init__(self) -> None:
        for name in ("max_workers", "pending_msgs", "pending_bytes"):
            check_int(f"SubscriberConfig.{name}", getattr(self, name), minimum=1)
        check_bool("SubscriberConfig.metrics", self.metrics)
        handler_timeout = check_seconds(
            "SubscriberConfig.handler_timeout", self.handler_timeout, allow_none=True
        )
        object.__setattr__(self, "handler_timeout", handler_timeout)
        stop_timeout = check_seconds(
            "SubscriberConfig.stop_timeout", self.stop_timeout, allow_none=True, allow_zero=True
        )
        object.__setattr__(self, "stop_timeout", stop_timeout)


@final
@dataclass(frozen=True, slots=True)
class SubscriberStats:
    """A snapshot of a subscriber's (or one subscription handle's) counters.

    At every instant ``received == processed + failed + timed_out + dropped + in_flight +
    pending``.

    Attributes:
        received: messages the server delivered to the subscription(s).
        processed: handlers that returned normally (and, for a request answered with bytes,
            whose reply was sent).
        failed: handlers that raised an exception (or whose reply could not be sent).
        timed_out: handlers that did not finish in time: cancelled by ``handler_timeout``,
            or still running when a stop's grace period ended (those are also in
            ``cancelled``).
        cancelled: the part of ``timed_out`` cancelled by a stop or an outer cancel.
        dropped: messages never handed to a handler: over the pending limits, or still
            buffered when the subscription stopped.
        in_flight: handlers running now.
        pending: messages buffered, waiting for a free worker slot.
        pending_bytes: payload bytes of those messages.
        active: running subscriptions (0 or 1 for a handle).
        connection_error: the most recent error the connection reported (the server's
            ``-ERR`` reason, for one, when it closed the connection), as text with any
            credentials redacted; None when it reported none.
        handler_duration: how long handler runs took (every outcome), as a histogram:
            count, p50/p90/p99/max (see :class:`trionats.LatencySnapshot` for the error
            bound); empty when ``SubscriberConfig.metrics`` is off.
    """

    received: int
    processed: int
    failed: int
    timed_out: int
    cancelled: int
    dropped: int
    in_flight: int
    pending: int
    pending_bytes: int
    active: int
    connection_error: str | None = None
    handler_duration: LatencySnapshot = EMPTY


class _Source(Protocol):
    """What the accounting reads from a subscription (``Subscription`` provides it)."""

    @property
    def delivered(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    @property
    def pending(self) -> int: ...
    @property
    def pending_bytes(self) -> int: ...


class Outcome(enum.Enum):
    """How one handler run ended."""

    PROCESSED = "processed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


class _State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@final
class _HandleCore:
    """Synchronous accounting of one subscription handle (no I/O, no Trio)."""

    __slots__ = (
        "cancelled",
        "discarded",
        "durations",
        "failed",
        "in_flight",
        "max_workers",
        "processed",
        "reserved",
        "source",
        "state",
        "timed_out",
    )

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers
        self.state = _State.STARTING
        self.source: _Source | None = None
        self.in_flight = 0
        self.processed = 0
        self.failed = 0
        self.timed_out = 0
        self.cancelled = 0
        self.discarded = 0  # taken from the buffer at stop, never handled
        self.reserved = 0  # slots promised to messages requested (JetStream pulls)
        self.durations = Histogram()

    def stats(self, connection_error: str | None = None) -> SubscriberStats:
        src = self.source
        delivered = dropped = pending = pending_bytes = 0
        if src is not None:
            delivered, dropped = src.delivered, src.dropped
            pending, pending_bytes = src.pending, src.pending_bytes
        return SubscriberStats(
            received=delivered + dropped + pending,
            processed=self.processed,
            failed=self.failed,
            timed_out=self.timed_out + self.cancelled,
            cancelled=self.cancelled,
            dropped=dropped + self.discarded,
            in_flight=self.in_flight,
            pending=pending,
            pending_bytes=pending_bytes,
            active=1 if self.state in (_State.RUNNING, _State.STOPPING) else 0,
            connection_error=connection_error,
            handler_duration=self.durations.snapshot(),
        )


@final
class _SubscriberCore:
    """Synchronous accounting and slot arithmetic shared by a subscriber's handles."""

    __slots__ = (
        "_retired",
        "_retired_durations",
        "handles",
        "in_flight",
        "max_workers",
        "reserved",
    )

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers
        self.in_flight = 0
        self.reserved = 0
        self.handles: set[_HandleCore] = set()
        self._retired = [0] * 6  # received, processed, failed, timed_out, cancelled, dropped
        self._retired_durations = Histogram()

    def add(self, h: _HandleCore) -> None:
        self.handles.add(h)

    def running(self, h: _HandleCore, source: _Source) -> None:
        """The subscription is registered: count from ``source`` from now on."""
        if h.state is _State.STARTING:
            h.state = _State.RUNNING
        h.source = source

    def free_slots(self, h: _HandleCore) -> int:
        """How many messages ``h`` may take now (0 once it is stopping)."""
        if h.state is not _State.RUNNING:
            return 0
        return min(
            self.max_workers - self.in_flight - self.reserved,
            h.max_workers - h.in_flight - h.reserved,
        )

    def reserve(self, h: _HandleCore, n: int) -> None:
        """Promise ``n`` free slots of ``h`` to messages requested from the server."""
        if n > self.free_slots(h):
            raise RuntimeError("trionats bug: reserved more slots than are free")
        h.reserved += n
        self.reserved += n

    def unreserve(self, h: _HandleCore, n: int) -> None:
        """``n`` reserved slots of ``h`` will not be used (the request ended short)."""
        if n > h.reserved:
            raise RuntimeError("trionats bug: released more slots than were reserved")
        h.reserved -= n
        self.reserved -= n

    def taken_reserved(self, h: _HandleCore) -> None:
        """A requested message arrived: its reserved slot is now a handler in flight."""
        self.unreserve(h, 1)
        h.in_flight += 1
        self.in_flight += 1

    def taken(self, h: _HandleCore) -> None:
        """One message was taken from ``h``'s buffer and its handler is starting."""
        if self.free_slots(h) <= 0:
            raise RuntimeError("trionats bug: took a message without a free worker slot")
        h.in_flight += 1
        self.in_flight += 1

    def finished(self, h: _HandleCore, outcome: Outcome, duration: float | None = None) -> None:
        """A handler of ``h`` ended with ``outcome`` after ``duration`` seconds (None: not
        timed)."""
        if h.in_flight <= 0:
            raise RuntimeError("trionats bug: a handler finished that was not in flight")
        if duration is not None:
            h.durations.record(duration)
        h.in_flight -= 1
        self.in_flight -= 1
        if outcome is Outcome.PROCESSED:
            h.processed += 1
        elif outcome is Outcome.FAILED:
            h.failed += 1
        elif outcome is Outcome.TIMED_OUT:
            h.timed_out += 1
        else:
            h.cancelled += 1

    def stopping(self, h: _HandleCore) -> None:
        """Stop taking messages for ``h``."""
        if h.state in (_State.STARTING, _State.RUNNING):
            h.state = _State.STOPPING

    def discarded(self, h: _HandleCore, n: int) -> None:
        """``n`` buffered messages of a stopping ``h`` were taken and thrown away."""
        if h.state is not _State.STOPPING and n:
            raise RuntimeError("trionats bug: discarded messages of a running subscription")
        h.discarded += n

    def stopped(self, h: _HandleCore) -> None:
        """``h`` is done: no handler of it runs any more. Its final counts are kept."""
        if h.in_flight:
            raise RuntimeError("trionats bug: subscription stopped with handlers in flight")
        if h.state is _State.STOPPED:
            return
        h.state = _State.STOPPED
        if h in self.handles:
            self.handles.discard(h)
            s = h.stats()
            for i, v in enumerate(
                (s.received, s.processed, s.failed, s.timed_out, s.cancelled, s.dropped)
            ):
                self._retired[i] += v
            self._retired_durations.merge(h.durations)

    def stats(self, connection_error: str | None = None) -> SubscriberStats:
        received, processed, failed, timed_out, cancelled, dropped = self._retired[:6]
        in_flight = pending = pending_bytes = active = 0
        for h in self.handles:
            s = h.stats()
            received += s.received
            processed += s.processed
            failed += s.failed
            timed_out += s.timed_out
            cancelled += s.cancelled
            dropped += s.dropped
            in_flight += s.in_flight
            pending += s.pending
            pending_bytes += s.pending_bytes
            active += s.active
        return SubscriberStats(
            received=received,
            processed=processed,
            failed=failed,
            timed_out=timed_out,
            cancelled=cancelled,
            dropped=dropped,
            in_flight=in_flight,
            pending=pending,
            pending_bytes=pending_bytes,
            active=active,
            connection_error=connection_error,
            handler_duration=merged_snapshot(
                [self._retired_durations, *(h.durations for h in self.handles)]
            ),
        )


def _discard_buffered(sub_core: _SubscriberCore, h: _HandleCore, sub: Subscription) -> None:
    """Take what a stopping subscription still buffers and count it as dropped."""
    n = 0
    while sub.pending:
        sub.take_nowait()
        n += 1
    sub_core.discarded(h, n)
    if n:
        log.info(
            "subscription on %r stopped: %d buffered message(s) discarded (counted as dropped)",
            sub.subject,
            n,
            extra=conn_fields(sub._conn, "subscriber", subject=sub.subject, dropped=n),
        )


def _header_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    text = " ".join(text.split())  # no CR/LF or other control whitespace in a header
    return text[:_MAX_ERROR_HEADER]


class _Stoppable(Protocol):
    """What :func:`_stop_handle` needs of a handle (core and JetStream alike)."""

    _done: trio.Event
    _subscriber: Subscriber

    def _request_stop(self, deadline: float) -> None: ...

    def _warn_stuck(self, who: str) -> None: ...


async def _stop_handle(handle: _Stoppable, timeout: float | _Default | None) -> None:
    """The one ``stop(timeout)`` of every handle: see :meth:`SubscriptionHandle.stop`.

    Waits until the handle is stopped, at most ``_CANCEL_GRACE`` after its handlers were
    cancelled; a cancelled caller finishes the stop (no grace left), then propagates.
    """
    if timeout is _DEFAULT:
        timeout = handle._subscriber._config.stop_timeout
    else:
        timeout = check_seconds("timeout", timeout, allow_none=True, allow_zero=True)
    own = math.inf if timeout is None else trio.current_time() + timeout
    deadline = min(own, trio.current_effective_deadline())
    handle._request_stop(deadline)
    try:
        with trio.move_on_at(deadline + _CANCEL_GRACE):
            await handle._done.wait()
    except trio.Cancelled:
        handle._request_stop(-math.inf)
        with trio.CancelScope(shield=True, deadline=trio.current_time() + _CANCEL_GRACE):
            await handle._done.wait()
        if not handle._done.is_set():
            handle._warn_stuck("handle.stop() (cancelled)")
        raise
    if not handle._done.is_set():
        handle._warn_stuck("handle.stop()")


@final
class SubscriptionHandle:
    """One running subscription of a :class:`Subscriber`; returned by ``start``.

    Attributes:
        subject: the subscribed subject.
        queue: the queue group, or None.
        max_workers: this subscription's own limit on concurrent handlers (the
            subscriber's ``max_workers`` applies as well).
    """

    def __init__(
        self,
        subscriber: Subscriber,
        subject: str,
        handler: Handler,
        queue: str | None,
        max_workers: int,
    ) -> None:
        self._subscriber = subscriber
        self.subject = subject
        self.queue = queue
        self.max_workers = max_workers
        self._handler = handler
        self._core = _HandleCore(max_workers)
        self._sub: Subscription | None = None
        self._workers: trio.Nursery | None = None
        self._n_workers = 0
        self._limit = min(max_workers, subscriber._config.max_workers)
        # Idle workers park here (a stack: the most recently parked, warmest, wakes first);
        # one more waits on the subscription, or (when no slot is free) on the subscriber's
        # slot_freed lot, so a message never waits unwatched.
        self._idle: list[trio.lowlevel.Task] = []
        self._slot_watchers = 0
        # Workers not parked (running, runnable, or in a handler): ``_awake - in_flight``
        # are free to take a message without being woken. Whoever wakes an idle worker
        # counts it awake at once, so it is not woken twice.
        self._awake = 0
        self._watching_sub = False  # a worker waits on (or was just woken by) the subscription
        self._wake_run = trio.Event()  # stop requested, or the subscription ended
        self._stop_deadline = math.inf
        self._done = trio.Event()
        self._task_name = f"trionats.subscriber worker {subject!r}"

    # -- public --------------------------------------------------------------------------
    def stats(self) -> SubscriberStats:
        """A snapshot of this subscription's counters (see :class:`SubscriberStats`)."""
        return self._core.stats(self._subscriber._connection_error())

    @property
    def stopped(self) -> bool:
        """True once the subscription has ended and none of its handlers runs any more."""
        return self._done.is_set()

    async def stop(self, timeout: float | _Default | None = _DEFAULT) -> None:
        """Stop this subscription; returns when none of its handlers runs any more.

        Stops taking messages, unsubscribes (the server sends no more to this member of the
        queue group), discards what is still buffered (counted as dropped), lets in-flight
        handlers finish within ``timeout`` seconds, then cancels the rest (counted as
        ``timed_out`` and ``cancelled``). Safe to call twice and from several tasks.

        An enclosing cancel scope cuts the grace period to what is left of its deadline. If
        the call is cancelled, the remaining handlers are cancelled at once, the stop is
        completed, and then ``Cancelled`` propagates: a stop is never left half done.

        A handler that shields itself from cancellation cannot be stopped: 0.25 s after it
        was cancelled, ``stop`` logs a WARNING (logger ``trionats.subscriber``) naming the
        subject, the handler and its task, and returns (or lets ``Cancelled`` propagate)
        without it. The handler keeps running in the subscriber's nursery, counted
        ``in_flight`` until it ends; ``stopped`` stays False until then, and leaving
        ``open_subscriber`` waits for it.

        Args:
            timeout: grace period, in seconds, for in-flight handlers; 0 cancels them at
                once; None: no deadline of its own (wait for them to finish, bounded only
                by the enclosing cancel scopes). Defaults to the subscriber's
                ``stop_timeout``.

        Raises:
            TypeError: ``timeout`` is not a number or None.
            ValueError: ``timeout`` is negative, NaN or infinite.

        Example::

            handle = await subscriber.start("orders.*", handle_order)
            ...
            await handle.stop(timeout=2)
        """
        await _stop_handle(self, timeout)

    def __repr__(self) -> str:
        return (
            f"<trionats.SubscriptionHandle {self.subject!r} queue={self.queue!r} "
            f"{self._core.state.value}>"
        )

    # -- internals -----------------------------------------------------------------------
    def _request_stop(self, deadline: float) -> None:
        """Stop taking now; cancel in-flight handlers at ``deadline`` (-inf: now)."""
        self._subscriber._core.stopping(self._core)
        self._stop_deadline = min(self._stop_deadline, deadline)
        self._wake_run.set()
        if self._workers is not None:
            scope = self._workers.cancel_scope
            scope.deadline = min(scope.deadline, deadline)

    def _warn_stuck(self, who: str) -> None:
        """Log the handlers that did not end although they were cancelled."""
        log.warning(
            "%s: %d handler(s) of the subscription on %r did not end %.2f s after being "
            "cancelled (shielded from cancellation?): handler %s; stuck: %s. They stay in "
            "the subscriber's nursery, are counted when they end, and leaving "
            "open_subscriber waits for them.",
            who,
            self._core.in_flight,
            self.subject,
            _CANCEL_GRACE,
            _callable_name(self._handler),
            ", ".join(self._stuck_tasks()) or "(no task found)",
            extra=self._log_fields(),
        )

    def _stuck_tasks(self) -> list[str]:
        """The worker tasks still alive, each with where its handler is waiting."""
        workers = self._workers
        if workers is None:
            return []
        found = []
        for task in workers.child_tasks:
            frames: list[FrameType] = [frame for frame, _ in task.iter_await_frames()]
            where = ""
            for i, frame in enumerate(frames[:-1]):
                if frame.f_code in _RUNS_HANDLERS:
                    inner = frames[i + 1]
                    where = (
                        f" in {inner.f_code.co_qualname} "
                        f"({inner.f_code.co_filename}:{inner.f_lineno})"
                    )
                    break
            found.append(f"{task!r}{where}")
        return found

    async def _run(
        self,
        conn: Connection,
        timeout: float | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        sub_core = self._subscriber._core
        config = self._subscriber._config
        try:
            async with trio.open_nursery() as workers:
                self._workers = workers
                if self._stop_deadline < math.inf:
                    workers.cancel_scope.deadline = self._stop_deadline
                try:
                    async with conn.subscribe(
                        self.subject,
                        queue=self.queue,
                        max_pending_msgs=config.pending_msgs,
                        max_pending_bytes=config.pending_bytes,
                        timeout=timeout,
                    ) as sub:
                        self._sub = sub
                        sub_core.running(self._core, sub)
                        self._spawn(1)
                        task_status.started()
                        await self._wake_run.wait()
                        if self._core.state is _State.RUNNING:
                            reason = self._subscriber._connection_error()
                            log.warning(
                                "subscription on %r ended (connection closed%s); "
                                "finishing its in-flight handlers",
                                self.subject,
                                f": {reason}" if reason else "",
                                extra=self._log_fields(),
                            )
                finally:
                    # Leaving `subscribe` unsubscribed (synchronously) and woke the worker
                    # waiting on it: nothing more arrives.
                    sub_core.stopping(self._core)
                    self._discard_buffered()
                    self._wake_idle(len(self._idle))
                    self._subscriber._slot_freed.unpark_all()
                # The nursery now waits for in-flight handlers, until the stop deadline.
        except BaseExceptionGroup as group:
            _errors.reraise_unwrapped(group, 1)  # only the workers nursery's own level
        finally:
            sub_core.stopped(self._core)
            self._subscriber._active.pop(self, None)
            self._done.set()
            _limited.flush(self._own_key)

    def _discard_buffered(self) -> None:
        if self._sub is not None:
            _discard_buffered(self._subscriber._core, self._core, self._sub)

    def _spawn(self, n: int) -> None:
        workers, sub = self._workers, self._sub
        assert workers is not None
        assert sub is not None
        for _ in range(min(n, self._limit - self._n_workers)):
            workers.start_soon(self._worker, sub, name=self._task_name)
            self._n_workers += 1
            self._awake += 1  # counted from now: it runs soon, free to take

    def _wake_idle(self, n: int) -> int:
        """Wake up to ``n`` idle workers (most recently parked first); returns how many."""
        idle = self._idle
        woken = 0
        while woken < n and idle:
            reschedule(idle.pop())
            woken += 1
        self._awake += woken
        return woken

    def _recruit(self, n: int) -> None:
        """Get ``n`` more workers going: wake idle ones, start new ones up to the limit."""
        if n > 0:
            woken = self._wake_idle(n)
            if woken < n:
                self._spawn(n - woken)

    def _recruit_after_take(self, sub: Subscription, free_left: int, fresh: bool) -> None:
        """A worker took a message and no other worker is free and awake: make sure the
        rest of the buffer (or the next message, or the next free slot) is watched.

        ``free_left``: slots still free. ``fresh``: this worker was just woken (or started)
        to help, and found messages nobody took: the workers before it are blocked in
        their handlers, so wake one per buffered message (up to the free slots) at once.
        Otherwise wake a single helper: a handler that never blocks (the common fast
        case) finishes before the helper runs, and this worker takes the next message
        itself, so a burst costs one wake-up, not one per message.
        """
        if self._watching_sub and not sub.has_waiter:
            return  # the subscription's watcher was woken by a message: it is on its way
        if free_left > 0:
            pending = sub.pending
            if pending:
                self._recruit(min(pending, free_left) if fresh else 1)
            elif not sub.has_waiter:
                self._recruit(1)  # to wait on the subscription
        elif not sub.has_waiter and not self._slot_watchers:
            self._recruit(1)  # to wait for a free slot (another handle may free one)

    async def _park_idle(self) -> None:
        """Park until :meth:`_wake_idle` (which counts this worker awake again)."""
        task = current_task()
        self._idle.append(task)
        self._awake -= 1

        def abort(_: object) -> Abort:
            self._idle.remove(task)
            self._awake += 1
            return Abort.SUCCEEDED

        await wait_task_rescheduled(abort)

    async def _worker(self, sub: Subscription) -> None:
        """Take a message only when a worker slot is free, handle it, repeat.

        Workers are started lazily (at most ``min(max_workers of the handle, of the
        subscriber)``) and live until the subscription stops, so a busy subscription pays
        no task spawn or dispatcher hop per message. One idle worker watches (waits on
        the subscription, or for a free slot when all are taken); the others park until a
        worker that takes a message recruits them (see :meth:`_recruit_after_take`).

        Without a ``handler_timeout`` the handler runs inline here (the fast path: no
        coroutine, cancel scope or method call of ours per message beyond the handler
        and the histogram); otherwise through :meth:`_handle_one`. Both count exactly
        the same outcomes.
        """
        subscriber = self._subscriber
        sub_core = subscriber._core
        core = self._core
        config = subscriber._config
        slot_freed = subscriber._slot_freed
        handler = self._handler
        buffer = sub._buffer
        take = sub._take
        running = _State.RUNNING
        inline = config.handler_timeout is None
        durations = core.durations if config.metrics else None
        clock = time.perf_counter_ns
        fresh = True  # started or woken to help, and has not taken a message since
        since_yield = 0
        try:
            while True:
                if core.state is not running:
                    return
                # == sub_core.free_slots(core), inlined
                free = sub_core.max_workers - sub_core.in_flight - sub_core.reserved
                own = core.max_workers - core.in_flight - core.reserved
                if own < free:
                    free = own
                if free > 0 and buffer:
                    msg = take()
                    # == sub_core.taken(core), inlined (free > 0 was checked above)
                    core.in_flight += 1
                    sub_core.in_flight += 1
                    if self._awake == core.in_flight and (
                        self._idle or self._n_workers < self._limit
                    ):
                        self._recruit_after_take(sub, free - 1, fresh)
                    fresh = False
                    if inline:
                        started = clock() if durations is not None else 0
                        try:
                            result = await handler(msg)
                            if result is not None and msg.reply:
                                await msg.respond(result)
                        except Exception as exc:
                            await self._failed(msg, exc, None if durations is None else started)
                        except BaseException:
                            self._finish(Outcome.CANCELLED, None if durations is None else started)
                            raise
                        else:
                            # == sub_core.finished(core, PROCESSED, ...), inlined
                            if durations is not None:
                                durations.record_ns(clock() - started)
                            core.in_flight -= 1
                            sub_core.in_flight -= 1
                            core.processed += 1
                            # Only a subscriber that was full can have waiters this finish
                            # helps: one parked on another handle's own limit (or on ours:
                            # this worker takes the next message itself) gains nothing.
                            if (
                                sub_core.max_workers - sub_core.in_flight - sub_core.reserved <= 1
                                and slot_freed
                            ):
                                slot_freed.unpark_all()
                    else:
                        await self._handle_one(msg)
                    since_yield += 1
                    if since_yield >= _YIELD_EVERY:  # a no-op handler never yields by itself
                        since_yield = 0
                        await trio.lowlevel.checkpoint()
                    continue
                since_yield = 0
                if free <= 0:
                    if not sub.has_waiter and not self._slot_watchers:
                        # Watch for a free slot on behalf of this subscription.
                        self._slot_watchers += 1
                        self._awake -= 1
                        try:
                            await slot_freed.park()
                        finally:
                            self._slot_watchers -= 1
                            self._awake += 1
                        fresh = False
                    else:
                        await self._park_idle()
                        fresh = True
                elif sub.ended:
                    self._wake_run.set()
                    return
                elif not sub.has_waiter:
                    self._awake -= 1
                    self._watching_sub = True
                    try:
                        await sub.wait_nonempty()
                    finally:
                        self._awake += 1
                        self._watching_sub = False
                    fresh = False
                else:
                    await self._park_idle()
                    fresh = True
        finally:
            self._awake -= 1

    def _finish(self, outcome: Outcome, started: int | None) -> None:
        """Count a handler run of the fast path that did not simply return."""
        subscriber = self._subscriber
        subscriber._core.finished(
            self._core,
            outcome,
            None if started is None else (time.perf_counter_ns() - started) * 1e-9,
        )
        lot = subscriber._slot_freed
        if lot:
            lot.unpark_all()

    def _log_failed(self, msg: Msg, exc: Exception) -> None:
        """A handler raised: logged at ERROR, rate-limited per subscription and exception
        type (the first records keep their traceback)."""
        _limited.log(
            logging.ERROR,
            ("failed", id(self), type(exc)),
            "handler for %r failed on message %r: %r",
            self.subject,
            msg.subject,
            exc,
            exc_info=exc,
            extra=self._log_fields(),
        )

    async def _failed(self, msg: Msg, exc: Exception, started: int | None) -> None:
        """The fast path's handler raised ``exc``: log, send the error reply, count."""
        try:
            self._log_failed(msg, exc)
            if msg.reply:
                await self._reply_error(msg, "500", _header_text(exc))
        finally:
            self._finish(Outcome.FAILED, started)

    async def _handle_one(self, msg: Msg) -> None:
        subscriber = self._subscriber
        config = subscriber._config
        timeout = config.handler_timeout
        outcome = Outcome.CANCELLED
        started = time.perf_counter() if config.metrics else None
        try:
            try:
                if timeout is None:
                    result = await self._handler(msg)
                else:
                    with trio.move_on_after(timeout) as scope:
                        result = await self._handler(msg)
                    if scope.cancelled_caught:
                        outcome = Outcome.TIMED_OUT
                        _limited.log(
                            logging.WARNING,
                            ("timed out", id(self)),
                            "handler for %r timed out after %s s on message %r",
                            self.subject,
                            timeout,
                            msg.subject,
                            extra=self._log_fields(),
                        )
                        if msg.reply:
                            await self._reply_error(
                                msg, "504", f"handler timed out after {timeout} s"
                            )
                        return
                if result is not None and msg.reply:
                    await msg.respond(result)
                outcome = Outcome.PROCESSED
            except Exception as exc:
                outcome = Outcome.FAILED
                self._log_failed(msg, exc)
                if msg.reply:
                    await self._reply_error(msg, "500", _header_text(exc))
        finally:
            subscriber._core.finished(
                self._core,
                outcome,
                None if started is None else time.perf_counter() - started,
            )
            lot = subscriber._slot_freed
            if lot:
                lot.unpark_all()

    async def _reply_error(self, msg: Msg, code: str, text: str) -> None:
        try:
            await msg.respond(
                b"", headers={"Nats-Service-Error": text, "Nats-Service-Error-Code": code}
            )
        except Exception as exc:
            _limited.log(
                logging.WARNING,
                ("error reply", id(self)),
                "could not send the error reply for %r: %r",
                msg.subject,
                exc,
                extra=self._log_fields(),
            )

    def _log_fields(self) -> dict[str, object]:
        return conn_fields(self._subscriber._conn, "subscriber", subject=self.subject)

    def _own_key(self, key: Hashable) -> bool:
        """A rate-limited event of this subscription (reported when it stops)."""
        return isinstance(key, tuple) and key[1] == id(self)


_RUNS_HANDLERS = (SubscriptionHandle._handle_one.__code__, SubscriptionHandle._worker.__code__)
"""The frames whose next frame is the handler (the fast path runs it in ``_worker``)."""


class _JsCounts:
    """The :class:`_Source` of a JetStream handle: messages handed to handlers, and the
    ones fetched but never started (naked at once)."""

    __slots__ = ("delivered", "dropped", "pending", "pending_bytes")

    def __init__(self) -> None:
        self.delivered = 0
        self.dropped = 0
        self.pending = 0
        self.pending_bytes = 0


_ACK_CONFIRM_TIMEOUT = 5.0
"""Seconds a worker waits for the server to confirm its ack before freeing the slot."""

_JS_RETRY = 0.25
"""Seconds between two pull requests after one could not be sent (reconnect buffer full)."""


@final
class JetStreamHandle:
    """One running JetStream pull consumer of a :class:`Subscriber`; see
    :meth:`Subscriber.start_jetstream`.

    Attributes:
        stream: the stream.
        consumer: the (durable) consumer.
        ack_policy: how messages are acknowledged around the handler.
        max_workers: this consumer's own limit on concurrent handlers.
        max_batch: the most messages one pull request asks for.
    """

    def __init__(
        self,
        subscriber: Subscriber,
        stream: str,
        consumer: str,
        handler: JsHandler,
        *,
        ack_policy: AckPolicy,
        max_workers: int,
        max_batch: int,
        nak_delay: float | None,
        heartbeat: bool,
        expires: float,
        confirm_acks: bool,
    ) -> None:
        self._subscriber = subscriber
        self._confirm_acks = confirm_acks
        self.stream = stream
        self.consumer = consumer
        self.subject = f"{stream}/{consumer}"
        self.ack_policy = ack_policy
        self.max_workers = max_workers
        self.max_batch = max_batch
        self._nak_delay = nak_delay
        self._heartbeat_on = heartbeat
        self._expires = expires
        self._handler = handler
        self._core = _HandleCore(max_workers)
        self._counts = _JsCounts()
        self._workers: trio.Nursery | None = None
        self._loop_scope = trio.CancelScope()
        self._outstanding = 0  # messages the current pull request may still bring
        self._ack_wait = 30.0
        self._stop_deadline = math.inf
        self._done = trio.Event()
        self._conn: Connection | None = None
        self._psub: PullSubscription | None = None
        self._task_name = f"trionats.jetstream worker {self.subject!r}"
        # Final acks queued by finished handlers, sent by the one acker task in batches
        # (see _acker): (message, payload, outcome). Their slots stay taken until sent
        # (and, with confirm_acks, confirmed).
        self._acks: list[tuple[JsMsg, bytes, Outcome]] = []
        self._acks_lot = ParkingLot()
        self._acks_closed = False
        # Handlers running, with when their message last had an ack or +WPI sent (the
        # one heartbeat task reads it).
        self._running: dict[JsMsg, float] = {}
        # Persistent workers: messages given a slot wait here for a worker (an idle one
        # is woken, or one is started); a task per message cost ~3x more.
        self._ready: deque[JsMsg] = deque()
        self._idle = ParkingLot()
        self._n_workers = 0
        self._no_more = False  # the fetch loop has ended: idle workers exit

    # -- public --------------------------------------------------------------------------
    def stats(self) -> SubscriberStats:
        """A snapshot of this consumer's counters (see :class:`SubscriberStats`).

        ``dropped`` counts messages fetched but never started (naked at once at a stop).
        """
        return self._core.stats(self._subscriber._connection_error())

    @property
    def stopped(self) -> bool:
        """True once the consumer has stopped and none of its handlers runs any more."""
        return self._done.is_set()

    async def stop(self, timeout: float | _Default | None = _DEFAULT) -> None:
        """Stop fetching; returns when none of this consumer's handlers runs any more.

        Stops requesting messages; messages the server already sent for an outstanding
        pull request and never started are naked at once (the server redelivers them
        elsewhere without waiting for ``ack_wait``); in-flight handlers get ``timeout``
        seconds, and each is acknowledged according to its outcome and the ack policy;
        handlers still running then are cancelled and their messages naked. The same
        cancellation rules as :meth:`SubscriptionHandle.stop`.

        Args:
            timeout: grace period in seconds for in-flight handlers (0: cancel them at
                once; None: no deadline of its own). Defaults to the subscriber's
                ``stop_timeout``.
        """
        await _stop_handle(self, timeout)

    def __repr__(self) -> str:
        return (
            f"<trionats.JetStreamHandle {self.subject!r} {self.ack_policy.name} "
            f"{self._core.state.value}>"
        )

    # -- internals -----------------------------------------------------------------------
    def _request_stop(self, deadline: float) -> None:
        self._subscriber._core.stopping(self._core)
        self._stop_deadline = min(self._stop_deadline, deadline)
        if self._psub is not None:
            # UNSUB before any in-flight message is naked: the outstanding pull request
            # must not take a naked message back.
            self._psub._unsub_now()
        self._loop_scope.cancel()
        if self._workers is not None:
            scope = self._workers.cancel_scope
            scope.deadline = min(scope.deadline, deadline)

    def _warn_stuck(self, who: str) -> None:
        log.warning(
            "%s: %d handler(s) of the JetStream consumer %r did not end %.2f s after being "
            "cancelled (shielded from cancellation?): handler %s",
            who,
            self._core.in_flight,
            self.subject,
            _CANCEL_GRACE,
            _callable_name(self._handler),
            extra=self._log_fields(),
        )

    async def _run(
        self,
        conn: Connection,
        timeout: float | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        sub_core = self._subscriber._core
        self._conn = conn
        js = conn.jetstream(timeout=5.0 if timeout is None else timeout)
        try:
            info = await js.consumer_info(self.stream, self.consumer)
            self._ack_wait = info.ack_wait
            async with trio.open_nursery() as side:
                side.start_soon(self._acker, name=f"trionats.jetstream acker {self.subject!r}")
                beats = trio.CancelScope()
                if self._heartbeat_on:
                    side.start_soon(self._heartbeats, beats)
                try:
                    await self._run_workers(js, sub_core, task_status)
                finally:
                    beats.cancel()
                    self._acks_closed = True  # every handler has ended: no more acks
                    self._acks_lot.unpark_all()
        except BaseExceptionGroup as group:
            _errors.reraise_unwrapped(group, 2)
        finally:
            sub_core.stopping(self._core)
            sub_core.stopped(self._core)
            self._subscriber._active.pop(self, None)
            self._done.set()
            _limited.flush(self._own_key)

    async def _run_workers(
        self, js: JetStream, sub_core: _SubscriberCore, task_status: trio.TaskStatus[None]
    ) -> None:
        try:
            async with trio.open_nursery() as workers:
                self._workers = workers
                if self._stop_deadline < math.inf:
                    workers.cancel_scope.deadline = self._stop_deadline
                async with js.pull_subscribe(self.stream, self.consumer) as psub:
                    self._psub = psub
                    sub_core.running(self._core, self._counts)
                    task_status.started()
                    try:
                        with self._loop_scope:
                            await self._fetch_loop(psub, workers)
                    except (_errors.ConnectionClosedError, _errors.SubscriptionClosedError):
                        reason = self._subscriber._connection_error()
                        log.warning(
                            "JetStream consumer %r ended (connection closed%s); finishing "
                            "its in-flight handlers",
                            self.subject,
                            f": {reason}" if reason else "",
                            extra=self._log_fields(),
                        )
                    finally:
                        sub_core.stopping(self._core)
                        with trio.CancelScope(shield=True):
                            await psub._stop_interest()
                            self._settle_buffered(psub)
                            sub_core.unreserve(self._core, self._outstanding)
                            self._outstanding = 0
                            self._counts.dropped += await psub._nak_leftovers()
                        self._no_more = True
                        self._idle.unpark_all()
                # The nursery now waits for in-flight handlers, until the stop deadline.
        finally:
            # Cancelled workers leave the messages they had not started: naked, like a
            # handler cancelled before its first step.
            while self._ready:
                self._queue_ack(self._ready.popleft(), b"-NAK", Outcome.CANCELLED)

    def _settle_buffered(self, psub: PullSubscription) -> None:
        """At a stop: hand buffered messages of the outstanding request to the stash
        (naked with the leftovers); nothing more is started."""
        sub = psub._sub
        while sub.pending:
            item = psub._classify(sub.take_nowait())
            if isinstance(item, JsMsg):
                psub._stash.append(item)

    async def _fetch_loop(self, psub: PullSubscription, workers: trio.Nursery) -> None:
        """Request ``min(free slots, max_batch)`` messages, start each as it arrives.

        A request waits until half the slots this handle can use are free (or none of its
        handlers is running), so that a busy consumer does not pay one pull round trip
        per freed slot: full batches, like a fetch loop of nats-py.
        """
        sub_core = self._subscriber._core
        core = self._core
        slot_freed = self._subscriber._slot_freed
        sub = psub._sub
        low_water = max(1, min(self.max_batch, core.max_workers, sub_core.max_workers) // 2)
        while core.state is _State.RUNNING:
            free = sub_core.free_slots(core)
            if free <= 0 or (free < low_water and core.in_flight > 0):
                await slot_freed.park()
                continue
            n = min(free, self.max_batch)
            sub_core.reserve(core, n)
            self._outstanding = n
            try:
                try:
                    reply = await psub._pull(n, self._expires)
                except _errors.ReconnectBufferFullError:
                    await trio.sleep(_JS_RETRY)
                    continue
                # A request the server lost (it restarted) never ends by itself.
                with trio.move_on_after(self._expires + 1.0):
                    while self._outstanding > 0:
                        msg = await sub.next_msg()
                        item = psub._classify(msg)
                        if isinstance(item, JsMsg):
                            self._dispatch(item, workers)
                            continue
                        status, subject, _ = item
                        if subject == reply and status in ("404", "408", "409"):
                            if status == "409":
                                desc = (msg.headers or {}).get("Description", "")
                                log.warning(
                                    "pull from %r ended: 409 %s",
                                    self.subject,
                                    desc,
                                    extra=self._log_fields(),
                                )
                                if "Deleted" in desc:
                                    return
                            break
            finally:
                sub_core.unreserve(core, self._outstanding)
                self._outstanding = 0

    def _dispatch(self, msg: JsMsg, workers: trio.Nursery) -> None:
        sub_core = self._subscriber._core
        core = self._core
        if self._outstanding > 0:
            self._outstanding -= 1
            sub_core.taken_reserved(core)
        elif sub_core.free_slots(core) > 0:
            sub_core.taken(core)  # a late message of an expired request, and room for it
        else:
            # No slot for it: give it back at once (never buffered past ack_wait).
            self._counts.dropped += 1
            msg._acked = True
            workers.start_soon(self._send, msg, b"-NAK")
            return
        self._counts.delivered += 1
        self._ready.append(msg)
        if self._idle:
            self._idle.unpark()
        else:  # every worker is busy: at most one per message in flight
            self._n_workers += 1
            workers.start_soon(self._worker, name=self._task_name)

    async def _worker(self) -> None:
        """Run handlers for the messages given a slot, one after the other; park when
        there is none; exit once the fetch loop has ended and nothing is left."""
        ready = self._ready
        since_yield = 0
        try:
            while True:
                if not ready:
                    if self._no_more:
                        return
                    await self._idle.park()
                    continue
                await self._work(ready.popleft())
                since_yield += 1
                if since_yield >= _YIELD_EVERY:
                    since_yield = 0
                    await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._n_workers -= 1

    async def _send(self, msg: JsMsg, payload: bytes) -> None:
        """Queue an ack (shielded, bounded): the outcome of a handler is never lost to a
        cancel; a failure is logged (the server redelivers after ``ack_wait``)."""
        conn = self._conn
        assert conn is not None
        with trio.CancelScope(shield=True, deadline=trio.current_time() + _ACK_CONFIRM_TIMEOUT):
            try:
                if self._confirm_acks:
                    await conn.request(msg.reply, payload, timeout=_ACK_CONFIRM_TIMEOUT)
                else:
                    await conn._publish(msg.reply, payload, "", None)
            except _errors.TrionatsError as exc:
                _limited.log(
                    logging.WARNING,
                    ("ack", id(self)),
                    "could not send %r for %r: %r",
                    payload,
                    msg,
                    exc,
                    extra=self._log_fields(),
                )

    async def _acker(self) -> None:
        """Send the final acks of finished handlers, in batches, then free their slots.

        Shielded (each batch bounded by ``_ACK_CONFIRM_TIMEOUT``): an outcome is never
        lost to a cancel. With ``confirm_acks``, each batch's last ack is a request: the
        server processes one connection's acks in order, so its confirmation confirms the
        whole batch, and the batch's slots are freed only then (``num_ack_pending`` stays
        within ``max_workers``). Acks finished meanwhile wait for the next batch: one
        confirmation round trip in flight at a time, batches as large as the load.
        """
        conn = self._conn
        assert conn is not None
        sub_core = self._subscriber._core
        core = self._core
        confirm = self._confirm_acks
        with trio.CancelScope(shield=True):
            while True:
                batch = self._acks
                if not batch:
                    if self._acks_closed:
                        return
                    await self._acks_lot.park()
                    continue
                self._acks = []
                with trio.move_on_after(_ACK_CONFIRM_TIMEOUT) as scope:
                    try:
                        last = len(batch) - 1
                        for i, (msg, payload, _) in enumerate(batch):
                            if confirm and i == last:
                                await conn.request(msg.reply, payload, timeout=_ACK_CONFIRM_TIMEOUT)
                            else:
                                await conn._publish(msg.reply, payload, "", None)
                    except _errors.TrionatsError as exc:
                        _limited.log(
                            logging.WARNING,
                            ("ack", id(self)),
                            "could not send the acks of %d message(s) of %r: %r",
                            len(batch),
                            self.subject,
                            exc,
                            extra=self._log_fields(),
                        )
                if scope.cancelled_caught:
                    _limited.log(
                        logging.WARNING,
                        ("ack", id(self)),
                        "the acks of %d message(s) of %r were not %s within %s s",
                        len(batch),
                        self.subject,
                        "confirmed" if confirm else "sent",
                        _ACK_CONFIRM_TIMEOUT,
                        extra=self._log_fields(),
                    )
                for _, _, outcome in batch:
                    sub_core.finished(core, outcome)
                lot = self._subscriber._slot_freed
                if lot:
                    lot.unpark_all()

    async def _heartbeats(self, scope: trio.CancelScope) -> None:
        """``+WPI`` for each handler still running a quarter to half an ``ack_wait`` after
        its message came (or after its last ``+WPI``): one task for all handlers."""
        running = self._running
        tick = max(self._ack_wait / 4, 0.005)
        with scope:
            while True:
                await trio.sleep(tick)
                now = trio.current_time()
                for msg, since in list(running.items()):
                    if now - since < tick or msg._acked or msg not in running:
                        continue
                    running[msg] = now
                    try:
                        await msg.in_progress()
                    except _errors.TrionatsError as exc:
                        if not msg._acked:
                            _limited.log(
                                logging.WARNING,
                                ("in_progress", id(self)),
                                "in_progress for %r failed: %r",
                                msg,
                                exc,
                                extra=self._log_fields(),
                            )

    def _log_fields(self) -> dict[str, object]:
        return conn_fields(self._subscriber._conn, "subscriber", subject=self.subject)

    def _own_key(self, key: Hashable) -> bool:
        """A rate-limited event of this subscription (reported when it stops)."""
        return isinstance(key, tuple) and key[1] == id(self)

    async def _work(self, msg: JsMsg) -> None:
        subscriber = self._subscriber
        timeout = subscriber._config.handler_timeout
        policy = self.ack_policy
        outcome = Outcome.CANCELLED
        running = self._running
        heartbeat = self._heartbeat_on
        started = time.perf_counter() if subscriber._config.metrics else None
        try:
            try:
                if policy is AckPolicy.ACK_FIRST:
                    msg._acked = True
                    await self._send(msg, b"+ACK")
                if heartbeat:
                    running[msg] = trio.current_time()
                try:
                    if timeout is None:
                        await self._handler(msg)
                    else:
                        with trio.move_on_after(timeout) as scope:
                            await self._handler(msg)
                        if scope.cancelled_caught:
                            outcome = Outcome.TIMED_OUT
                            _limited.log(
                                logging.WARNING,
                                ("timed out", id(self)),
                                "handler for %r timed out after %s s",
                                self.subject,
                                timeout,
                                extra=self._log_fields(),
                            )
                            return
                finally:
                    if heartbeat:
                        del running[msg]
                outcome = Outcome.PROCESSED
            except Exception as exc:
                outcome = Outcome.FAILED
                _limited.log(
                    logging.ERROR,
                    ("failed", id(self), type(exc)),
                    "handler for %r failed on %r: %r",
                    self.subject,
                    msg,
                    exc,
                    exc_info=exc,
                    extra=self._log_fields(),
                )
        finally:
            if started is not None:
                self._core.durations.record(time.perf_counter() - started)
            payload = None
            if not msg._acked:
                if outcome is Outcome.PROCESSED:
                    if policy is not AckPolicy.MANUAL:
                        payload = b"+ACK"
                elif outcome is Outcome.FAILED:
                    if policy is AckPolicy.NAK_ON_ERROR:
                        delay = self._nak_delay
                        payload = (
                            b"-NAK" if delay is None else b'-NAK {"delay": %d}' % int(delay * 1e9)
                        )
                    elif policy is AckPolicy.TERM_ON_ERROR:
                        payload = b"+TERM"
                else:  # cancelled or timed out: not processed, redeliver at once
                    payload = b"-NAK"
            if payload is None:
                subscriber._core.finished(self._core, outcome)
                lot = subscriber._slot_freed
                if lot:
                    lot.unpark_all()
            else:
                self._queue_ack(msg, payload, outcome)

    def _queue_ack(self, msg: JsMsg, payload: bytes, outcome: Outcome) -> None:
        """The acker sends it and frees the slot (no await: a cancel cannot lose it)."""
        msg._acked = True
        self._acks.append((msg, payload, outcome))
        if self._acks_lot:
            self._acks_lot.unpark()


@final
class Subscriber:
    """Runs handlers for subscriptions with bounded concurrency. Use :func:`open_subscriber`."""

    def __init__(self, conn: Connection, config: SubscriberConfig, nursery: trio.Nursery) -> None:
        self._conn = conn
        self._config = config
        self._nursery = nursery
        self._core = _SubscriberCore(config.max_workers)
        self._slot_freed = ParkingLot()
        # insertion-ordered set
        self._active: dict[SubscriptionHandle | JetStreamHandle | BatchHandle, None] = {}
        self._closing = False
        # Once open_subscriber has exited, the connection may be gone (a pooled
        # connection's lease ended with the block): stats() reports this snapshot.
        self._ended = False
        self._final_error: str | None = None

    @property
    def config(self) -> SubscriberConfig:
        """The configuration this subscriber runs with."""
        return self._config

    async def start(
        self,
        subject: str,
        handler: Handler,
        *,
        queue: str | None = None,
        max_workers: int | None = None,
        timeout: float | None = _DEFAULT_START_TIMEOUT,
    ) -> SubscriptionHandle:
        """Subscribe to ``subject`` and run ``handler`` for each message.

        Returns once the subscription is registered on the server: a message published
        after this returns is received. The subscription runs in the subscriber's nursery
        until ``handle.stop()`` or the end of the ``open_subscriber`` block.

        A handler is ``async def handler(msg) -> bytes | None``: an ``async def``
        function, a bound ``async def`` method, a ``functools.partial`` of one, or an
        object whose ``__call__`` is ``async def``. Anything else is a ``TypeError`` here,
        including a plain function that returns a coroutine (a decorator that is not
        itself ``async def``, say): mark such a wrapper with
        ``inspect.markcoroutinefunction`` (Python 3.12+) or make it ``async def``. When
        the message is a request and the handler returns bytes, they are the reply. A
        handler that raises is counted as failed and logged, and a request gets an empty
        reply with the headers ``Nats-Service-Error`` and ``Nats-Service-Error-Code: 500``
        (504 for a timeout); the subscription and the other handlers carry on.

        Args:
            subject: the subject, wildcards allowed.
            handler: the async function to run per message.
            queue: a queue group name: each message goes to one member of the group.
            max_workers: a limit on concurrent handlers for this subscription alone (the
                subscriber's ``max_workers`` applies too).
            timeout: seconds to wait for the server to confirm the subscription (a frozen
                server never does); None: no deadline of its own, only the enclosing
                cancel scopes.

        Returns:
            The handle: ``stop()``, ``stats()``, ``subject``, ``queue``.

        Raises:
            TypeError: the handler is not an async function, or an argument has the wrong
                type.
            ValueError: bad subject, queue, max_workers or timeout.
            trionats.TimeoutError: the server did not confirm the subscription in time
                (nothing is left subscribed).
            trionats.SubscriptionClosedError: the subscriber is shutting down.
            trionats.ConnectionClosedError: the connection is closed.

        Example::

            async def handle_order(msg):
                await process(msg.data)

            handle = await subscriber.start("orders.*", handle_order, queue="workers")
        """
        _check_handler(handler)
        check_subscribe_subject(subject)
        check_queue(queue)
        if max_workers is None:
            max_workers = self._config.max_workers
        else:
            max_workers = check_int("max_workers", max_workers, minimum=1)
        timeout = check_seconds("timeout", timeout, allow_none=True)
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closing:
            raise _errors.SubscriptionClosedError("the subscriber is shutting down")
        tracer = self._conn._tracer
        if tracer is not None:  # OpenTelemetry: a "process {subject}" span per message
            handler = tracer.wrap_handler(handler, subject, queue=queue)
        handle = SubscriptionHandle(self, subject, handler, queue, max_workers)
        self._core.add(handle._core)
        self._active[handle] = None
        try:
            await self._nursery.start(handle._run, self._conn, timeout)
        except BaseException:
            self._abandon(handle)
            raise
        return handle

    async def start_jetstream(
        self,
        stream: str,
        consumer: str,
        handler: JsHandler,
        *,
        ack_policy: AckPolicy = AckPolicy.ACK_AFTER,
        max_workers: int | None = None,
        max_batch: int = 256,
        nak_delay: float | None = None,
        heartbeat: bool = True,
        expires: float = 5.0,
        confirm_acks: bool = True,
        timeout: float | None = _DEFAULT_START_TIMEOUT,
    ) -> JetStreamHandle:
        """Run ``handler`` for each message of the pull consumer ``consumer`` of ``stream``.

        The consumer must exist (``js.add_consumer``). Slot-driven: each pull request asks
        for ``min(free worker slots, max_batch)`` messages, and those slots stay reserved
        until the messages come or the request ends, so the server never hands over more
        messages than can start at once (no slack: ``num_ack_pending`` stays within
        ``max_workers``) and no message sits in a buffer past ``ack_wait``. One pull
        request is outstanding at a time; it expires after ``expires`` seconds.

        A request waits until half the slots it may use are free (or no handler of it
        runs), so a busy consumer asks for full batches rather than one message per freed
        slot.

        Each message is acknowledged according to ``ack_policy`` (see
        :class:`trionats.AckPolicy`); a handler that is cancelled or times out has its
        message naked at once. The final acks are sent by one task in batches (a cancel
        never loses one); with ``confirm_acks=True`` each batch's last ack is a request
        whose confirmation (the server processes a connection's acks in order) confirms
        the whole batch, and the batch's slots are freed only then: ``num_ack_pending``
        never exceeds ``max_workers``, at the cost of holding each slot one round trip
        longer. ``confirm_acks=False`` frees a slot as soon as its ack is queued: a
        little faster, with a slack of at most ``max_workers`` more messages pending on
        the server. While a handler runs, ``+WPI`` (in progress) is sent every quarter to
        half ``ack_wait`` (one task for all handlers; ``heartbeat=False`` turns that off),
        so a long handler keeps its message; the heartbeats stop when the handler ends.

        Args:
            stream: the stream.
            consumer: a pull consumer of that stream (durable or ephemeral, by name).
            handler: ``async def handler(msg: JsMsg)``; its return value is ignored.
            ack_policy: when and how messages are acknowledged.
            max_workers: a limit on concurrent handlers for this consumer alone (the
                subscriber's ``max_workers`` applies too).
            max_batch: the most messages one pull request asks for.
            nak_delay: seconds the server waits before redelivering a message naked by
                ``NAK_ON_ERROR`` (None: at once, or per the consumer's backoff).
            heartbeat: send in-progress acks for long handlers.
            confirm_acks: free a slot only once the server confirmed its final ack
                (confirmed in batches, see above).
            expires: seconds a pull request waits on the server for messages.
            timeout: seconds for the start (consumer lookup, inbox subscription); None:
                no deadline of its own.

        Returns:
            The handle: ``stop()``, ``stats()``, ``stream``, ``consumer``.

        Raises:
            TypeError / ValueError: a bad argument (the message names it).
            trionats.JetStreamError: no such stream or consumer.
            trionats.SubscriptionClosedError: the subscriber is shutting down.

        Example::

            async def handle(msg):
                await process(msg.data)

            await sub.start_jetstream("ORDERS", "workers", handle,
                                      ack_policy=trionats.AckPolicy.NAK_ON_ERROR)
        """
        _check_handler(handler)
        _check_name("stream", stream)
        _check_name("consumer", consumer)
        if not isinstance(ack_policy, AckPolicy):
            raise TypeError(
                f"ack_policy must be a trionats.AckPolicy, got {type(ack_policy).__name__}: "
                f"{ack_policy!r}"
            )
        if max_workers is None:
            max_workers = self._config.max_workers
        else:
            max_workers = check_int("max_workers", max_workers, minimum=1)
        check_int("max_batch", max_batch, minimum=1)
        nak_delay = check_seconds("nak_delay", nak_delay, allow_none=True, allow_zero=True)
        check_bool("heartbeat", heartbeat)
        check_bool("confirm_acks", confirm_acks)
        expires = check_seconds("expires", expires)
        if expires < 0.01:
            raise ValueError(f"expires must be >= 0.01 s, got {expires!r}")
        timeout = check_seconds("timeout", timeout, allow_none=True)
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closing:
            raise _errors.SubscriptionClosedError("the subscriber is shutting down")
        tracer = self._conn._tracer
        if tracer is not None:  # OpenTelemetry: a "process {stream}/{consumer}" span
            handler = tracer.wrap_handler(handler, f"{stream}/{consumer}", subscription=consumer)
        handle = JetStreamHandle(
            self,
            stream,
            consumer,
            handler,
            ack_policy=ack_policy,
            max_workers=max_workers,
            max_batch=max_batch,
            nak_delay=nak_delay,
            heartbeat=heartbeat,
            expires=expires,
            confirm_acks=confirm_acks,
        )
        self._core.add(handle._core)
        self._active[handle] = None
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                await self._nursery.start(handle._run, self._conn, timeout)
        except trio.TooSlowError:
            self._abandon(handle)
            raise _errors.TimeoutError(
                f"start_jetstream({stream!r}, {consumer!r}) did not complete within {timeout} s"
            ) from None
        except BaseException:
            self._abandon(handle)
            raise
        return handle

    async def start_batch(
        self,
        subject: str,
        handler: BatchHandler,
        *,
        queue: str | None = None,
        max_batch: int = 100,
        max_wait: float = 0.05,
        max_workers: int | None = None,
        timeout: float | None = _DEFAULT_START_TIMEOUT,
    ) -> BatchHandle:
        """Subscribe to ``subject`` and run ``handler`` on lists of messages.

        A batch is handed over when ``max_batch`` messages are waiting, or ``max_wait``
        seconds after its first message was seen, whichever comes first; it never holds
        more messages than there are free worker slots: **a batch of n messages takes n
        slots** while its handler runs, so ``max_workers`` (the handle's and the
        subscriber's) bounds messages in flight, as for :meth:`start`. Several batches of
        one subscription can run at once, in separate tasks.

        Accounting is per message, with the same rules as :meth:`start`: each message of
        a run counts as processed (the handler returned), failed (it raised), timed out
        (``handler_timeout``, per run) or cancelled (a stop's grace period ran out);
        ``handler_duration`` records one value per run. A failed or timed-out run answers
        every request in it with an empty reply carrying ``Nats-Service-Error`` and
        ``Nats-Service-Error-Code`` (500, 504); otherwise the handler answers requests
        itself (``await msg.respond(...)``): its return value is ignored. ``stop()`` (and
        leaving ``open_subscriber``) stops collecting, counts buffered messages as
        dropped (a batch is never half handed over), and lets running batches finish
        within the grace period.

        Args:
            subject: the subject, wildcards allowed.
            handler: ``async def handler(msgs: list[Msg]) -> None``.
            queue: a queue group name.
            max_batch: the most messages one run gets (>= 1).
            max_wait: seconds a batch waits for more messages after its first one (>= 0;
                0: hand over at once whatever is buffered).
            max_workers: this subscription's own limit on messages in flight.
            timeout: seconds to wait for the server to confirm the subscription.

        Returns:
            The handle: ``stop()``, ``stats()``, ``subject``, ``queue``.

        Raises:
            TypeError / ValueError: a bad argument (the message names it).
            trionats.TimeoutError: the server did not confirm the subscription in time.
            trionats.SubscriptionClosedError: the subscriber is shutting down.
            trionats.ConnectionClosedError: the connection is closed.

        Example::

            async def store(msgs):
                await db.insert_many([m.data for m in msgs])

            await subscriber.start_batch("events.>", store, max_batch=500, max_wait=0.1)
        """
        from ._subscriber_batch import BatchHandle

        _check_handler(handler)
        check_subscribe_subject(subject)
        check_queue(queue)
        check_int("max_batch", max_batch, minimum=1)
        max_wait = check_seconds("max_wait", max_wait, allow_zero=True)
        if max_workers is None:
            max_workers = self._config.max_workers
        else:
            max_workers = check_int("max_workers", max_workers, minimum=1)
        timeout = check_seconds("timeout", timeout, allow_none=True)
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closing:
            raise _errors.SubscriptionClosedError("the subscriber is shutting down")
        handle = BatchHandle(
            self,
            subject,
            handler,
            queue,
            max_workers=max_workers,
            max_batch=max_batch,
            max_wait=max_wait,
        )
        self._core.add(handle._core)
        self._active[handle] = None
        try:
            await self._nursery.start(handle._run, self._conn, timeout)
        except BaseException:
            self._abandon(handle)
            raise
        return handle

    def _abandon(self, handle: SubscriptionHandle | JetStreamHandle | BatchHandle) -> None:
        """A handle whose start failed: counted as stopped, forgotten, its waiters woken."""
        self._core.stopping(handle._core)
        self._core.stopped(handle._core)
        self._active.pop(handle, None)
        handle._done.set()

    def active(self) -> list[SubscriptionHandle | JetStreamHandle | BatchHandle]:
        """The subscriptions that are running (started, not yet stopped), oldest first."""
        return [h for h in self._active if h._core.state is _State.RUNNING]

    def stats(self) -> SubscriberStats:
        """A snapshot of the counters over all subscriptions, including stopped ones."""
        return self._core.stats(self._connection_error())

    def _connection_error(self) -> str | None:
        if self._ended:
            return self._final_error
        error = self._conn.last_error
        return None if error is None else redact(str(error) or type(error).__name__)

    async def _stop_all(self, timeout: float | None) -> None:
        """Stop every handle (``timeout``: grace period; None: no deadline of its own).

        Returns at most ``_CANCEL_GRACE`` after the handlers were cancelled, having logged
        the ones that did not end; the nursery of ``open_subscriber`` then waits for them.
        """
        self._closing = True
        handles = list(self._active)
        own = math.inf if timeout is None else trio.current_time() + timeout
        deadline = min(own, trio.current_effective_deadline())
        for h in handles:
            h._request_stop(deadline)
        try:
            with trio.move_on_at(deadline + _CANCEL_GRACE):
                for h in handles:
                    await h._done.wait()
        except trio.Cancelled:
            for h in handles:
                h._request_stop(-math.inf)
            with trio.CancelScope(shield=True, deadline=trio.current_time() + _CANCEL_GRACE):
                for h in handles:
                    await h._done.wait()
            self._warn_stuck(handles)
            raise
        self._warn_stuck(handles)

    @staticmethod
    def _warn_stuck(handles: list[SubscriptionHandle | JetStreamHandle | BatchHandle]) -> None:
        for h in handles:
            if not h._done.is_set():
                h._warn_stuck("leaving open_subscriber")

    def __repr__(self) -> str:
        return f"<trionats.Subscriber active={len(self.active())} {self._core.in_flight} in flight>"


@asynccontextmanager
async def open_subscriber(
    nc_or_pool: Connection | Pool[Connection], config: SubscriberConfig | None = None
) -> AsyncIterator[Subscriber]:
    """Run concurrent message handlers for the duration of the block.

    At most ``config.max_workers`` handlers run at once; messages are taken from a
    subscription only as fast as worker slots free up, the rest wait in the subscription's
    bounded buffer, and what does not fit is dropped and counted. Leaving the block stops
    every subscription (see :meth:`SubscriptionHandle.stop`) with ``config.stop_timeout`` as
    the grace period; an exception or a cancel does the same with the time that is left.
    A handler shielded from cancellation that outlives the grace period is logged (WARNING)
    and waited for: the block does not end while one of its handlers still runs.

    An exception raised in the block comes out as it was raised (an ``ExceptionGroup`` of
    your own stays intact); only the level the subscriber's own nursery adds is removed.

    Given a pool, one connection is borrowed (``pool.borrow(long_lived=True)``, its default
    timeout) for the lifetime of the block and returned when every subscription has
    stopped; as a long-lived lease it is never reported or cancelled as a leak.

    Example::

        async with trionats.open_connection(url) as nc:
            async with trionats.open_subscriber(nc, SubscriberConfig(max_workers=8)) as sub:
                await sub.start("orders.*", handle_order, queue="workers")
                await trio.sleep_forever()

    Args:
        nc_or_pool: the connection to subscribe on, or a pool to borrow one from.
        config: limits and timeouts; the defaults of :class:`SubscriberConfig` if None.

    Raises:
        TypeError: ``config`` is not a SubscriberConfig, or ``nc_or_pool`` is neither a
            Connection nor a Pool.
        trionats.PoolTimeoutError: no connection could be borrowed from the pool.
    """
    from ._connection import Connection
    from ._pool import Pool

    if config is None:
        config = SubscriberConfig()
    elif not isinstance(config, SubscriberConfig):
        raise TypeError(f"config must be a SubscriberConfig, got {type(config).__name__}")
    if isinstance(nc_or_pool, Pool):
        async with (
            nc_or_pool.borrow(long_lived=True) as nc,
            _open_subscriber(nc, config) as subscriber,
        ):
            yield subscriber
    elif isinstance(nc_or_pool, Connection):
        async with _open_subscriber(nc_or_pool, config) as subscriber:
            yield subscriber
    else:
        raise TypeError(
            f"open_subscriber needs a Connection or a Pool, got {type(nc_or_pool).__name__}"
        )


@asynccontextmanager
async def _open_subscriber(conn: Connection, config: SubscriberConfig) -> AsyncIterator[Subscriber]:
    try:
        async with trio.open_nursery() as nursery:
            subscriber = Subscriber(conn, config, nursery)
            try:
                yield subscriber
            finally:
                await subscriber._stop_all(config.stop_timeout)
                subscriber._final_error = subscriber._connection_error()
                subscriber._ended = True
    except BaseExceptionGroup as group:
        # Only the level our nursery added: a group the block raised comes out intact.
        _errors.reraise_unwrapped(group, 1)
