"""Request multiplexing: one wildcard inbox subscription, replies routed to parked tasks."""

from __future__ import annotations

import heapq
import itertools
import math
from typing import TYPE_CHECKING, Any, final

from trio.lowlevel import reschedule

if TYPE_CHECKING:
    import trio

    from ._msg import Msg

__all__ = ["_Pending", "_ReplyRouter", "_RequestTimer"]


class _Pending:
    """A request waiting for its reply: the parked task (while parked) and the reply.

    ``active`` is True from the moment the request is registered until it is finished
    (replied, timed out, cancelled or failed); the timer skips inactive entries.
    """

    __slots__ = ("active", "error", "msg", "task")

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.msg: Msg | None = None
        self.error: BaseException | None = None
        self.active = True


@final
class _RequestTimer:
    """Request timeouts without a cancel scope per request.

    Entering and leaving a Trio cancel scope costs more than the rest of a request's
    Trio-side work (profiled: ~25% of a request at 100 concurrent requesters). Instead,
    deadlines go into one binary heap (O(log n) per request, whatever the mix of timeout
    values), and one asyncio timer on the bridge loop (which runs on Trio's clock, so
    MockClock applies) fires at the earliest deadline, no more often than every
    :attr:`GRANULARITY` seconds, and wakes the expired requests.

    Memory: a finished request's entry stays in the heap until its deadline or the next
    compaction, but it holds only the empty :class:`_Pending` (the request drops its reply
    before it returns). Once finished entries outnumber live ones (and there are more than
    :attr:`COMPACT_MIN`), the heap is rebuilt from the live ones: amortised O(1) each.
    """

    GRANULARITY = 0.005
    COMPACT_MIN = 1024

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, _Pending]] = []
        self._seq = itertools.count()
        self._finished = 0
        self._handle: Any = None
        self._armed_at = math.inf

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, pending: _Pending, timeout: float) -> None:
        deadline = self._loop.time() + timeout
        heapq.heappush(self._heap, (deadline, next(self._seq), pending))
        if deadline < self._armed_at:
            self._arm(deadline)

    def finished(self) -> None:
        """One registered request has finished; compact when most entries are finished."""
        self._finished += 1
        if self._finished > self.COMPACT_MIN and self._finished * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if entry[2].active]
            heapq.heapify(self._heap)
            self._finished = 0

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_at(when, self._fire)
        self._armed_at = when

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = math.inf
        now = self._loop.time()
        heap = self._heap
        while heap and heap[0][0] <= now:
            pending = heapq.heappop(heap)[2]
            if not pending.active:
                self._finished = max(0, self._finished - 1)
                continue
            task = pending.task
            if task is not None:
                pending.task = None
                reschedule(task)  # woken with msg None: timed out
        if heap:
            self._arm(max(heap[0][0], now + self.GRANULARITY))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._heap.clear()
        self._finished = 0


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

    def fail_all(self, error: BaseException) -> None:
        """Wake every waiting request with ``error`` (the connection died)."""
        for pending in self.waiting.values():
            pending.error = error
            task = pending.task
            if task is not None:
                pending.task = None
                reschedule(task)

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True
