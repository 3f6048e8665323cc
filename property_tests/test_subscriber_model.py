"""Property tests of the subscriber's accounting.

Two layers:

* ``SubscriberAccounting``: a hypothesis state machine over the synchronous core
  (``_SubscriberCore`` / ``_HandleCore``) fed by *real* ``Subscription`` buffers (their
  producer and consumer sides are synchronous), with no I/O at all: messages arrive, the
  dispatcher takes what the free slots allow, handlers finish / fail / time out / are
  cancelled, handles stop. It checks ``received == processed + failed + timed_out + dropped +
  in_flight + pending`` after every step, the worker limits, and that a stopped handle
  can run no handler any more.
* ``test_real_subscriber_against_fake_connection``: the real async ``Subscriber`` on a fake
  connection (real Subscription objects, no server, no asyncio), driven by drawn actions;
  it checks the same invariant at every step, the concurrency limit, and that no handler
  code runs after ``stop()`` returns.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from trionats._msg import Msg
from trionats._subscriber import (
    Outcome,
    SubscriberConfig,
    SubscriberStats,
    _discard_buffered,
    _HandleCore,
    _open_subscriber,
    _State,
    _SubscriberCore,
)
from trionats._subscription import Subscription


class FakeConn:
    """Just enough of Connection for Subscription, Msg.respond and Subscriber."""

    def __init__(self) -> None:
        self._dropped = 0
        self.events: list[Any] = []
        self.subs: list[Subscription] = []
        self.published: list[tuple[str, bytes, dict[str, str] | None]] = []
        self.last_error: Exception | None = None
        self._tracer = None  # OpenTelemetry off

    def _emit(self, event: Any) -> None:
        self.events.append(event)

    async def _unsubscribe(self, sub: Subscription) -> None:
        sub._end()

    async def _publish(
        self, subject: str, data: bytes, reply: str, headers: dict[str, str] | None
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.published.append((subject, data, headers))

    @asynccontextmanager
    async def subscribe(
        self,
        subject: str,
        *,
        queue: str | None = None,
        max_pending_msgs: int,
        max_pending_bytes: int,
        timeout: float | None,
    ) -> AsyncIterator[Subscription]:
        sub = Subscription(self, subject, queue, max_pending_msgs, max_pending_bytes)  # type: ignore[arg-type]
        await trio.lowlevel.checkpoint()
        self.subs.append(sub)
        try:
            yield sub
        finally:
            self.subs.remove(sub)
            sub._end()

    def deliver(self, subject: str, data: bytes, reply: str = "") -> None:
        """What nats-py's read loop does: a synchronous put into each matching subscription."""
        for sub in list(self.subs):
            if sub.subject == subject:
                sub.put_nowait(Msg(self, subject, reply, data, None))  # type: ignore[arg-type]


def check_invariant(s: SubscriberStats) -> None:
    total = s.processed + s.failed + s.timed_out + s.dropped + s.in_flight + s.pending
    assert s.received == total, s
    assert s.cancelled <= s.timed_out, s
    assert min(s.received, s.in_flight, s.pending, s.pending_bytes, s.dropped) >= 0, s


class Handle:
    def __init__(self, core: _HandleCore, sub: Subscription) -> None:
        self.core = core
        self.sub = sub
        self.arrived = 0
        self.grace_over = False


class Job:
    def __init__(self, handle: Handle) -> None:
        self.handle = handle
        self.done = False


class SubscriberAccounting(RuleBasedStateMachine):
    handles = Bundle("handles")
    jobs = Bundle("jobs")

    @initialize(max_workers=st.integers(1, 6))
    def setup(self, max_workers: int) -> None:
        self.conn = FakeConn()
        self.core = _SubscriberCore(max_workers)
        self.all_handles: list[Handle] = []
        self.live_jobs: list[Job] = []

    @rule(
        target=handles,
        max_workers=st.integers(1, 8),
        pending_msgs=st.integers(1, 6),
        pending_bytes=st.integers(1, 60),
    )
    def start(self, max_workers: int, pending_msgs: int, pending_bytes: int) -> Handle:
        core = _HandleCore(max_workers)
        self.core.add(core)
        sub = Subscription(self.conn, "s", None, pending_msgs, pending_bytes)  # type: ignore[arg-type]
        self.core.running(core, sub)
        handle = Handle(core, sub)
        self.all_handles.append(handle)
        return handle

    @rule(handle=handles, size=st.integers(0, 20))
    def arrive(self, handle: Handle, size: int) -> None:
        if handle.sub.ended:
            return  # unsubscribed: the read loop no longer finds the subscription
        handle.sub.put_nowait(Msg(self.conn, "s", "", b"x" * size, None))  # type: ignore[arg-type]
        handle.arrived += 1

    @rule(target=jobs, handle=handles)
    def dispatch(self, handle: Handle) -> Any:
        free = self.core.free_slots(handle.core)
        n = min(free, handle.sub.pending)
        taken = []
        for _ in range(n):
            self.core.taken(handle.core)
            handle.sub.take_nowait()
            job = Job(handle)
            self.live_jobs.append(job)
            taken.append(job)
        if handle.core.state is not _State.RUNNING:
            assert n == 0
        return multiple(*taken)

    @rule(
        job=consumes(jobs),
        outcome=st.sampled_from([Outcome.PROCESSED, Outcome.FAILED, Outcome.TIMED_OUT]),
    )
    def finish(self, job: Job, outcome: Outcome) -> None:
        if job.done:
            return
        if job.handle.grace_over:
            outcome = Outcome.CANCELLED
        self.core.finished(job.handle.core, outcome)
        job.done = True
        self.live_jobs.remove(job)

    @rule(handle=handles)
    def begin_stop(self, handle: Handle) -> None:
        self.core.stopping(handle.core)
        handle.sub._end()
        _discard_buffered(self.core, handle.core, handle.sub)
        assert handle.sub.pending == 0
        assert self.core.free_slots(handle.core) == 0

    @rule(handle=handles)
    def grace_expires(self, handle: Handle) -> None:
        if handle.core.state is _State.STOPPING:
            handle.grace_over = True
            # The cancelled handlers end (Trio delivers Cancelled at their next checkpoint).
            for job in [j for j in self.live_jobs if j.handle is handle]:
                self.core.finished(handle.core, Outcome.CANCELLED)
                job.done = True
                self.live_jobs.remove(job)

    @precondition(lambda self: any(h.core.in_flight for h in self.all_handles))
    @rule(data=st.data())
    def stopped_too_early_is_refused(self, data: st.DataObject) -> None:
        handle = data.draw(st.sampled_from([h for h in self.all_handles if h.core.in_flight]))
        before = handle.core.state
        with pytest.raises(RuntimeError):
            self.core.stopped(handle.core)
        assert handle.core.state is before

    @rule(handle=handles)
    def complete_stop(self, handle: Handle) -> None:
        if handle.core.state is not _State.STOPPING or handle.core.in_flight:
            return
        self.core.stopped(handle.core)
        assert handle.core.state is _State.STOPPED
        # No handler of a stopped handle runs, and none can start.
        assert not [j for j in self.live_jobs if j.handle is handle]
        assert self.core.free_slots(handle.core) == 0
        with pytest.raises(RuntimeError):
            self.core.taken(handle.core)
        self.core.stopped(handle.core)  # idempotent

    @invariant()
    def accounting_balances(self) -> None:
        if not hasattr(self, "core"):
            return
        total_in_flight = 0
        received = 0
        for h in self.all_handles:
            s = h.core.stats()
            check_invariant(s)
            assert s.received == h.arrived
            assert s.in_flight == len([j for j in self.live_jobs if j.handle is h])
            assert s.in_flight <= h.core.max_workers
            assert s.active == (1 if h.core.state in (_State.RUNNING, _State.STOPPING) else 0)
            total_in_flight += s.in_flight
            received += s.received
        assert total_in_flight == self.core.in_flight <= self.core.max_workers
        total = self.core.stats()
        check_invariant(total)
        assert total.received == received
        assert total.in_flight == total_in_flight


TestSubscriberAccounting = SubscriberAccounting.TestCase
TestSubscriberAccounting.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)


# -- the real async Subscriber on a fake connection ------------------------------------


ACTIONS = st.sampled_from(
    ["publish", "publish", "publish", "burst", "release", "fail", "tick", "stop", "start"]
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.data(),
    max_workers=st.integers(1, 4),
    pending_msgs=st.integers(1, 5),
    handler_timeout=st.sampled_from([None, 0.001]),
)
async def test_real_subscriber_against_fake_connection(
    mock_clock: trio.testing.MockClock,
    data: st.DataObject,
    max_workers: int,
    pending_msgs: int,
    handler_timeout: float | None,
) -> None:
    """Virtual time (never advancing by itself) keeps every run deterministic."""
    conn = FakeConn()
    config = SubscriberConfig(
        max_workers=max_workers,
        pending_msgs=pending_msgs,
        handler_timeout=handler_timeout,
        stop_timeout=0,
    )
    running = 0
    peak = 0
    gates: list[trio.Event] = []
    fail_next: list[bool] = []
    stopped_subjects: set[str] = set()
    violations: list[str] = []

    async def handler(msg: Msg) -> bytes | None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            if msg.data == b"now":  # returns without blocking (the inline fast path's case)
                return b"ok"
            gate = trio.Event()
            gates.append(gate)
            await gate.wait()
            if fail_next and fail_next.pop():
                raise ValueError("boom")
            return b"ok"
        finally:
            running -= 1
            if msg.subject in stopped_subjects:
                violations.append(f"handler for {msg.subject} ran after stop returned")

    async with _open_subscriber(conn, config) as subscriber:  # type: ignore[arg-type]
        handles = [await subscriber.start("a", handler)]
        n_subjects = 1
        for _ in range(data.draw(st.integers(1, 30))):
            action = data.draw(ACTIONS)
            live = [h for h in handles if not h.stopped]
            if action == "publish" and live:
                h = data.draw(st.sampled_from(live))
                body = data.draw(st.sampled_from([b"m", b"m", b"now"]))
                conn.deliver(h.subject, body, reply=data.draw(st.sampled_from(["", "r"])))
            elif action == "burst" and live:
                # several messages in one read: some block, some return at once
                h = data.draw(st.sampled_from(live))
                for body in data.draw(st.lists(st.sampled_from([b"m", b"now"]), max_size=6)):
                    conn.deliver(h.subject, body)
            elif action in ("release", "fail") and gates:
                fail_next.append(action == "fail")
                gates.pop(data.draw(st.integers(0, len(gates) - 1))).set()
            elif action == "tick":
                mock_clock.jump(0.002)  # past handler_timeout, if one is set
            elif action == "stop" and live:
                h = data.draw(st.sampled_from(live))
                if data.draw(st.booleans()):
                    for gate in gates:  # let every handler finish within the grace period
                        gate.set()
                    gates.clear()
                    await h.stop(timeout=10)
                    assert h.stats().cancelled == 0
                else:
                    await h.stop(timeout=0)
                stopped_subjects.add(h.subject)
                s = h.stats()
                assert s.in_flight == 0
                assert s.pending == 0
                assert s.active == 0
            elif action == "start":
                n_subjects += 1
                own_limit = data.draw(st.integers(1, max_workers))
                handles.append(
                    await subscriber.start(f"s{n_subjects}", handler, max_workers=own_limit)
                )
            await trio.testing.wait_all_tasks_blocked()
            assert peak <= max_workers
            total = subscriber.stats()
            for h in handles:
                hs = h.stats()
                check_invariant(hs)
                # Work-conserving: once everything settled, a message waits only when
                # every worker slot is busy (the subscriber's, or the handle's own).
                if hs.pending and not h.stopped:
                    assert total.in_flight == max_workers or hs.in_flight == h.max_workers, (
                        hs,
                        total,
                    )
            check_invariant(total)
            assert total.in_flight == running
            assert total.active == len([h for h in handles if not h.stopped])
    stopped_subjects.update(h.subject for h in handles)
    total = subscriber.stats()
    check_invariant(total)
    assert total.in_flight == 0
    assert total.pending == 0
    assert total.active == 0
    assert running == 0
    assert not violations
