"""The pool's bookkeeping: a synchronous, I/O-free state machine.

Like httpcore's ``_assign_requests_to_connections``, every method here is a pure state
change taking the current time as a number; nothing awaits, sleeps or touches a socket.
What must happen afterwards (connections to close, waiting borrowers to wake, leaks to
report) is put in an *outbox* that the async layer (``_pool.py``) drains right after the
call, in the same synchronous step. That keeps one owner for every connection and every
slot at every instant, and lets a plain hypothesis state machine drive this module with a
fake clock and fake connections (``property_tests/``).

Ownership: a connection is in exactly one of

* a server's idle list (owned by the pool),
* an exclusive :class:`Lease` (owned by the borrower until :meth:`PoolCore.release`),
* shared service (owned by the pool, lent to one or more shared leases at once; it
  leaves shared service when its last shared lease is released),
* the close outbox (owned by whoever drains it; counted as closed already).

A connection is never in exclusive and shared use at once. A connection in shared service
always has at least one open shared lease; one that must not take new leases any more
(past its MaxLife, found unhealthy, or returned after an error from the connection) is
*retired*: it stays in shared service until its last lease is released, then it is closed
for that reason. Nothing but shutdown (:meth:`PoolCore.detach_all`) closes a connection
while a lease on it is open.

A slot being dialed is a :class:`DialTicket`, owned by the borrower until it calls
:meth:`PoolCore.dial_succeeded`, :meth:`PoolCore.dial_failed` or
:meth:`PoolCore.dial_aborted`. A borrower that must wait holds a :class:`Waiter`; when the
pool hands it something (``waiter.grant``) it is put in the wake outbox, and a waiter
cancelled at any point gives everything back (:meth:`PoolCore.cancel_waiter`).
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
import random
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, final

from ._backoff import backoff_delay
from ._errors import PoolClosedError
from ._metrics import EMPTY, Histogram, LatencySnapshot

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._config import PoolConfig

__all__ = [
    "CloseReason",
    "CloseStats",
    "DialTicket",
    "Lease",
    "PoolCore",
    "PoolStats",
    "ServerStats",
    "Waiter",
]

C = TypeVar("C")

_new_lease = object.__new__


def _borrowed_at(lease: Lease[Any]) -> float:
    return lease.borrowed_at


class CloseReason(enum.Enum):
    """Why the pool closed a connection."""

    EXPIRED = "expired"
    """Past its MaxLife (retired from idle, or on return)."""
    UNHEALTHY = "unhealthy"
    """Not connected / closed / draining, or returned after an error from the connection."""
    OVERFLOW = "overflow"
    """Returned while its server's idle list was full."""
    SHUTDOWN = "shutdown"
    """The pool was closing."""


@final
@dataclass(frozen=True, slots=True)
class ServerStats:
    """One server's share of the pool.

    Attributes:
        url: the server's URL, credentials redacted (``nats://***@host:4222``).
        idle: idle connections.
        borrowed: connections lent out.
        dialing: dials in progress.
        in_backoff: True while the server is avoided after a dial failure.
        next_retry_at: when the backoff ends (Trio clock), or None when not in backoff.
        consecutive_failures: dial failures since the last success.
        shared: connections in shared service (lent to shared leases), retired ones
            included.
        shared_leases: shared leases open on this server's connections.
    """

    url: str
    idle: int
    borrowed: int
    dialing: int
    in_backoff: bool
    next_retry_at: float | None
    consecutive_failures: int
    shared: int = 0
    shared_leases: int = 0


@final
@dataclass(frozen=True, slots=True)
class CloseStats:
    """Connections closed by the pool, by reason (see :class:`CloseReason`).

    Attributes:
        expired: past their MaxLife.
        unhealthy: broken, or returned after an error from the connection.
        overflow: returned while the idle list was full.
        shutdown: closed because the pool closed.
    """

    expired: int
    unhealthy: int
    overflow: int
    shutdown: int

    @property
    def total(self) -> int:
        """All closes."""
        return self.expired + self.unhealthy + self.overflow + self.shutdown


@final
@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of a pool's state and counters (``pool.stats()``).

    Attributes:
        servers: per-server state, in the order of ``PoolConfig.servers``, then the
            servers discovered from the cluster, in discovery order.
        idle: idle connections, all servers.
        borrowed: connections lent out exclusively (``borrow()``), all servers.
        dialing: dials in progress, all servers.
        waiting: borrowers waiting in the FIFO queue now (exclusive and shared).
        created: connections dialed successfully.
        reused: borrows served by a connection that already existed (an idle one, or
            one already in shared service).
        reuse_rate: ``reused / (reused + created)``, 0.0 before the first borrow.
        closed: connections closed, by reason.
        dial_failures: dials that failed (each put its server in backoff).
        waits: borrows that had to queue.
        wait_time_total: seconds spent queued, summed over those borrows.
        wait_time_max: the longest time one borrow spent queued.
        timeouts: borrows that failed with :class:`trionats.PoolTimeoutError`.
        leaks_detected: leases held past ``leak_timeout`` (each counted once).
        closing: True once the pool is shutting down.
        shared: connections in shared service (``borrow(shared=True)``), all servers,
            retired ones (no new leases; closed when their last lease returns) included.
        shared_leases: shared leases open now, all servers.
        shared_borrows: shared leases handed out since the pool opened.
        wait_time: the time queued borrows waited, as a histogram (p50/p90/p99/max; see
            :class:`trionats.LatencySnapshot` for the error bound).
    """

    servers: tuple[ServerStats, ...]
    idle: int
    borrowed: int
    dialing: int
    waiting: int
    created: int
    reused: int
    reuse_rate: float
    closed: CloseStats
    dial_failures: int
    waits: int
    wait_time_total: float
    wait_time_max: float
    timeouts: int
    leaks_detected: int
    closing: bool
    shared: int = 0
    shared_leases: int = 0
    shared_borrows: int = 0
    wait_time: LatencySnapshot = EMPTY


@final
class _Entry(Generic[C]):
    """One live connection and its fixed facts."""

    __slots__ = ("alive", "born", "conn", "expires_at", "id", "retired", "server", "shares")

    def __init__(self, id: int, server: int, conn: C, born: float, expires_at: float) -> None:
        self.id = id
        self.server = server
        self.conn = conn
        self.born = born
        self.expires_at = expires_at
        self.alive = True  # False once handed to the close outbox
        self.shares = 0  # open shared leases; > 0 exactly while in shared service
        self.retired: CloseReason | None = None  # in shared service, taking no new leases

    def __lt__(self, other: _Entry[C]) -> bool:  # for heap ties
        return self.id < other.id


class Lease(Generic[C]):
    """A borrowed connection. Owned by the borrower until released.

    Attributes:
        conn: the connection.
        server: index of its server in ``PoolConfig.servers``.
        born: when the connection was created (pool clock).
        expires_at: when it reaches its MaxLife.
        borrowed_at: when this lease began.
        reused: True if the connection already existed (False: freshly dialed).
        shared: True for a shared lease (``borrow(shared=True)``): other shared leases
            may be on the same connection at the same time.
        holder: opaque information about the borrower (the async layer's borrow site:
            the calling frame and its instruction offset).
        leak_reported: True once reported as a leak.
        revoked: set by the async layer when it cancels the holder (leak or shutdown).
        detached: True when the pool gave up waiting for it at shutdown and closed the
            connection itself; releasing it later is then a no-op.
        token: free for the async layer (its cancel scope).

    No ``__slots__`` on purpose: the fields below that have a default are class
    attributes until a lease changes one, so the shared hot path
    (:meth:`PoolCore.share_into`) fills a lease with three stores. The async layer's
    ``Borrow`` is a subclass: on that path it is its own lease.
    """

    conn: C
    borrowed_at: float
    holder: Any
    _entry: _Entry[C]
    reused: bool = True
    shared: bool = True
    leak_reported: bool = False
    revoked: str | None = None
    detached: bool = False
    released: bool = False
    token: Any = None

    def __init__(
        self, entry: _Entry[C], now: float, reused: bool, holder: Any, shared: bool = False
    ) -> None:
        self._entry = entry
        self.conn = entry.conn
        self.borrowed_at = now
        self.holder = holder
        if not reused:
            self.reused = False
        if not shared:
            self.shared = False

    @property
    def server(self) -> int:
        return self._entry.server

    @property
    def born(self) -> float:
        return self._entry.born

    @property
    def expires_at(self) -> float:
        return self._entry.expires_at


@final
class DialTicket:
    """Permission to dial one server: a reserved slot, owned by the borrower.

    Attributes:
        server: index of the server to dial.
        started_at: when the slot was reserved.
        holder: the borrower's opaque information.
        shared: the connection goes into shared service (a shared borrower dials it).
        token: free for the async layer (the dial's cancel scope).
    """

    __slots__ = ("done", "holder", "id", "server", "shared", "started_at", "token")

    def __init__(self, id: int, server: int, now: float, holder: Any, shared: bool = False) -> None:
        self.id = id
        self.server = server
        self.started_at = now
        self.holder = holder
        self.shared = shared
        self.done = False
        self.token: Any = None


Grant = Lease[Any] | DialTicket


@final
class Waiter:
    """A borrower queued for a connection or a dial slot.

    Attributes:
        grant: None while queued; then the :class:`Lease` or :class:`DialTicket` handed
            over, or a :class:`PoolClosedError` when the pool closed.
        enqueued_at: when it started waiting.
        holder: the borrower's opaque information.
        shared: a shared borrower (it is granted a shared lease or a shared dial).
        token: free for the async layer (the parked Trio task).
    """

    __slots__ = ("enqueued_at", "grant", "holder", "id", "queued", "shared", "token")

    def __init__(self, id: int, now: float, holder: Any, shared: bool = False) -> None:
        self.id = id
        self.enqueued_at = now
        self.holder = holder
        self.shared = shared
        self.grant: Lease[Any] | DialTicket | PoolClosedError | None = None
        self.queued = True
        self.token: Any = None


@final
class _Server(Generic[C]):
    __slots__ = (
        "borrowed",
        "dialing",
        "failures",
        "idle",
        "retry_at",
        "shared",
        "url",
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self.idle: list[_Entry[C]] = []  # LIFO: append and pop at the end
        self.borrowed = 0
        self.dialing = 0
        self.shared = 0  # connections in shared service (retired ones included)
        self.failures = 0
        self.retry_at = -math.inf

    @property
    def open(self) -> int:
        return len(self.idle) + self.borrowed + self.dialing + self.shared


@final
class PoolCore(Generic[C]):
    """The pool's state: idle lists, leases, shared service, dial slots, waiters, backoff
    and counters.

    Args:
        config: the pool's configuration.
        is_healthy: a cheap, synchronous health check of a connection (connected, not
            closed, not draining). Called when a connection leaves the idle list, when it
            is returned, and on each shared borrow for the connection picked.
        rng: the random source for server choice, life jitter and backoff jitter.

    After each call, drain :attr:`to_close` (connections to close, already counted) and
    :attr:`to_wake` (waiters whose ``grant`` is set) and :attr:`new_leaks`.
    """

    def __init__(
        self,
        config: PoolConfig,
        *,
        is_healthy: Callable[[C], bool],
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._healthy = is_healthy
        self._rng = rng if rng is not None else random.Random()
        self._servers: list[_Server[C]] = [_Server(url.display) for url in config.servers]
        self._idle_max = config.idle_per_server
        self._max_open = config.max_per_server if config.max_per_server is not None else -1
        cap = config.shared_leases_per_connection
        self._share_cap = cap if cap is not None else -1
        self._ids = itertools.count(1)
        # Every lease lent out (exclusive and shared) is in exactly one of these two
        # insertion-ordered sets: the leak scan looks at the head of the first only.
        self._unreported: dict[Lease[C], None] = {}  # borrow order; may still leak
        self._quiet: dict[Lease[C], None] = {}  # reported as a leak, or exempt
        self._leak_timeout = config.leak_timeout
        self._tickets: dict[int, DialTicket] = {}
        self._waiters: deque[Waiter] = deque()
        self._waiting_shared = 0  # shared waiters in _waiters
        self._expiry: list[tuple[float, _Entry[C]]] = []  # heap over live connections
        self._shared: list[_Entry[C]] = []  # in shared service, taking leases
        self._retired: dict[int, _Entry[C]] = {}  # in shared service, taking no leases
        self.closing = False
        self.wake_at = math.inf
        """Earliest deadline created since the async layer last looked (a cheap hint)."""
        # outbox
        self.to_close: list[tuple[C, CloseReason]] = []
        self.to_wake: list[Waiter] = []
        self.new_leaks: list[Lease[C]] = []
        # counters
        self._idle_total = 0
        self._borrowed_total = 0
        self._dialing_total = 0
        self._shared_dialing = 0
        self.shared_borrows = 0
        self.created = 0
        self.reused = 0
        self._closed = dict.fromkeys(CloseReason, 0)
        self.dial_failures = 0
        self.waits = 0
        self.wait_time_total = 0.0
        self.wait_time_max = 0.0
        self.wait_times = Histogram()
        self.timeouts = 0
        self.leaks_detected = 0

    def add_server(self, url: str) -> int:
        """Add a server (one a cluster announced); returns its index. New borrowers may
        dial it at once; waiters are served if it gives them a dial slot."""
        self._servers.append(_Server(url))
        return len(self._servers) - 1

    # -- queries -------------------------------------------------------------------------
    @property
    def borrowed(self) -> int:
        """Exclusive leases open."""
        return self._borrowed_total

    @property
    def shared_leases(self) -> int:
        """Shared leases open."""
        return sum(e.shares for e in self._shared) + sum(e.shares for e in self._retired.values())

    @property
    def dialing(self) -> int:
        return self._dialing_total

    @property
    def idle(self) -> int:
        return self._idle_total

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def leases(self) -> list[Lease[C]]:
        """The leases lent out now (exclusive and shared), oldest first."""
        return sorted([*self._unreported, *self._quiet], key=_borrowed_at)

    def tickets(self) -> list[DialTicket]:
        """The dials in progress."""
        return list(self._tickets.values())

    def idle_connections(self, server: int) -> list[C]:
        """A server's idle connections, oldest first (the next borrow takes the last)."""
        return [e.conn for e in self._servers[server].idle]

    def shared_connections(self) -> list[tuple[C, int, CloseReason | None]]:
        """The connections in shared service: (connection, open shared leases, why it is
        retired or None when it still takes leases)."""
        entries = self._shared + list(self._retired.values())
        return [(e.conn, e.shares, e.retired) for e in entries]

    def in_backoff(self, server: int, now: float) -> bool:
        return self._servers[server].retry_at > now

    def next_deadline(self) -> float:
        """The earliest time :meth:`tick` has something to do (``math.inf``: nothing)."""
        expiry = self._expiry
        while expiry and not expiry[0][1].alive:
            heapq.heappop(expiry)
        deadline = expiry[0][0] if expiry else math.inf
        if self._unreported:
            first = next(iter(self._unreported))
            deadline = min(deadline, first.borrowed_at + self._leak_timeout)
        if self._waiters:
            for server in self._servers:
                if server.retry_at > -math.inf:
                    deadline = min(deadline, server.retry_at)
        return deadline

    def stats(self, now: float) -> PoolStats:
        in_service = self._shared + list(self._retired.values())
        servers = tuple(
            ServerStats(
                url=s.url,
                idle=len(s.idle),
                borrowed=s.borrowed,
                dialing=s.dialing,
                in_backoff=s.retry_at > now,
                next_retry_at=s.retry_at if s.retry_at > now else None,
                consecutive_failures=s.failures,
                shared=s.shared,
                shared_leases=sum(e.shares for e in in_service if e.server == index),
            )
            for index, s in enumerate(self._servers)
        )
        served = self.reused + self.created
        closed = self._closed
        return PoolStats(
            servers=servers,
            idle=self._idle_total,
            borrowed=self._borrowed_total,
            dialing=self._dialing_total,
            waiting=len(self._waiters),
            created=self.created,
            reused=self.reused,
            reuse_rate=self.reused / served if served else 0.0,
            closed=CloseStats(
                expired=closed[CloseReason.EXPIRED],
                unhealthy=closed[CloseReason.UNHEALTHY],
                overflow=closed[CloseReason.OVERFLOW],
                shutdown=closed[CloseReason.SHUTDOWN],
            ),
            dial_failures=self.dial_failures,
            waits=self.waits,
            wait_time_total=self.wait_time_total,
            wait_time_max=self.wait_time_max,
            wait_time=self.wait_times.snapshot(),
            timeouts=self.timeouts,
            leaks_detected=self.leaks_detected,
            closing=self.closing,
            shared=len(self._shared) + len(self._retired),
            shared_leases=sum(e.shares for e in in_service),
            shared_borrows=self.shared_borrows,
        )

    def exempt_from_leak_detection(self, lease: Lease[C]) -> None:
        """A lease meant to be held for long (a subscriber's connection) is never a leak."""
        if lease in self._unreported:
            del self._unreported[lease]
            self._quiet[lease] = None

    # -- internals -----------------------------------------------------------------------
    def _close(self, entry: _Entry[C], reason: CloseReason) -> None:
        entry.alive = False
        self._closed[reason] += 1
        self.to_close.append((entry.conn, reason))

    def _register(self, lease: Lease[C], now: float) -> None:
        self._unreported[lease] = None
        leak_at = now + self._leak_timeout
        if leak_at < self.wake_at:
            self.wake_at = leak_at

    def _lend(self, entry: _Entry[C], now: float, reused: bool, holder: Any) -> Lease[C]:
        lease = Lease(entry, now, reused, holder)
        self._register(lease, now)
        self._servers[entry.server].borrowed += 1
        self._borrowed_total += 1
        if reused:
            self.reused += 1
        return lease

    def _share(self, entry: _Entry[C], now: float, reused: bool, holder: Any) -> Lease[C]:
        """A shared lease on ``entry`` (put into shared service first if it is not)."""
        server = self._servers[entry.server]
        if not entry.shares:
            self._shared.append(entry)
            server.shared += 1
        entry.shares += 1
        self.shared_borrows += 1
        lease = Lease(entry, now, reused, holder, True)
        self._register(lease, now)
        if reused:
            self.reused += 1
        return lease

    def _retire(self, entry: _Entry[C], reason: CloseReason) -> None:
        """A connection in shared service takes no new leases; it is closed for ``reason``
        when its last lease is released."""
        if entry.retired is None:
            entry.retired = reason
            self._shared.remove(entry)
            self._retired[entry.id] = entry

    def _pop_idle(self, now: float) -> _Entry[C] | None:
        """A healthy, young idle connection of a server not in backoff (closing the bad
        ones met on the way), or None."""
        servers = self._servers
        while True:
            if len(servers) == 1:
                s0 = servers[0]
                with_idle = [0] if s0.idle and s0.retry_at <= now else []
            else:
                with_idle = [i for i, s in enumerate(servers) if s.idle and s.retry_at <= now]
            if not with_idle:
                return None
            index = with_idle[0] if len(with_idle) == 1 else self._rng.choice(with_idle)
            server = servers[index]
            entry = server.idle.pop()
            self._idle_total -= 1
            if entry.expires_at <= now:
                self._close(entry, CloseReason.EXPIRED)
            elif not self._healthy(entry.conn):
                self._close(entry, CloseReason.UNHEALTHY)
            else:
                return entry

    def _dial_slot(self, now: float, holder: Any, shared: bool) -> DialTicket | None:
        servers = self._servers
        max_open = self._max_open
        can_dial = [
            i
            for i, s in enumerate(servers)
            if s.retry_at <= now and (max_open < 0 or s.open < max_open)
        ]
        if not can_dial:
            return None
        index = can_dial[0] if len(can_dial) == 1 else self._rng.choice(can_dial)
        ticket = DialTicket(next(self._ids), index, now, holder, shared)
        servers[index].dialing += 1
        self._dialing_total += 1
        if shared:
            self._shared_dialing += 1
        self._tickets[ticket.id] = ticket
        return ticket

    def _try_grant(self, now: float, holder: Any) -> Grant | None:
        """An idle connection or a dial slot, or None when the borrower must wait."""
        entry = self._pop_idle(now)
        if entry is not None:
            return self._lend(entry, now, True, holder)
        return self._dial_slot(now, holder, False)

    def _least_loaded(self, now: float) -> _Entry[C] | None:
        """The connection in shared service to put the next shared lease on: the fewest
        open leases, below the cap, its server not in backoff; on a tie the one that
        lives longest. Unhealthy or expired candidates are retired on the way."""
        shared = self._shared
        cap = self._share_cap
        servers = self._servers
        while shared:
            best: _Entry[C] | None = None
            for entry in shared:
                if cap > 0 and entry.shares >= cap:
                    continue
                if servers[entry.server].retry_at > now:
                    continue
                if (
                    best is None
                    or entry.shares < best.shares
                    or (entry.shares == best.shares and entry.expires_at > best.expires_at)
                ):
                    best = entry
            if best is None:
                return None
            if best.expires_at <= now:
                self._retire(best, CloseReason.EXPIRED)
            elif not self._healthy(best.conn):
                self._retire(best, CloseReason.UNHEALTHY)
            else:
                return best
        return None

    def _try_grant_shared(self, now: float, holder: Any) -> Grant | None:
        """A shared lease on the least-loaded connection in shared service, else on an
        idle connection (which goes into shared service), else nothing while a shared
        dial is in progress (unless ``shared_leases_per_connection`` is 1): the borrower
        waits for that connection, else a shared dial slot; None when the borrower must
        wait. With a cap above 1 and a burst of shared borrowers, dials therefore run one
        at a time, each serving up to the cap (a known limit: many borrowers arriving
        together under a small cap wait for several dials in a row)."""
        entry = self._least_loaded(now)
        if entry is not None:
            return self._share(entry, now, True, holder)
        entry = self._pop_idle(now)
        if entry is not None:
            return self._share(entry, now, True, holder)
        if self._shared_dialing and self._share_cap != 1:
            return None  # a connection on its way will take this borrower too
        return self._dial_slot(now, holder, True)

    def _end_wait(self, waiter: Waiter, now: float) -> None:
        waiter.queued = False
        if waiter.shared:
            self._waiting_shared -= 1
        waited = max(0.0, now - waiter.enqueued_at)
        self.wait_time_total += waited
        if waited > self.wait_time_max:
            self.wait_time_max = waited
        self.wait_times.record(waited)

    def _assign_waiters(self, now: float) -> None:
        """Hand what is available to the waiters, first come first served within each
        kind (exclusive, shared).

        The kinds do not overtake each other for anything both could use: an exclusive
        waiter that cannot be served means no idle connection and no dial slot, so a
        shared waiter behind it can only join a connection already in shared service; a
        shared waiter that cannot be served took no idle connection either.
        """
        waiters = self._waiters
        excl_blocked = len(waiters) == self._waiting_shared
        shared_blocked = not self._waiting_shared
        i = 0
        while i < len(waiters) and not (excl_blocked and shared_blocked):
            waiter = waiters[i]
            if waiter.shared:
                if shared_blocked:
                    i += 1
                    continue
                grant = self._try_grant_shared(now, waiter.holder)
                if grant is None:
                    shared_blocked = True
                    i += 1
                    continue
            else:
                if excl_blocked:
                    i += 1
                    continue
                grant = self._try_grant(now, waiter.holder)
                if grant is None:
                    excl_blocked = True
                    i += 1
                    continue
            del waiters[i]
            self._end_wait(waiter, now)
            waiter.grant = grant
            self.to_wake.append(waiter)

    # -- borrowing -----------------------------------------------------------------------
    def request(
        self, now: float, holder: Any = None, *, retry: bool = False, shared: bool = False
    ) -> Grant | Waiter:
        """A borrower asks for a connection (``shared=True``: a shared lease).

        Returns a :class:`Lease` (an idle hit, or a place on a connection in shared
        service), a :class:`DialTicket` (dial, then report the outcome), or a queued
        :class:`Waiter` (wait until ``waiter.grant`` is set and it is in :attr:`to_wake`,
        or cancel it). Waiters are served FIFO within each kind: while a borrower of the
        same kind is queued, a new request queues behind it. ``retry=True`` (a borrower
        whose dial just failed) queues at the front instead, keeping its place.

        Raises:
            PoolClosedError: the pool is closing.
        """
        if self.closing:
            raise PoolClosedError("the pool is closed")
        if self._waiters and len(self._waiters) != self._waiting_shared and shared:
            # Exclusive waiters first, for anything that became free by time alone (a
            # backoff that ended before the housekeeper's tick).
            self._assign_waiters(now)
        elif self._waiting_shared and not shared:
            self._assign_waiters(now)
        if shared:
            if not self._waiting_shared:
                grant = self._try_grant_shared(now, holder)
                if grant is not None:
                    return grant
        elif len(self._waiters) == self._waiting_shared:
            grant = self._try_grant(now, holder)
            if grant is not None:
                return grant
        waiter = Waiter(next(self._ids), now, holder, shared)
        if retry:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        if shared:
            self._waiting_shared += 1
        self.waits += 1
        self._assign_waiters(now)
        if waiter.queued:
            for server in self._servers:
                if now < server.retry_at < self.wake_at:
                    self.wake_at = server.retry_at
        return waiter

    def share_now(self, now: float, holder: Any = None) -> Lease[C] | None:
        """The hot path of ``request(shared=True)``: a shared lease on the one connection
        in shared service when it can take it as it is, else None (then call
        :meth:`request`). Never queues, dials, retires or closes anything."""
        lease: Lease[C] = _new_lease(Lease)
        lease.holder = holder
        return lease if self.share_into(now, lease) else None

    def share_into(self, now: float, lease: Lease[C]) -> bool:
        """:meth:`share_now` into a record the caller made: ``lease`` is a :class:`Lease`
        (or subclass) never lent before, with its ``holder`` set and the other fields at
        their class defaults. True: it is now a shared lease (``conn``, ``borrowed_at``
        set); False: nothing changed (then call :meth:`request`)."""
        shared = self._shared
        if len(shared) != 1 or self._waiting_shared or self.closing:
            return False
        entry = shared[0]
        shares = entry.shares
        if (
            shares == self._share_cap
            or entry.expires_at <= now
            or self._servers[entry.server].retry_at > now
            or not self._healthy(entry.conn)
        ):
            return False
        entry.shares = shares + 1
        self.shared_borrows += 1
        self.reused += 1
        lease._entry = entry
        lease.conn = entry.conn
        lease.borrowed_at = now
        self._unreported[lease] = None
        leak_at = now + self._leak_timeout
        if leak_at < self.wake_at:
            self.wake_at = leak_at
        return True

    def unshare_now(self, lease: Lease[C]) -> bool:
        """The hot path of :meth:`release` for a shared lease (not suspect) that is not the
        last on its connection, with no shared borrower waiting: True when done, False
        (nothing changed) when :meth:`release` must do it."""
        entry = lease._entry
        if entry.shares < 2 or self._waiting_shared:  # (0 for an exclusive lease)
            return False
        try:
            # Only a lease still open and neither reported as a leak nor exempt is here.
            del self._unreported[lease]
        except KeyError:
            return False
        lease.released = True
        entry.shares -= 1
        return True

    def cancel_waiter(self, waiter: Waiter, now: float) -> None:
        """A waiting borrower gave up (cancelled or timed out); nothing stays reserved.

        Safe at any point: still queued (it leaves the queue), or already granted but not
        yet resumed (the lease goes back as if returned unused; the dial slot is freed).
        """
        if waiter.queued:
            self._waiters.remove(waiter)
            self._end_wait(waiter, now)
            return
        grant = waiter.grant
        waiter.grant = None
        if isinstance(grant, Lease):
            if grant.reused:
                self.reused -= 1  # it was never used: not a reuse
            if grant.shared:
                self.shared_borrows -= 1
            self.release(grant, now)
        elif isinstance(grant, DialTicket):
            self.dial_aborted(grant, now)

    def record_timeout(self) -> None:
        """Count a borrow that failed with PoolTimeoutError."""
        self.timeouts += 1

    def dial_succeeded(self, ticket: DialTicket, conn: C, now: float) -> Lease[C] | None:
        """The dial of ``ticket`` produced ``conn``: it becomes the borrower's lease (a
        shared one, the connection going into shared service, for a shared ticket).

        Resets the server's backoff. Returns None when the pool started closing meanwhile
        (the connection is then in the close outbox).
        """
        self._end_dial(ticket)
        server = self._servers[ticket.server]
        server.failures = 0
        server.retry_at = -math.inf
        cfg = self.config
        jitter = cfg.max_life_jitter
        life = cfg.max_life * (1.0 + self._rng.uniform(-jitter, jitter)) if jitter else cfg.max_life
        entry = _Entry(next(self._ids), ticket.server, conn, now, now + life)
        self.created += 1
        if self.closing:
            self._close(entry, CloseReason.SHUTDOWN)
            return None
        heapq.heappush(self._expiry, (entry.expires_at, entry))
        if entry.expires_at < self.wake_at:
            self.wake_at = entry.expires_at
        if ticket.shared:
            lease = self._share(entry, now, False, ticket.holder)
        else:
            lease = self._lend(entry, now, False, ticket.holder)
        if self._waiters:
            # The server just came out of backoff: borrowers queued meanwhile can dial it;
            # shared borrowers waiting for this connection join it.
            self._assign_waiters(now)
        return lease

    def dial_failed(self, ticket: DialTicket, now: float) -> float:
        """The dial of ``ticket`` failed: put its server in backoff. Returns the delay."""
        self._end_dial(ticket)
        server = self._servers[ticket.server]
        server.failures += 1
        cfg = self.config
        delay = backoff_delay(server.failures, cfg.backoff_min, cfg.backoff_max, self._rng)
        server.retry_at = max(server.retry_at, now + delay)
        if server.retry_at < self.wake_at:
            self.wake_at = server.retry_at
        self.dial_failures += 1
        self._assign_waiters(now)
        return delay

    def dial_aborted(self, ticket: DialTicket, now: float) -> None:
        """The dial was cancelled (not the server's fault): free the slot, no backoff."""
        self._end_dial(ticket)
        self._assign_waiters(now)

    def _end_dial(self, ticket: DialTicket) -> None:
        if ticket.done:
            raise RuntimeError("dial ticket used twice")
        ticket.done = True
        del self._tickets[ticket.id]
        self._servers[ticket.server].dialing -= 1
        self._dialing_total -= 1
        if ticket.shared:
            self._shared_dialing -= 1

    def release(self, lease: Lease[C], now: float, *, suspect: bool = False) -> None:
        """The borrower gives the connection back.

        Exclusive lease: the connection goes to its server's idle list if healthy, young
        and there is room; else it is closed (reason in the outbox). ``suspect=True`` (an
        error from the connection) closes it as unhealthy without a second look.

        Shared lease: the connection stays in shared service while other shared leases
        are open on it (``suspect=True`` retires it: no new leases); the last lease out
        returns it like an exclusive lease, or closes it for the reason it was retired.
        """
        if lease.released:
            raise RuntimeError("lease released twice")
        lease.released = True
        if lease.detached:
            return
        try:
            del self._unreported[lease]
        except KeyError:
            del self._quiet[lease]
        entry = lease._entry
        server = self._servers[entry.server]
        if lease.shared:
            if suspect:
                self._retire(entry, CloseReason.UNHEALTHY)
            entry.shares -= 1
            if entry.shares:
                if (
                    self._waiting_shared
                    and entry.retired is None
                    and entry.shares == self._share_cap - 1
                ):
                    self._assign_waiters(now)  # room again below the cap
                return
            # The last shared lease: the connection leaves shared service.
            server.shared -= 1
            if entry.retired is not None:
                del self._retired[entry.id]
                if not self.closing:
                    self._close(entry, entry.retired)
                    if self._waiters:
                        self._assign_waiters(now)  # a slot freed for a dial
                    return
            else:
                self._shared.remove(entry)
            suspect = False  # a suspect release retired it above
        else:
            server.borrowed -= 1
            self._borrowed_total -= 1
        if self.closing:
            self._close(entry, CloseReason.SHUTDOWN)
        elif suspect or not self._healthy(entry.conn):
            self._close(entry, CloseReason.UNHEALTHY)
        elif entry.expires_at <= now:
            self._close(entry, CloseReason.EXPIRED)
        elif self._waiters and server.retry_at <= now:
            # Straight to the first waiter: it was queued before anyone who could pop it.
            server.idle.append(entry)
            self._idle_total += 1
            self._assign_waiters(now)
            return
        elif len(server.idle) >= self._idle_max:
            self._close(entry, CloseReason.OVERFLOW)
        else:
            server.idle.append(entry)
            self._idle_total += 1
            return
        if self._waiters:
            self._assign_waiters(now)

    # -- time ----------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Do what is due at ``now``: retire expired idle connections (and expired ones in
        shared service: no new leases), detect leaks, and serve waiters whose servers came
        out of backoff."""
        expiry = self._expiry
        retired = False
        while expiry and (expiry[0][0] <= now or not expiry[0][1].alive):
            _, entry = heapq.heappop(expiry)
            if not entry.alive:
                continue
            server = self._servers[entry.server]
            # A borrowed connection is never closed for age: it is retired on return.
            if entry.shares:
                self._retire(entry, CloseReason.EXPIRED)
            elif entry in server.idle:
                server.idle.remove(entry)
                self._idle_total -= 1
                self._close(entry, CloseReason.EXPIRED)
                retired = True
        leak_timeout = self._leak_timeout
        unreported = self._unreported
        while unreported:
            lease = next(iter(unreported))
            if lease.borrowed_at + leak_timeout > now:
                break
            del unreported[lease]
            self._quiet[lease] = None
            lease.leak_reported = True
            self.leaks_detected += 1
            self.new_leaks.append(lease)
        for server in self._servers:
            if server.retry_at <= now:
                server.retry_at = -math.inf  # out of backoff (failures count until a success)
        if self._waiters or retired:
            self._assign_waiters(now)

    # -- shutdown ------------------------------------------------------------------------
    def close(self, now: float) -> None:
        """Start shutting down: close idle connections, fail the waiters.

        Leases and dials in progress finish normally; their connections are closed when
        they come back (a shared connection when its last lease comes back).
        """
        if self.closing:
            return
        self.closing = True
        for server in self._servers:
            while server.idle:
                self._close(server.idle.pop(), CloseReason.SHUTDOWN)
        self._idle_total = 0
        while self._waiters:
            waiter = self._waiters.popleft()
            self._end_wait(waiter, now)
            waiter.grant = PoolClosedError("the pool closed while waiting for a connection")
            self.to_wake.append(waiter)

    def detach_all(self) -> None:
        """Give up on the leases still out: close their connections now (shutdown)."""
        leases = self.leases()
        self._unreported.clear()
        self._quiet.clear()
        for lease in leases:
            lease.detached = True
            entry = lease._entry
            server = self._servers[entry.server]
            if lease.shared:
                entry.shares -= 1
                if entry.shares:
                    continue
                server.shared -= 1
                if entry.retired is not None:
                    del self._retired[entry.id]
                else:
                    self._shared.remove(entry)
            else:
                server.borrowed -= 1
                self._borrowed_total -= 1
            self._close(entry, CloseReason.SHUTDOWN)

    def check(self) -> None:
        """Verify the internal counts (tests call this; cheap enough for debugging)."""
        idle = sum(len(s.idle) for s in self._servers)
        borrowed = sum(s.borrowed for s in self._servers)
        dialing = sum(s.dialing for s in self._servers)
        assert idle == self._idle_total, (idle, self._idle_total)
        assert not self._unreported.keys() & self._quiet.keys()
        leases = self.leases()
        for lease in leases:
            assert not lease.released
            assert not lease.detached
            if lease.leak_reported:
                assert lease in self._quiet
            assert lease.conn is lease._entry.conn
        exclusive = [le for le in leases if not le.shared]
        assert borrowed == self._borrowed_total == len(exclusive)
        assert dialing == self._dialing_total == len(self._tickets)
        assert self._shared_dialing == sum(t.shared for t in self._tickets.values())
        assert self._waiting_shared == sum(w.shared for w in self._waiters)
        in_service = self._shared + list(self._retired.values())
        assert sum(s.shared for s in self._servers) == len(in_service)
        for entry in self._shared:
            assert entry.retired is None
        for entry in self._retired.values():
            assert entry.retired is not None
        seen: set[int] = set()
        for server in self._servers:
            assert len(server.idle) <= self._idle_max
            for entry in server.idle:
                assert entry.alive
                assert entry.shares == 0
                assert entry.id not in seen
                seen.add(entry.id)
        for lease in exclusive:
            assert lease._entry.alive
            assert lease._entry.shares == 0
            assert lease._entry.id not in seen
            seen.add(lease._entry.id)
        shares: dict[int, int] = {}
        for lease in leases:
            if lease.shared:
                shares[lease._entry.id] = shares.get(lease._entry.id, 0) + 1
        for entry in in_service:
            assert entry.alive
            assert entry.id not in seen
            seen.add(entry.id)
            assert entry.shares == shares.pop(entry.id, 0) >= 1
            if self._share_cap > 0:
                assert entry.shares <= self._share_cap
        assert not shares
        for index, server in enumerate(self._servers):
            assert server.shared == sum(1 for e in in_service if e.server == index)
