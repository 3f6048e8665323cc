"""One subscription's messages, as an async iterator (the read loop feeds it directly)."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, final

import trio
from trio.lowlevel import Abort, checkpoint_if_cancelled, current_task, reschedule

from . import _errors
from ._events import ConnectionEvent, EventKind

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._connection import Connection
    from ._msg import Msg

__all__ = ["DEFAULT_PENDING_BYTES", "DEFAULT_PENDING_MSGS", "YIELD_EVERY", "Subscription"]

YIELD_EVERY = 256
"""Hot-path calls between two full yields to the Trio scheduler."""

DEFAULT_PENDING_MSGS = 128 * 1024
DEFAULT_PENDING_BYTES = 256 * 1024 * 1024


@final
class Subscription:
    """Messages of one subscription, as an async iterator.

    Created by ``async with nc.subscribe(...) as sub``. It is also the nats-py
    subscription's pending queue: the read loop appends messages here synchronously,
    bounded by ``max_pending_msgs`` / ``max_pending_bytes``; beyond them a message is
    dropped and counted (``dropped``), and one SLOW_CONSUMER event is emitted per
    dropping episode: from the first drop until the consumer has taken every buffered
    message (a consumer hovering at its limit reports once, not once per message).
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
        # Set once the consumer is finished: it came back for more after the last message
        # of an ended subscription, or the subscribe block exited (drain waits for it).
        self._finished_event: trio.Event | None = None
        self._is_finished = False
        self._nats_sub: Any = None
        self._write_pending: Callable[[], object] | None = getattr(conn, "_write_pending", None)
        self.delivered = 0
        self.dropped = 0

    # -- producer side: called synchronously by nats-py's read loop -------------------
    # put_nowait, qsize and empty are nats-py's pending-queue protocol, not public API:
    # nats-py calls them by these names on the object installed as its pending queue,
    # so they cannot be renamed without an indirection on every delivered message.
    def put_nowait(self, msg: Msg) -> None:
        """Not public API: nats-py's read loop hands a message over (drops when full)."""
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
        """Not public API (nats-py's pending-queue protocol): use :attr:`pending`."""
        return len(self._buffer)

    def empty(self) -> bool:
        """Not public API (nats-py's pending-queue protocol): use :attr:`pending`."""
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
        if not self._buffer:
            # Caught up: the dropping episode ends only once every buffered message is
            # taken, so a consumer hovering at its limit reports once, not per message.
            self._dropping = False
        return msg

    async def _wait(self) -> None:
        if self._waiter is not None:
            raise trio.BusyResourceError("another task is already receiving from this subscription")
        if self._write_pending is not None:
            # About to park: what the connection still buffers (a reply just sent) is
            # written now rather than one scheduling round later, by the flusher.
            self._write_pending()
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
                self._finished()  # came back for more after the last message
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
                self._finished()  # came back for more after the last message
                if self._closed_error is not None:
                    raise self._closed_error
                return []
        await self._yield_sometimes()
        n = len(self._buffer) if max_msgs is None else min(max_msgs, len(self._buffer))
        return [self._take() for _ in range(n)]

    def _finished(self) -> None:
        """The consumer will take nothing more: a drain need not wait for it."""
        self._is_finished = True
        if self._finished_event is not None:
            self._finished_event.set()

    async def _wait_finished(self) -> None:
        if self._is_finished:
            await trio.lowlevel.checkpoint()
            return
        if self._finished_event is None:
            self._finished_event = trio.Event()
        await self._finished_event.wait()

    async def unsubscribe(self) -> None:
        """Remove interest now; buffered messages are still delivered, then iteration ends."""
        await checkpoint_if_cancelled()
        self._conn._unsubscribe_nowait(self)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def __repr__(self) -> str:
        return f"<Subscription {self.subject!r} queue={self.queue!r} pending={self.pending}>"
