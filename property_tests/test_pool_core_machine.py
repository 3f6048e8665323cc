"""A hypothesis state machine over the pool's synchronous core (``_pool_core``).

The model mirrors what a user of the core can observe (idle stacks, leases, dial slots,
waiters, counters) and derives every expectation from the events the core reports, so a
wrong close reason, a broken LIFO order, a lost slot or a miscounted statistic fails.

Shared leases (``request(shared=True)``, ``share_now``, ``unshare_now``) are mixed in: a
connection is never in exclusive and shared use at once, a shared lease goes to the least
loaded connection in shared service, no connection is closed while a lease on it is open
(but at shutdown's detach), and the per-connection cap holds.
"""

from __future__ import annotations

import math
import random

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from property_tests.fakes import FakeConn, FakeNetwork, is_healthy
from trionats._config import PoolConfig
from trionats._errors import PoolClosedError
from trionats._pool_core import CloseReason, DialTicket, Lease, PoolCore, Waiter


class PoolCoreMachine(RuleBasedStateMachine):
    @initialize(
        n_servers=st.integers(1, 3),
        idle_per_server=st.integers(0, 4),
        max_per_server=st.none() | st.integers(1, 4),
        max_life=st.sampled_from([5.0, 50.0, 1000.0]),
        jitter=st.sampled_from([0.0, 0.025, 0.5]),
        backoff=st.sampled_from([(1.0, 30.0), (0.5, 0.5), (2.0, 7.0)]),
        leak_timeout=st.sampled_from([3.0, 40.0, 500.0]),
        share_cap=st.none() | st.integers(1, 3),
        seed=st.integers(0, 2**32 - 1),
    )
    def setup(
        self,
        n_servers: int,
        idle_per_server: int,
        max_per_server: int | None,
        max_life: float,
        jitter: float,
        backoff: tuple[float, float],
        leak_timeout: float,
        share_cap: int | None,
        seed: int,
    ) -> None:
        self.urls = [f"nats://127.0.0.1:{4222 + i}" for i in range(n_servers)]
        self.config = PoolConfig(
            servers=self.urls,
            idle_per_server=idle_per_server,
            max_per_server=max_per_server,
            max_life=max_life,
            max_life_jitter=jitter,
            backoff_min=backoff[0],
            backoff_max=backoff[1],
            leak_timeout=leak_timeout,
            shared_leases_per_connection=share_cap,
        )
        self.core: PoolCore[FakeConn] = PoolCore(
            self.config, is_healthy=is_healthy, rng=random.Random(seed)
        )
        self.net = FakeNetwork()
        self.now = 0.0
        # the model
        self.idle: list[list[FakeConn]] = [[] for _ in self.urls]
        self.leases: list[Lease[FakeConn]] = []
        self.tickets: list[DialTicket] = []
        self.queued: list[Waiter] = []
        self.woken: list[Waiter] = []
        self.suspect: set[int] = set()  # conns returned with suspect=True
        self.reported: set[Lease[FakeConn]] = set()  # leases reported as leaks
        self.created = 0
        self.reused = 0
        self.closed = dict.fromkeys(CloseReason, 0)
        self.dial_failures = 0
        self.waits = 0
        self.timeouts = 0
        self.leaks = 0
        self.shared_borrows = 0
        self.live: set[int] = set()
        self.retired: dict[int, CloseReason] = {}  # shared connections seen retired

    def held(self) -> list[Lease[FakeConn]]:
        """Every lease out: held, or granted to a woken borrower not resumed yet."""
        return self.leases + [w.grant for w in self.woken if isinstance(w.grant, Lease)]

    def shares(self, conn: FakeConn) -> int:
        return sum(1 for le in self.held() if le.shared and le.conn is conn)

    def note_retirements(self) -> None:
        """A connection retired from shared service was unhealthy (or returned suspect)
        or past its life when it was retired."""
        for conn, n, reason in self.core.shared_connections():
            assert n >= 1, "a connection in shared service has a lease open"
            if reason is None or conn.id in self.retired:
                continue
            if reason is CloseReason.EXPIRED:
                assert conn.expires_at is not None
                assert self.now >= conn.expires_at
            else:
                assert reason is CloseReason.UNHEALTHY
                assert not is_healthy(conn) or conn.id in self.suspect
            self.retired[conn.id] = reason

    # -- helpers -----------------------------------------------------------------------
    def settle(self) -> None:
        """Drain the core's outbox, checking each event against the model."""
        core = self.core
        self.note_retirements()
        for conn, reason in core.to_close:
            note(f"close {conn} {reason}")
            assert conn.id in self.live, "closed twice or never opened"
            if reason is not CloseReason.SHUTDOWN:
                assert self.shares(conn) == 0, "closed under an open shared lease"
            self.live.discard(conn.id)
            s = self.urls.index(conn.server)
            if conn in self.idle[s]:
                self.idle[s].remove(conn)
            if reason is CloseReason.SHUTDOWN:
                assert core.closing
            elif reason is CloseReason.UNHEALTHY:
                assert (
                    not is_healthy(conn)
                    or conn.id in self.suspect
                    or self.retired.get(conn.id) is CloseReason.UNHEALTHY
                )
            elif reason is CloseReason.EXPIRED:
                assert conn.expires_at is not None
                assert self.now >= conn.expires_at
            elif reason is CloseReason.OVERFLOW:
                assert len(self.idle[s]) >= self.config.idle_per_server
            self.closed[reason] += 1
            conn.closed = True
        core.to_close.clear()
        for waiter in core.to_wake:
            assert waiter in self.queued
            self.queued.remove(waiter)
            assert waiter.grant is not None
            assert waiter.shared == getattr(waiter.grant, "shared", waiter.shared)
            if isinstance(waiter.grant, Lease):
                self.take(waiter.grant)
            self.woken.append(waiter)
        core.to_wake.clear()
        assert not core.new_leaks

    def take(self, lease: Lease[FakeConn]) -> None:
        """Account for a lease just handed out (not in the model's leases yet)."""
        if lease.shared:
            self.shared_borrows += 1
            if self.shares(lease.conn):
                # joined a connection in shared service: the least loaded one
                assert lease.reused
                self.reused += 1
                self.check_least_loaded(lease.conn)
                return
        if lease.reused:
            self.take_from_idle(lease)

    def check_least_loaded(self, picked: FakeConn) -> None:
        cap = self.config.shared_leases_per_connection
        mine = self.shares(picked)
        assert cap is None or mine < cap
        for conn, _, reason in self.core.shared_connections():
            if conn is picked or reason is not None or conn.id in self.retired:
                continue
            if self.core.in_backoff(self.urls.index(conn.server), self.now):
                continue
            theirs = self.shares(conn)
            if cap is not None and theirs >= cap:
                continue
            assert mine <= theirs, "a shared lease went to a busier connection"

    def take_from_idle(self, lease: Lease[FakeConn]) -> None:
        conn = lease.conn
        s = lease.server
        assert lease.reused
        assert self.idle[s], "a reused connection must come from the idle list"
        assert self.idle[s][-1] is conn, "idle connections are handed out newest first"
        self.idle[s].pop()
        self.reused += 1

    def check_handed_out(self, lease: Lease[FakeConn]) -> None:
        conn = lease.conn
        assert not conn.closed
        assert is_healthy(conn)
        assert conn.expires_at is not None
        assert self.now < conn.expires_at, "handed out past its life"
        assert lease.borrowed_at == self.now
        others = [le for le in self.held() if le.conn is conn and le is not lease]
        if lease.shared:
            assert all(le.shared for le in others), "shared and exclusive on one connection"
            cap = self.config.shared_leases_per_connection
            assert cap is None or len(others) < cap
        else:
            assert not others
        self.leases.append(lease)

    def handle(self, result: Lease[FakeConn] | DialTicket | Waiter) -> None:
        if isinstance(result, Lease):
            self.take(result)
            self.settle()
            self.check_handed_out(result)
        elif isinstance(result, DialTicket):
            assert result.server not in self.backoff_servers()
            self.settle()
            self.tickets.append(result)
        else:
            self.waits += 1
            self.queued.append(result)
            self.settle()

    def backoff_servers(self) -> set[int]:
        return {i for i in range(len(self.urls)) if self.core.in_backoff(i, self.now)}

    # -- rules -------------------------------------------------------------------------
    @rule()
    def borrow(self) -> None:
        try:
            result = self.core.request(self.now, "holder")
        except PoolClosedError:
            assert self.core.closing
            return
        # an idle hit reports its closes before the lease: settle handles the order
        if isinstance(result, Lease):
            self.settle_before_lease(result)
        else:
            self.handle(result)

    def settle_before_lease(self, lease: Lease[FakeConn]) -> None:
        # closes (expired / unhealthy idle connections popped first) precede the hit
        wakes = list(self.core.to_wake)
        self.core.to_wake.clear()
        self.settle()
        self.take(lease)
        self.check_handed_out(lease)
        self.core.to_wake.extend(wakes)
        self.settle()

    @rule(fast=st.booleans())
    def borrow_shared(self, fast: bool) -> None:
        if fast:
            lease = self.core.share_now(self.now, "holder")
            if lease is not None:
                assert lease.shared
                assert not self.core.to_close
                assert not self.core.to_wake
                self.take(lease)
                self.check_handed_out(lease)
                return
        try:
            result = self.core.request(self.now, "holder", shared=True)
        except PoolClosedError:
            assert self.core.closing
            return
        if isinstance(result, Lease):
            assert result.shared
            self.settle_before_lease(result)
        else:
            assert result.shared
            self.handle(result)

    @precondition(lambda self: self.tickets)
    @rule(data=st.data(), ok=st.booleans())
    def finish_dial(self, data: st.DataObject, ok: bool) -> None:
        ticket = data.draw(st.sampled_from(self.tickets))
        self.tickets.remove(ticket)
        url = self.urls[ticket.server]
        if not ok or url in self.net.down:
            before = self.now
            delay = self.core.dial_failed(ticket, self.now)
            self.dial_failures += 1
            assert self.config.backoff_min <= delay <= self.config.backoff_max
            assert self.core.in_backoff(ticket.server, before)
            self.settle()
            return
        conn = FakeConn(url, self.net, self.now)
        self.live.add(conn.id)
        lease = self.core.dial_succeeded(ticket, conn, self.now)
        self.created += 1
        if lease is None:
            assert self.core.closing
            self.settle()
            assert conn.closed
            return
        cfg = self.config
        life = lease.expires_at - lease.born
        assert lease.born == self.now
        assert cfg.max_life * (1 - cfg.max_life_jitter) - 1e-9 <= life
        assert life <= cfg.max_life * (1 + cfg.max_life_jitter) + 1e-9
        conn.expires_at = lease.expires_at
        assert not self.core.in_backoff(ticket.server, self.now)
        assert lease.shared == ticket.shared
        if lease.shared:
            self.shared_borrows += 1
            # Its first lease is in the model before the shared waiters woken with it.
            wakes = list(self.core.to_wake)
            self.core.to_wake.clear()
            self.settle()
            self.check_handed_out(lease)
            self.core.to_wake.extend(wakes)
            self.settle()
            return
        self.settle()
        self.check_handed_out(lease)

    @precondition(lambda self: self.tickets)
    @rule(data=st.data())
    def abort_dial(self, data: st.DataObject) -> None:
        ticket = data.draw(st.sampled_from(self.tickets))
        self.tickets.remove(ticket)
        self.core.dial_aborted(ticket, self.now)
        self.settle()

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), suspect=st.booleans(), fast=st.booleans())
    def give_back(self, data: st.DataObject, suspect: bool, fast: bool) -> None:
        lease = data.draw(st.sampled_from(self.leases))
        self.leases.remove(lease)
        conn = lease.conn
        if suspect:
            self.suspect.add(conn.id)
        s = lease.server
        idle_before = len(self.idle[s])
        if lease.shared and fast and not suspect and self.core.unshare_now(lease):
            assert self.shares(conn) >= 1
            assert not self.core.to_close
            assert not self.core.to_wake
            return
        self.core.release(lease, self.now, suspect=suspect)
        if lease.detached:
            self.settle()
            return
        if lease.shared and self.shares(conn):
            assert conn not in [c for c, _ in self.core.to_close]
            self.settle()
            return
        # Not closed: it went to the idle list (maybe straight on to a waiter).
        closes = [c for c, _ in self.core.to_close]
        if conn not in closes:
            assert not suspect
            assert conn.id not in self.suspect  # a suspect shared return retired it
            assert conn.id not in self.retired
            assert is_healthy(conn)
            assert conn.expires_at is not None
            assert self.now < conn.expires_at
            self.idle[s].append(conn)
            if not self.core.to_wake:
                assert idle_before < self.config.idle_per_server
        self.settle()

    @precondition(lambda self: self.leases or any(self.idle))
    @rule(data=st.data())
    def break_a_connection(self, data: st.DataObject) -> None:
        conns = [c for stack in self.idle for c in stack] + [le.conn for le in self.leases]
        conn = data.draw(st.sampled_from(conns))
        conn.broken = True

    @precondition(lambda self: self.queued or self.woken)
    @rule(data=st.data(), timed_out=st.booleans())
    def cancel_waiting_borrow(self, data: st.DataObject, timed_out: bool) -> None:
        waiter = data.draw(st.sampled_from(self.queued + self.woken))
        if waiter in self.queued:
            self.queued.remove(waiter)
        else:
            self.woken.remove(waiter)
            grant = waiter.grant
            if isinstance(grant, Lease):
                # It goes back as if returned unused: the model re-checks it like a return.
                if grant.reused:
                    self.reused -= 1
                if grant.shared:
                    self.shared_borrows -= 1
                self.leases.append(grant)
                self.check_release_of_unused(waiter, grant)
                return
        self.core.cancel_waiter(waiter, self.now)
        if timed_out:
            self.core.record_timeout()
            self.timeouts += 1
        self.settle()

    def check_release_of_unused(self, waiter: Waiter, lease: Lease[FakeConn]) -> None:
        self.leases.remove(lease)
        self.core.cancel_waiter(waiter, self.now)
        conn = lease.conn
        if lease.shared and self.shares(conn):
            assert conn not in [c for c, _ in self.core.to_close]
        elif conn not in [c for c, _ in self.core.to_close]:
            self.idle[lease.server].append(conn)
        self.settle()

    @precondition(lambda self: self.woken)
    @rule(data=st.data())
    def resume_woken_borrower(self, data: st.DataObject) -> None:
        waiter = data.draw(st.sampled_from(self.woken))
        self.woken.remove(waiter)
        grant = waiter.grant
        if isinstance(grant, PoolClosedError):
            assert self.core.closing
        elif isinstance(grant, Lease):
            # Between grant and resume the connection may have aged; the pool hands out
            # what was healthy and young at grant time, and the borrow is instantaneous
            # in the async layer (no checkpoint between wake-up and resume).
            self.check_handed_out_at_grant(grant)
        else:
            assert isinstance(grant, DialTicket)
            self.tickets.append(grant)

    def check_handed_out_at_grant(self, lease: Lease[FakeConn]) -> None:
        conn = lease.conn
        assert not conn.closed
        assert conn.expires_at is not None
        assert lease.borrowed_at < conn.expires_at
        self.leases.append(lease)

    @rule(
        dt=st.sampled_from([0.001, 0.5, 1.0, 3.0, 10.0, 60.0, 600.0]) | st.just("deadline"),
    )
    def advance_time(self, dt: float | str) -> None:
        if dt == "deadline":
            deadline = self.core.next_deadline()
            self.now = max(self.now, deadline) if math.isfinite(deadline) else self.now + 1.0
        else:
            assert isinstance(dt, float)
            self.now += dt
        self.core.tick(self.now)
        # A lease granted to a woken borrower that has not resumed yet is held too (the
        # async layer resumes it without a checkpoint): it can be a leak as well.
        granted = [w.grant for w in self.woken if isinstance(w.grant, Lease)]
        for lease in self.core.new_leaks:
            assert lease in self.leases or lease in granted
            assert lease not in self.reported
            assert lease.borrowed_at + self.config.leak_timeout <= self.now
            self.reported.add(lease)
            self.leaks += 1
        self.core.new_leaks.clear()
        # every lease past leak_timeout has been reported, exactly once
        for lease in self.leases:
            if lease.borrowed_at + self.config.leak_timeout <= self.now:
                assert lease in self.reported
        self.settle()
        # nothing idle is past its life after a tick
        for stack in self.idle:
            for conn in stack:
                assert conn.expires_at is not None
                assert conn.expires_at > self.now

    @rule(data=st.data())
    def server_down(self, data: st.DataObject) -> None:
        self.net.down.add(data.draw(st.sampled_from(self.urls)))

    @precondition(lambda self: self.net.down)
    @rule(data=st.data())
    def server_up(self, data: st.DataObject) -> None:
        self.net.down.discard(data.draw(st.sampled_from(sorted(self.net.down))))

    @precondition(lambda self: not self.core.closing)
    @rule()
    def shutdown(self) -> None:
        self.core.close(self.now)
        for waiter in self.core.to_wake:
            assert isinstance(waiter.grant, PoolClosedError)
        self.settle()
        assert all(not stack for stack in self.idle)
        assert not self.queued

    @precondition(lambda self: self.core.closing and self.leases)
    @rule()
    def detach_remaining(self) -> None:
        self.core.detach_all()
        detached = list(self.leases)
        # leases granted to woken borrowers that have not resumed are given up on too
        granted = [w for w in self.woken if isinstance(w.grant, Lease)]
        self.settle()
        for lease in detached:
            assert lease.conn.closed
            self.core.release(lease, self.now)  # a late return is a no-op
            self.leases.remove(lease)
        for waiter in granted:
            assert isinstance(waiter.grant, Lease)
            assert waiter.grant.conn.closed
            self.core.release(waiter.grant, self.now)  # a late return is a no-op
            self.woken.remove(waiter)
        assert not self.core.to_close
        assert not self.core.shared_connections()

    # -- invariants --------------------------------------------------------------------
    @invariant()
    def internal_counts_agree(self) -> None:
        self.core.check()

    @invariant()
    def idle_matches_model(self) -> None:
        for s in range(len(self.urls)):
            assert self.core.idle_connections(s) == self.idle[s]
            assert len(self.idle[s]) <= self.config.idle_per_server

    @invariant()
    def nothing_both_idle_and_borrowed(self) -> None:
        idle_ids = [c.id for stack in self.idle for c in stack]
        held = self.held()
        lent = [le.conn.id for le in held if not le.shared]
        shared = {le.conn.id for le in held if le.shared}
        assert len(set(idle_ids)) == len(idle_ids)
        assert len(set(lent)) == len(lent)
        assert not set(idle_ids) & set(lent)
        assert not shared & (set(idle_ids) | set(lent))
        assert set(idle_ids) | set(lent) | shared == self.live
        in_service = {conn.id: n for conn, n, _ in self.core.shared_connections()}
        assert set(in_service) == shared
        for le in held:
            if le.shared:
                assert in_service[le.conn.id] == self.shares(le.conn)

    @invariant()
    def open_per_server_within_cap(self) -> None:
        cap = self.config.max_per_server
        stats = self.core.stats(self.now)
        for server in stats.servers:
            if cap is not None:
                assert server.idle + server.borrowed + server.dialing + server.shared <= cap

    @invariant()
    def no_one_waits_needlessly(self) -> None:
        # A queued borrower means nothing could be granted: every server is in backoff,
        # or has no idle connection and no room to dial.
        if not self.queued:
            return
        cap = self.config.max_per_server
        servers = self.core.stats(self.now).servers
        no_slot = all(
            server.in_backoff
            or (
                cap is not None
                and server.idle + server.borrowed + server.dialing + server.shared >= cap
            )
            for server in servers
        )
        for server in servers:
            if not server.in_backoff:
                assert server.idle == 0
        if any(not w.shared for w in self.queued):
            assert no_slot
        if any(w.shared for w in self.queued):
            share_cap = self.config.shared_leases_per_connection
            for conn, n, reason in self.core.shared_connections():
                if reason is not None or self.core.in_backoff(
                    self.urls.index(conn.server), self.now
                ):
                    continue
                if share_cap is not None and n >= share_cap:
                    continue
                # room on it: it must have gone bad since the waiter was queued
                assert not is_healthy(conn) or self.now >= (conn.expires_at or 0.0)
            shared_dial = any(t.shared for t in self.tickets) or any(
                isinstance(w.grant, DialTicket) and w.grant.shared for w in self.woken
            )
            assert no_slot or (shared_dial and share_cap != 1)

    @invariant()
    def stats_match_model(self) -> None:
        stats = self.core.stats(self.now)
        granted = [w.grant for w in self.woken if isinstance(w.grant, Lease)]
        tickets = [w.grant for w in self.woken if isinstance(w.grant, DialTicket)]
        held = self.held()
        assert stats.borrowed == sum(1 for le in held if not le.shared)
        assert stats.shared_leases == sum(1 for le in held if le.shared)
        assert stats.shared == len({le.conn.id for le in held if le.shared})
        assert stats.shared_borrows == self.shared_borrows
        assert len(held) == len(self.leases) + len(granted)
        assert stats.dialing == len(self.tickets) + len(tickets)
        assert stats.idle == sum(len(s) for s in self.idle)
        assert stats.waiting == len(self.queued)
        assert stats.created == self.created
        assert stats.reused == self.reused
        assert stats.closed.expired == self.closed[CloseReason.EXPIRED]
        assert stats.closed.unhealthy == self.closed[CloseReason.UNHEALTHY]
        assert stats.closed.overflow == self.closed[CloseReason.OVERFLOW]
        assert stats.closed.shutdown == self.closed[CloseReason.SHUTDOWN]
        assert stats.closed.total == self.created - len(self.live)
        assert stats.dial_failures == self.dial_failures
        assert stats.waits == self.waits
        assert stats.timeouts == self.timeouts
        assert stats.leaks_detected == self.leaks
        assert 0.0 <= stats.reuse_rate <= 1.0
        assert 0.0 <= stats.wait_time_max <= stats.wait_time_total + 1e-9
        for server in stats.servers:
            if server.in_backoff:
                assert server.next_retry_at is not None
                assert server.next_retry_at > self.now
                assert server.next_retry_at <= self.now + self.config.backoff_max


TestPoolCore = PoolCoreMachine.TestCase
