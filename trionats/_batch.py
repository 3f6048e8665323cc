"""The batch publisher: many publishes, one flush (a PING/PONG round trip) per batch.

``async with open_batch_publisher(nc_or_pool) as bp: await bp.publish(subject, data)``.
A publish is *accepted* into the current batch (validated first, so a bad message fails
the ``publish`` call, never the flush); a flusher task in the publisher's own nursery hands
a batch to the connection when it holds ``max_batch`` messages or ``max_delay`` seconds
after its first message, then waits for the server's PONG: that is when its messages count
as *sent*. Accounting, at every instant::

    accepted == sent + lost + pending

where ``lost`` counts accepted messages that a failure kept from being confirmed (the
error says how many, and every later call raises it).
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, final

import trio
from trio.lowlevel import ParkingLot, checkpoint_if_cancelled

from . import _errors
from ._metrics import EMPTY, Histogram, LatencySnapshot
from ._subscription import YIELD_EVERY
from ._validate import (
    _PUBLISH_OK,
    check_data,
    check_headers,
    check_int,
    check_publish_subject,
    check_seconds,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ._connection import Connection
    from ._pool import Pool

__all__ = ["BatchPublishError", "BatchPublisher", "BatchPublisherStats", "open_batch_publisher"]

log = logging.getLogger("trionats.batch")

_Item = tuple[str, Any, str, "dict[str, str] | None"]


class BatchPublishError(_errors.TrionatsError):
    """A batch could not be confirmed: the server never acknowledged it.

    Raised by every :meth:`BatchPublisher.publish` after the failure and when the
    publisher's block exits. ``__cause__`` is the underlying error (a closed connection,
    a flush timeout...).

    Attributes:
        lost: accepted messages not confirmed sent, at the time of the error (the failed
            batch, plus what was still waiting in the next one). Some of the failed batch
            may have reached the server: "lost" means "not confirmed". The final count is
            ``bp.stats().lost``.
    """

    def __init__(self, message: str, *, lost: int) -> None:
        super().__init__(message)
        self.lost = lost


@final
@dataclass(frozen=True, slots=True)
class BatchPublisherStats:
    """A snapshot of a batch publisher's counters.

    At every instant ``accepted == sent + lost + pending``.

    Attributes:
        accepted: ``publish`` calls that returned (messages taken into a batch).
        sent: messages confirmed: their batch's flush (PING/PONG) completed.
        lost: accepted messages that were not confirmed because a batch failed (see
            :class:`BatchPublishError`).
        pending: accepted messages not yet confirmed (buffered, or in the batch being
            flushed).
        batches: batches confirmed.
        full_batches: the part of ``batches`` flushed because they reached ``max_batch``
            (the rest were flushed by ``max_delay`` or at the exit).
        flush_duration: how long each batch took from hand-over to the PONG.
    """

    accepted: int
    sent: int
    lost: int
    pending: int
    batches: int
    full_batches: int
    flush_duration: LatencySnapshot = EMPTY


@final
class BatchPublisher:
    """Groups publishes into batches, one flush per batch. Use :func:`open_batch_publisher`.

    Attributes:
        max_batch: messages per batch (also the size of the buffer ``publish`` waits on).
        max_delay: seconds a batch waits for more messages after its first one.
    """

    def __init__(
        self, conn: Connection, max_batch: int, max_delay: float, flush_timeout: float
    ) -> None:
        self._conn = conn
        # max_payload as last read: a message over it is checked against the live value
        # (it changes only when a reconnect lands on another server)
        self._limit = conn.max_payload
        self.max_batch = max_batch
        self.max_delay = max_delay
        self._flush_timeout = flush_timeout
        self._buffer: list[_Item] = []
        self._first_at = 0.0  # trio clock, when the buffered batch got its first message
        self._in_flight = 0  # messages of the batch being flushed
        self._flusher_lot = ParkingLot()  # the flusher waits here for messages
        self._room = ParkingLot()  # publishers wait here while the buffer is full
        self._closing = False
        self._ended = False
        self._error: BatchPublishError | None = None
        self._since_yield = 0
        self._accepted = 0
        self._sent = 0
        self._lost = 0
        self._batches = 0
        self._full_batches = 0
        self._durations = Histogram()

    # -- public --------------------------------------------------------------------------
    async def publish(
        self,
        subject: str,
        data: bytes = b"",
        *,
        reply: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Accept ``data`` on ``subject`` into the current batch.

        Returns once the message is *accepted*: validated and buffered; its batch is
        flushed by size, by delay or at the end of the block. While ``max_batch``
        messages already wait (the previous batch is still being flushed), the call waits
        for room: that is the backpressure.

        Cancellation: a publish that raises ``Cancelled`` accepted nothing (it was
        waiting for room); one that returns accepted its message, which is then sent or
        reported (:class:`BatchPublishError`), never dropped silently.

        Raises:
            ValueError: bad subject or reply; headers and data together over the
                connection's ``max_payload`` (here, not at the flush).
            TypeError: data is not bytes-like, headers not ``dict[str, str]``.
            BatchPublishError: an earlier batch failed; nothing is accepted any more.
            trionats.TrionatsError: the publisher's block has ended.
        """
        await checkpoint_if_cancelled()
        if subject not in _PUBLISH_OK:
            check_publish_subject(subject)
        if type(data) is not bytes:
            # A bytearray or memoryview is copied: the message is sent later, and the
            # caller may reuse its buffer once publish has returned.
            data = bytes(check_data(data))
        if reply is not None:
            check_publish_subject(reply, "reply", cache=False)
        size = len(data)
        if headers is not None:
            check_headers(headers)
            headers = dict(headers)  # as accepted, whatever the caller does with it later
            from ._bridge import encode_headers

            size += len(encode_headers(headers))
        limit = self._limit
        if size > limit and size > (limit := self._conn.max_payload):
            raise ValueError(
                f"message of {size} bytes (headers included) exceeds the server's "
                f"max_payload of {limit} bytes"
            )
        buffer = self._buffer
        while True:
            if self._error is not None or self._closing:
                self._check_usable()
            if len(buffer) < self.max_batch:
                break
            await self._room.park()  # cancellable: nothing accepted yet
            buffer = self._buffer
        buffer.append((subject, data, reply or "", headers))
        self._accepted += 1
        n = len(buffer)
        if n == 1:
            self._first_at = trio.current_time()
            if self._flusher_lot:
                self._flusher_lot.unpark_all()
        elif n >= self.max_batch and self._flusher_lot:
            self._flusher_lot.unpark_all()
        self._since_yield += 1
        if self._since_yield >= YIELD_EVERY:
            self._since_yield = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    def stats(self) -> BatchPublisherStats:
        """A snapshot of the counters (see :class:`BatchPublisherStats`)."""
        return BatchPublisherStats(
            accepted=self._accepted,
            sent=self._sent,
            lost=self._lost,
            pending=len(self._buffer) + self._in_flight,
            batches=self._batches,
            full_batches=self._full_batches,
            flush_duration=self._durations.snapshot(),
        )

    @property
    def error(self) -> BatchPublishError | None:
        """The failure that stopped the publisher, or None."""
        return self._error

    def __repr__(self) -> str:
        state = "failed" if self._error else "ended" if self._ended else "open"
        return (
            f"<trionats.BatchPublisher max_batch={self.max_batch} "
            f"max_delay={self.max_delay} {state} pending={len(self._buffer) + self._in_flight}>"
        )

    # -- internals -----------------------------------------------------------------------
    def _check_usable(self) -> None:
        error = self._error
        if error is not None:  # a fresh exception per call: tracebacks do not pile up
            again = BatchPublishError(str(error), lost=error.lost)
            again.__cause__ = error.__cause__
            raise again
        if self._closing:
            raise _errors.TrionatsError("the batch publisher's block has ended")

    async def _wait_for_batch(self) -> None:
        """Return when the buffered batch is due: full, ``max_delay`` after its first
        message, or the block is ending."""
        lot = self._flusher_lot
        while not self._buffer and not self._closing:
            await lot.park()
        if self._closing or len(self._buffer) >= self.max_batch:
            return
        with trio.move_on_at(self._first_at + self.max_delay):
            while len(self._buffer) < self.max_batch and not self._closing:
                await lot.park()

    async def _flusher(self) -> None:
        """Flush batch after batch; at the end (exit or cancel), flush what is left."""
        try:
            while not self._closing:
                await self._wait_for_batch()
                if self._buffer and self._error is None:
                    await self._flush_one()
        finally:
            # The block is ending (normally, by an exception or a cancel): everything
            # accepted goes out, shielded, bounded by flush_timeout per batch.
            self._closing = True
            while self._buffer and self._error is None:
                await self._flush_one()
            self._room.unpark_all()

    async def _flush_one(self) -> None:
        """Hand the buffered batch to the connection and wait for the PONG (shielded,
        bounded by ``flush_timeout``): a batch is never left half sent by a cancel."""
        batch = self._buffer
        self._buffer = []
        n = len(batch)
        full = n >= self.max_batch
        self._in_flight = n
        self._room.unpark_all()
        conn = self._conn
        started = time.perf_counter()
        try:
            with trio.CancelScope(
                shield=True, deadline=trio.current_time() + self._flush_timeout
            ) as scope:
                publish = conn._publish  # validated at publish(); no cancel in this scope
                for subject, data, reply, headers in batch:
                    await publish(subject, data, reply, headers)
                await conn.flush(timeout=None)
                self._limit = conn.max_payload
            if scope.cancelled_caught:
                raise _errors.TimeoutError(
                    f"a batch of {n} messages was not confirmed within {self._flush_timeout} s"
                )
        except Exception as exc:
            self._in_flight = 0
            self._fail(exc, n)
            return
        self._in_flight = 0
        self._sent += n
        self._batches += 1
        if full:
            self._full_batches += 1
        self._durations.record(time.perf_counter() - started)

    def _fail(self, exc: Exception, n: int) -> None:
        """A batch of ``n`` failed: it and everything buffered are lost, and reported."""
        waiting = len(self._buffer)
        self._buffer = []
        self._lost += n + waiting
        error = BatchPublishError(
            f"{n + waiting} accepted message(s) were not confirmed sent "
            f"({n} in the failed batch, {waiting} waiting): {exc}",
            lost=n + waiting,
        )
        error.__cause__ = exc
        self._error = error
        log.error("batch publisher: %s", error)
        self._room.unpark_all()
        self._flusher_lot.unpark_all()


@asynccontextmanager
async def open_batch_publisher(
    nc_or_pool: Connection | Pool[Connection],
    *,
    max_batch: int = 1000,
    max_delay: float = 0.005,
    flush_timeout: float = 10.0,
) -> AsyncIterator[BatchPublisher]:
    """Publish in batches for the duration of the block: one flush per batch.

    Contract:

    * ``await bp.publish(...)`` validates the message (a bad subject, or a message over
      the server's ``max_payload``, raises there) and *accepts* it into the current batch.
      At most ``max_batch`` messages wait in it; beyond that ``publish`` waits for the
      flusher (backpressure). A publish cancelled while waiting accepted nothing.
    * A flusher task in the publisher's own nursery hands the batch to the connection
      once it holds ``max_batch`` messages or ``max_delay`` seconds after its first
      message, then flushes (a PING/PONG): the batch's messages are then *sent*
      (``stats().sent``). One batch is flushed at a time, in order; the next one fills
      meanwhile. Each batch's hand-over and flush are shielded from cancellation and
      bounded by ``flush_timeout`` seconds.
    * Leaving the block, normally, by an exception or by a cancel, flushes everything
      accepted before the exit completes (shielded, ``flush_timeout`` per batch), then
      the exception or the ``Cancelled`` propagates.
    * If a batch fails (the connection closed or was lost during it, no PONG within
      ``flush_timeout``), its messages and those waiting in the next batch are counted
      ``lost`` (not confirmed: some may have reached the server), the failure is logged
      (ERROR, logger ``trionats.batch``), every later ``publish`` raises
      :class:`BatchPublishError`, and so does leaving the block (if the block raised an
      exception of its own, that one propagates, with the failure in ``bp.error``). So
      an accepted message is sent, or the caller gets an exception: never silently lost.

    Given a pool, one connection is borrowed (``pool.borrow(long_lived=True)``) for the
    life of the block: the batches go out in order on one connection, and a message
    accepted can never fail for want of a connection to borrow (the borrow happens, and
    may time out, before the block starts).

    Example::

        async with trionats.open_batch_publisher(nc, max_batch=500) as bp:
            for i in range(10_000):
                await bp.publish("events", b"%d" % i)
        print(bp.stats().sent)  # 10000

    Args:
        nc_or_pool: the connection to publish on, or a pool to borrow one from.
        max_batch: messages per batch (>= 1).
        max_delay: seconds a batch waits for more after its first message (>= 0; 0 flushes
            as soon as the flusher runs).
        flush_timeout: seconds one batch may take to be confirmed.

    Raises:
        TypeError / ValueError: a bad argument (the message names it).
        BatchPublishError: a batch failed (at the exit; see above).
        trionats.PoolTimeoutError: no connection could be borrowed from the pool.
    """
    from ._connection import Connection
    from ._pool import Pool

    check_int("max_batch", max_batch, minimum=1)
    max_delay = check_seconds("max_delay", max_delay, allow_zero=True)
    flush_timeout = check_seconds("flush_timeout", flush_timeout)
    if isinstance(nc_or_pool, Pool):
        async with (
            nc_or_pool.borrow(long_lived=True) as nc,
            _open(nc, max_batch, max_delay, flush_timeout) as bp,
        ):
            yield bp
    elif isinstance(nc_or_pool, Connection):
        async with _open(nc_or_pool, max_batch, max_delay, flush_timeout) as bp:
            yield bp
    else:
        raise TypeError(
            f"open_batch_publisher needs a Connection or a Pool, got {type(nc_or_pool).__name__}"
        )


@asynccontextmanager
async def _open(
    conn: Connection, max_batch: int, max_delay: float, flush_timeout: float
) -> AsyncIterator[BatchPublisher]:
    bp = BatchPublisher(conn, max_batch, max_delay, flush_timeout)
    raised: BaseException | None = None
    try:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bp._flusher, name="trionats.batch flusher")
                try:
                    yield bp
                except BaseException as exc:
                    raised = exc
                    raise
                finally:
                    bp._closing = True
                    bp._flusher_lot.unpark_all()
                    bp._room.unpark_all()
        except BaseExceptionGroup as group:
            _errors.reraise_unwrapped(group, 1)
    except trio.Cancelled:
        # A cancel ended the block and the final flush failed: the caller must learn
        # that accepted messages were not confirmed, not just that it was cancelled.
        if bp._error is not None:
            raise bp._error  # noqa: B904 - the Cancelled stays as its __context__
        raise
    finally:
        bp._ended = True
    if bp._error is not None and raised is None:
        raise bp._error
