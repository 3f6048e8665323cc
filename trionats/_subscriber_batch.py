"""Batch handlers of the subscriber: ``await subscriber.start_batch(subject, handler)``.

A :class:`BatchHandle` runs one collector task per subscription: it waits for a first
message and a free worker slot, gathers up to ``min(max_batch, free slots)`` messages or
waits ``max_wait`` seconds for them, and starts one handler run with the list.

Slot rule: **a batch of n messages takes n worker slots** (one per message), for as long
as its handler runs. So ``max_workers`` bounds messages in flight, exactly as for
single-message handlers, the accounting of :class:`~trionats.SubscriberStats` stays per
message (``received == processed + failed + timed_out + dropped + in_flight + pending``),
and batch and single-message subscriptions of one subscriber share its slots fairly.
Each message of a batch gets its run's outcome (processed, failed, timed out or
cancelled). ``handler_duration`` records one value per handler run, not per message.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, final

import trio

from . import _errors
from ._subscriber import (
    _CANCEL_GRACE,
    _DEFAULT,
    Outcome,
    _callable_name,
    _Default,
    _discard_buffered,
    _HandleCore,
    _header_text,
    _State,
    _stop_handle,
)

if TYPE_CHECKING:
    from ._connection import Connection
    from ._msg import Msg
    from ._subscriber import Subscriber, SubscriberStats
    from ._subscription import Subscription

__all__ = ["BatchHandle", "BatchHandler"]

log = logging.getLogger("trionats.subscriber")

BatchHandler = Callable[[list["Msg"]], Awaitable[object]]
"""``async def handler(msgs: list[Msg]) -> None`` for :meth:`Subscriber.start_batch`."""

_YIELD_EVERY = 16
"""Batches the collector starts between two full yields to the Trio scheduler."""


@final
class BatchHandle:
    """One running batch subscription of a :class:`Subscriber`; returned by
    :meth:`Subscriber.start_batch`.

    Attributes:
        subject: the subscribed subject.
        queue: the queue group, or None.
        max_workers: this subscription's own limit on messages in flight (a batch of n
            messages takes n slots; the subscriber's ``max_workers`` applies as well).
        max_batch: the most messages one handler run gets.
        max_wait: seconds a batch waits for more messages after its first one.
    """

    def __init__(
        self,
        subscriber: Subscriber,
        subject: str,
        handler: BatchHandler,
        queue: str | None,
        *,
        max_workers: int,
        max_batch: int,
        max_wait: float,
    ) -> None:
        self._subscriber = subscriber
        self.subject = subject
        self.queue = queue
        self.max_workers = max_workers
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._handler = handler
        self._core = _HandleCore(max_workers)
        self._sub: Subscription | None = None
        self._workers: trio.Nursery | None = None
        self._wake_run = trio.Event()  # stop requested, or the subscription ended
        self._stop_deadline = math.inf
        self._done = trio.Event()
        self._task_name = f"trionats.subscriber batch {subject!r}"

    # -- public --------------------------------------------------------------------------
    def stats(self) -> SubscriberStats:
        """A snapshot of this subscription's counters, per message (see
        :class:`SubscriberStats`); ``handler_duration`` has one value per batch run."""
        return self._core.stats(self._subscriber._connection_error())

    @property
    def stopped(self) -> bool:
        """True once the subscription has ended and none of its handlers runs any more."""
        return self._done.is_set()

    async def stop(self, timeout: float | _Default | None = _DEFAULT) -> None:
        """Stop this subscription; returns when none of its handler runs is left.

        The same steps and cancellation rules as :meth:`SubscriptionHandle.stop`: stop
        collecting, unsubscribe, count what was never handed to a handler as dropped
        (buffered messages: no batch is ever half collected), let running batches finish
        within ``timeout`` seconds, then cancel them (each of their messages counted
        ``timed_out`` and ``cancelled``).

        Args:
            timeout: grace period in seconds for running batches (0: cancel them at once;
                None: no deadline of its own). Defaults to the subscriber's
                ``stop_timeout``.
        """
        await _stop_handle(self, timeout)

    def __repr__(self) -> str:
        return (
            f"<trionats.BatchHandle {self.subject!r} queue={self.queue!r} "
            f"max_batch={self.max_batch} {self._core.state.value}>"
        )

    # -- internals -----------------------------------------------------------------------
    def _request_stop(self, deadline: float) -> None:
        self._subscriber._core.stopping(self._core)
        self._stop_deadline = min(self._stop_deadline, deadline)
        self._wake_run.set()
        if self._workers is not None:
            scope = self._workers.cancel_scope
            scope.deadline = min(scope.deadline, deadline)

    def _warn_stuck(self, who: str) -> None:
        log.warning(
            "%s: %d message(s) of the batch subscription on %r still in handlers %.2f s "
            "after they were cancelled (shielded from cancellation?): handler %s. They stay "
            "in the subscriber's nursery, are counted when they end, and leaving "
            "open_subscriber waits for them.",
            who,
            self._core.in_flight,
            self.subject,
            _CANCEL_GRACE,
            _callable_name(self._handler),
        )

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
                        workers.start_soon(self._collect, sub, workers, name=self._task_name)
                        task_status.started()
                        await self._wake_run.wait()
                        if self._core.state is _State.RUNNING:
                            reason = self._subscriber._connection_error()
                            log.warning(
                                "batch subscription on %r ended (connection closed%s); "
                                "finishing its running batches",
                                self.subject,
                                f": {reason}" if reason else "",
                            )
                finally:
                    # Leaving `subscribe` unsubscribed and woke the collector: nothing
                    # more arrives, and what is buffered was never handed over.
                    sub_core.stopping(self._core)
                    if self._sub is not None:
                        _discard_buffered(sub_core, self._core, self._sub)
                    self._subscriber._slot_freed.unpark_all()
                # The nursery now waits for running batches, until the stop deadline.
        except BaseExceptionGroup as group:
            _errors.reraise_unwrapped(group, 1)
        finally:
            sub_core.stopped(self._core)
            self._subscriber._active.pop(self, None)
            self._done.set()

    def _running(self) -> bool:
        return self._core.state is _State.RUNNING

    async def _collect(self, sub: Subscription, workers: trio.Nursery) -> None:
        """Gather a batch (a free slot per message), start its handler run, repeat."""
        sub_core = self._subscriber._core
        core = self._core
        slot_freed = self._subscriber._slot_freed
        started = 0
        while core.state is _State.RUNNING:
            free = sub_core.free_slots(core)
            if free <= 0:
                await slot_freed.park()
                continue
            if not sub.pending:
                if sub.ended:
                    self._wake_run.set()
                    return
                await sub.wait_nonempty()
                continue
            target = min(self.max_batch, free)
            if sub.pending < target and self.max_wait > 0:
                # Wait for more, at most max_wait after the first message was seen; every
                # message that arrives wakes us (the subscription has one waiter: us).
                with trio.move_on_after(self.max_wait):
                    while sub.pending < target and not sub.ended:
                        await sub._wait()
                if not self._running():  # stopped while waiting
                    return
                target = min(self.max_batch, sub_core.free_slots(core))
                if target <= 0:
                    continue
            msgs = []
            for _ in range(min(target, sub.pending)):
                sub_core.taken(core)
                msgs.append(sub.take_nowait())
            workers.start_soon(self._run_batch, msgs, name=self._task_name)
            started += 1
            if started >= _YIELD_EVERY:
                started = 0
                await trio.lowlevel.checkpoint()

    async def _run_batch(self, msgs: list[Msg]) -> None:
        subscriber = self._subscriber
        config = subscriber._config
        timeout = config.handler_timeout
        outcome = Outcome.CANCELLED
        started = time.perf_counter() if config.metrics else None
        try:
            try:
                with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
                    await self._handler(msgs)
                if scope.cancelled_caught:
                    outcome = Outcome.TIMED_OUT
                    log.warning(
                        "batch handler for %r timed out after %s s on %d message(s)",
                        self.subject,
                        timeout,
                        len(msgs),
                    )
                    await self._reply_errors(msgs, "504", f"handler timed out after {timeout} s")
                    return
                outcome = Outcome.PROCESSED
            except Exception as exc:
                outcome = Outcome.FAILED
                log.error(
                    "batch handler for %r failed on %d message(s): %r",
                    self.subject,
                    len(msgs),
                    exc,
                    exc_info=exc,
                )
                await self._reply_errors(msgs, "500", _header_text(exc))
        finally:
            duration = None if started is None else time.perf_counter() - started
            sub_core = subscriber._core
            for _ in msgs:
                sub_core.finished(self._core, outcome, duration)
                duration = None  # one value per run
            lot = subscriber._slot_freed
            if lot:
                lot.unpark_all()

    async def _reply_errors(self, msgs: list[Msg], code: str, text: str) -> None:
        """Requests in a failed batch get the same error reply as a single handler's."""
        for msg in msgs:
            if msg.reply:
                try:
                    await msg.respond(
                        b"",
                        headers={"Nats-Service-Error": text, "Nats-Service-Error-Code": code},
                    )
                except Exception as exc:
                    log.warning("could not send the error reply for %r: %r", msg.subject, exc)
