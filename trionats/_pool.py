"""The connection pool: ``open_pool`` and ``Pool.borrow``.

Layering: this module drives the synchronous bookkeeping in ``_pool_core`` and does the
I/O it asks for (dial, close, wake a waiting task, log a leak). Every core call is
followed, in the same synchronous step, by :meth:`Pool._drain`, so a grant and the wake-up
of its borrower can never be separated by a cancel.

Returning a connection (``__aexit__`` of ``borrow``), the choice made here:

* the block finished normally: the connection is health-checked (connected, not closed,
  not draining) and kept if young and there is room;
* the block was cancelled, or raised an exception unrelated to the connection (a user
  error): the same health check, then reuse. trionats operations are cancel-safe (a
  cancelled ``request`` discards its late reply; a cancelled ``publish`` sent nothing), so
  a healthy connection is not poisoned by a cancel;
* the block raised a :class:`trionats.TrionatsError` or :class:`OSError` (or an exception
  group containing one): the connection is *suspect* and closed without a second look.
  Exceptions that do not speak about the connection are the exception:
  :class:`~trionats.NoRespondersError` (a 503 proves the connection works) and the pool's
  own :class:`~trionats.PoolTimeoutError`, :class:`~trionats.PoolClosedError`,
  :class:`~trionats.LeaseExpiredError`.

Each borrower gets its own handle (:class:`LeasedConnection`), not the pooled
:class:`~trionats.Connection` itself: the same connection goes to the next borrower, so a
reference kept past the ``borrow`` block would otherwise silently keep working, even while
lent to someone else. The handle is invalidated when the block exits; any use after that
raises :class:`~trionats.ConnectionClosedError` ("this connection's lease has ended").

Why a generated subclass rather than hand-written forwarders or ``__getattr__``:

* it *is* a ``Connection`` (``isinstance`` holds, ``open_subscriber(handle)`` accepts it,
  mypy types it as ``Connection`` with no cast and no stub to keep in sync);
* its forwarders are generated at import from every function and property that
  ``Connection`` (and its bases) defines, so a method added later is forwarded without
  anyone remembering to (a test checks every public name);
* every method runs with ``self`` the real connection, so no state can split between
  handle and connection; the connection's other attributes go through ``__getattr__``;
* cost: each forwarder is a property whose getter is ``attrgetter("_borrow._conn.<name>")``,
  all in C: an access costs two attribute reads more than on the connection (a method
  access yields the connection's own bound method, as ``conn.publish`` does); a handle
  holds one slot (its ``Borrow``) and no ``__dict__``, so making one is one slot store and
  ending the lease is a plain store on the ``Borrow`` (a Python-level forwarder per call
  cost 17 % of publish throughput; a per-lease cache of bound methods cost more than the
  whole shared borrow). At the lease's end the ``Borrow``'s ``_conn`` becomes a sentinel
  whose every attribute raises. The one thing not invalidated: a bound method the caller
  took out during the lease (``pub = nc.publish``) is the connection's own.

``Connection`` is ``@final`` for users; this view is the one sanctioned subclass.

Pool-facing text (stats, log records, errors) shows server URLs redacted
(``nats://***@host:4222``): credentials only ever reach the dialer.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
import traceback
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from operator import attrgetter
from types import CodeType, FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Generic, NoReturn, Protocol, TypeVar, final, overload

import trio
from trio.lowlevel import (
    Abort,
    cancel_shielded_checkpoint,
    checkpoint_if_cancelled,
    current_task,
    reschedule,
    wait_task_rescheduled,
)

from ._connection import _DONE, Connection
from ._errors import (
    ConnectError,
    ConnectionClosedError,
    LeaseExpiredError,
    NoRespondersError,
    PoolClosedError,
    PoolTimeoutError,
    TrionatsError,
    reraise_unwrapped,
)
from ._pool_core import (
    CloseReason,
    CloseStats,
    DialTicket,
    Lease,
    PoolCore,
    PoolStats,
    ServerStats,
    Waiter,
)
from ._validate import ServerURL, check_bool, check_seconds, parse_servers, redact

if TYPE_CHECKING:
    import random
    from collections.abc import AsyncIterator, Awaitable, Callable

    from ._config import PoolConfig

__all__ = [
    "Borrow",
    "CloseReason",
    "CloseStats",
    "LeasedConnection",
    "Pool",
    "PoolStats",
    "PooledConnection",
    "ServerStats",
    "open_pool",
]

log = logging.getLogger("trionats.pool")


class PooledConnection(Protocol):
    """What the pool needs from a connection (``trionats.Connection`` has it all)."""

    @property
    def is_connected(self) -> bool: ...

    @property
    def is_closed(self) -> bool: ...

    @property
    def is_draining(self) -> bool: ...

    async def aclose(self) -> None: ...


C = TypeVar("C", bound=PooledConnection)

_Holder = tuple[FrameType, int]  # the frame that called borrow() and its f_lasti then

_NOT_ABOUT_THE_CONNECTION = (
    NoRespondersError,
    PoolTimeoutError,
    PoolClosedError,
    LeaseExpiredError,
)


def _is_healthy(conn: PooledConnection) -> bool:
    return conn.is_connected and not conn.is_closed and not conn.is_draining


def _is_healthy_connection(conn: Connection) -> bool:
    # _is_healthy for a trionats Connection, without its three properties (this runs on
    # every shared borrow): is_connected is `not _closed and client.is_connected`, and a
    # connected client is not closed.
    return not conn._closed and not conn._draining and conn._client.is_connected


def _is_suspect(exc: BaseException | None) -> bool:
    """Did the block fail in a way that speaks against the connection?"""
    if exc is None:
        return False
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_suspect(e) for e in exc.exceptions)
    if isinstance(exc, _NOT_ABOUT_THE_CONNECTION):
        return False
    return isinstance(exc, TrionatsError | OSError)


def _line_at(code: CodeType, lasti: int) -> int:
    """The line of the instruction at byte offset ``lasti`` (what ``f_lineno`` said then)."""
    for start, end, line in code.co_lines():
        if start <= lasti < end and line is not None:
            return line
    return code.co_firstlineno


def _find_task(frame: FrameType) -> trio.lowlevel.Task | None:
    """The task whose await stack runs ``frame`` (None when none does)."""
    root = trio.lowlevel.current_root_task()
    tasks = [root] if root is not None else []
    while tasks:
        task = tasks.pop()
        for f, _ in task.iter_await_frames():
            if f is frame:
                return task
        for nursery in task.child_nurseries:
            tasks.extend(nursery.child_tasks)
    return None


def _describe(holder: Any, task: trio.lowlevel.Task | None = None) -> tuple[str, str]:
    """The holder task's name and the stack (task root -> borrow site) where it borrowed.

    ``holder`` is ``(frame, lasti)``: the frame that called ``borrow`` and its position
    then. Reading ``f_lineno`` or ``current_task()`` on every borrow would cost more than
    a shared borrow's whole bookkeeping (``f_lineno`` walks the function's line table), so
    the line is computed here, and the task, when not given, is found by its frame.
    """
    frame, lasti = holder
    lineno = _line_at(frame.f_code, lasti)
    if task is None:
        task = _find_task(frame)
    frames: list[tuple[FrameType, int]] = []
    found = False
    if task is not None:
        for f, ln in task.iter_await_frames():
            if f is frame:
                frames.append((f, lineno))
                found = True
                break
            frames.append((f, ln))
    if not found:
        frames = [(frame, lineno)]
    stack = "".join(traceback.StackSummary.extract(frames, lookup_lines=True).format())
    name = task.name if task is not None else "(a task that no longer runs the borrow block)"
    return name, stack or "  (no stack)\n"


_LEASE_ENDED = "this connection's lease has ended (borrow block exited)"

_SECONDS_MAX = 2**53  # a timeout below it needs no check (an int is exact as a float)

BORROW_YIELD_EVERY = 64
"""Borrows served at once (an idle connection, or a shared lease; no wait) between two
full yields to the scheduler; each one still checks for cancellation."""


@final
class _LeaseEnded:
    """What a handle points at once its lease has ended: every attribute raises."""

    __slots__ = ()

    def __getattr__(self, name: str) -> NoReturn:
        raise ConnectionClosedError(_LEASE_ENDED)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise ConnectionClosedError(_LEASE_ENDED)

    def __delattr__(self, name: str) -> NoReturn:
        raise ConnectionClosedError(_LEASE_ENDED)


_ENDED: Any = _LeaseEnded()


class LeasedConnection(Connection):  # type: ignore[misc]  # the one view of a @final class
    """A borrower's handle on a pooled :class:`~trionats.Connection`, valid for one lease.

    Behaves as the connection itself (it is one, for ``isinstance`` and for mypy) until the
    ``borrow`` block exits; from then on every method and property (and attribute) raises
    :class:`~trionats.ConnectionClosedError`. Its methods are generated from
    ``Connection``'s (see the module docs); only ``repr`` works after the lease.
    """

    __slots__ = ("_borrow",)

    # The Borrow that made it: its _conn is the connection during the lease, then _ENDED,
    # so the lease's end is a plain store on the Borrow (none on the handle).
    _borrow: Borrow[Any]

    def __init__(self, borrow: Borrow[Any]) -> None:
        # Deliberately no Connection.__init__: the handle holds no connection state.
        _set_borrow(self, borrow)

    def __getattr__(self, name: str) -> Any:
        # Only names the class does not define: the connection's instance attributes.
        if name == "_borrow":
            raise AttributeError(name)
        return getattr(self._borrow._conn, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._borrow._conn, name, value)

    def __repr__(self) -> str:
        nc = self._borrow._conn
        if nc is _ENDED:
            return "<trionats.Connection lease ended>"
        return f"<leased {nc!r}>"


_set_borrow = LeasedConnection._borrow.__set__  # type: ignore[attr-defined]  # the slot's setter


_NOT_FORWARDED = frozenset(
    {
        "__init__",
        "__new__",
        "__repr__",
        "__getattr__",
        "__getattribute__",
        "__setattr__",
        "__delattr__",
        "__init_subclass__",
        "__class_getitem__",
        "__subclasshook__",
        "__dir__",
        "__reduce__",
        "__reduce_ex__",
    }
)


def _forward(name: str, doc: str | None, settable: bool) -> property:
    """A property of the handle: the connection's attribute ``name`` (its own bound method
    for a method), looked up in C (``attrgetter("_borrow._conn.name")``) on every access,
    so a call through the handle costs two attribute reads more than on the connection,
    and a handle costs nothing to create or end beyond its one slot. After the lease
    ``_conn`` is ``_ENDED``, whose every attribute raises."""
    setter = None
    if settable:

        def setter(self: LeasedConnection, value: Any) -> None:
            setattr(self._borrow._conn, name, value)

    return property(attrgetter("_borrow._conn." + name), setter, None, doc)


def _generate_forwarders() -> None:
    done: set[str] = set()
    for klass in Connection.__mro__[:-1]:  # most derived first; not object
        for name, attr in vars(klass).items():
            if name in done or name in _NOT_FORWARDED:
                continue
            done.add(name)
            if isinstance(attr, property):
                forwarder = _forward(name, attr.__doc__, attr.fset is not None)
            elif inspect.isfunction(attr):
                forwarder = _forward(name, attr.__doc__, False)
            else:
                continue  # static/class methods and class constants are inherited as they are
            # A name that object defines would not raise on _ENDED (none is forwarded).
            if hasattr(_LeaseEnded, name):
                raise AssertionError(f"cannot forward {name!r} to a leased connection")
            setattr(LeasedConnection, name, forwarder)


_generate_forwarders()


_EXCLUSIVE, _SHARED, _LONG_LIVED = 0, 1, 2  # Borrow._mode: _SHARED | _LONG_LIVED bits

_new_handle = _new_borrow = object.__new__


@final
class Borrow(Lease[C]):
    """The async context manager returned by :meth:`Pool.borrow`. Single use.

    On the shared hot path it is also the lease's record in the pool's core
    (:meth:`PoolCore.share_into`): one object per borrow instead of two. Otherwise the
    core makes the lease (``_lease``). Built by :meth:`Pool.borrow` without ``__init__``.
    """

    _pool: Pool[C]
    _timeout: float | None
    _mode: int  # _SHARED | _LONG_LIVED bits; -1 once entered
    _lease: Lease[C] | None  # the lease during the block (self on the hot path)
    _conn: Any  # what its LeasedConnection forwards to: the connection, then _ENDED
    _scope: trio.CancelScope | None

    def __await__(self) -> NoReturn:
        raise TypeError(
            "pool.borrow() is not awaitable: it is an async context manager; write "
            "`async with pool.borrow() as nc:` (the connection goes back to the pool when "
            "the block exits)"
        )

    async def __aenter__(self) -> C:
        mode = self._mode
        if mode < 0:
            raise RuntimeError("a pool.borrow() context manager can only be entered once")
        self._mode = -1
        pool = self._pool
        lease: Lease[C]
        if mode & _SHARED:
            await checkpoint_if_cancelled()
            core = pool._core
            if not core.share_into(pool._clock.current_time(), self):
                lease = await pool._acquire(self._timeout, self.holder, True)
            else:
                lease = self
                # The multiplexed hot path: a cancel point on every call (above), a
                # schedule point every BORROW_YIELD_EVERY calls, as publish does.
                if core.wake_at < pool._hk_deadline:
                    pool._wake_housekeeper()
                since = pool._since_yield + 1
                if since < BORROW_YIELD_EVERY:
                    pool._since_yield = since
                else:
                    pool._since_yield = 0
                    await cancel_shielded_checkpoint()
        else:
            lease = await pool._acquire(self._timeout, self.holder, False)
        # No checkpoint from here to the return: the lease cannot be lost to a cancel.
        self._lease = lease
        if mode & _LONG_LIVED:
            pool._core.exempt_from_leak_detection(lease)
        if pool._cancellable_leases:
            scope = trio.CancelScope()
            scope.__enter__()
            lease.token = scope
            self._scope = scope
        else:
            self._scope = None
        if pool._handles:
            self._conn = lease.conn
            # LeasedConnection(self) without the __init__ call
            handle: LeasedConnection = _new_handle(LeasedConnection)
            _set_borrow(handle, self)
            return handle  # type: ignore[return-value]  # C is Connection with handles
        return lease.conn

    def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Awaitable[None]:
        # Not a coroutine function: the exit never waits, so it does its work here and
        # returns an awaitable that is done already (a coroutine would cost more than
        # the shared hot path's whole exit).
        lease: Lease[C] | None = self._lease
        if lease is None:
            raise RuntimeError("a pool.borrow() context manager exited without a lease")
        self._lease = None  # no cycle (through itself, or a frame that holds this Borrow)
        self._conn = _ENDED  # its handle's every attribute raises from now on
        if self._scope is None:
            if exc is None and self._pool._core.unshare_now(lease):
                self.holder = None  # no cycle: frame -> handle -> this Borrow -> frame
                return _DONE  # the hot path: other shared leases still on the connection
            self._pool._release(lease, exc is not None and _is_suspect(exc))
            self.holder = None
            return _DONE
        try:
            self._exit_scope(lease, exc_type, exc, tb)
        finally:
            self.holder = None
        return _DONE

    def _exit_scope(
        self,
        lease: Lease[C],
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        scope = self._scope
        assert scope is not None
        try:
            # CancelScope.__exit__ returns True also when there was nothing to swallow.
            swallowed = bool(scope.__exit__(exc_type, exc, tb)) and exc is not None
        finally:
            self._pool._release(lease, exc is not None and _is_suspect(exc))
        if swallowed:
            # Only the pool cancels this scope: a leak (leak_action="cancel") or shutdown.
            held = trio.current_time() - lease.borrowed_at
            if lease.revoked == "leak":
                raise LeaseExpiredError(
                    f"the connection was held for {held:.3f} s, more than leak_timeout="
                    f"{self._pool.config.leak_timeout} s; the pool cancelled the block"
                )
            raise PoolClosedError(
                "the pool closed while the connection was borrowed; the block was cancelled"
            )


@final
class Pool(Generic[C]):
    """A pool of NATS connections to a list of servers. Create it with :func:`open_pool`.

    Borrow a connection for the duration of a block with :meth:`borrow`; read the state
    with :meth:`stats`.
    """

    def __init__(
        self,
        config: PoolConfig,
        dial: Callable[[str], Awaitable[C]],
        rng: random.Random | None,
        nursery: trio.Nursery,
        handles: bool = False,
        discover: Callable[[C], list[str]] | None = None,
    ) -> None:
        self._config = config
        self._urls: list[ServerURL] = list(config.servers)
        self._known = {(u.host.lower(), u.port) for u in config.servers}
        self._discover = discover if config.discover_servers else None
        self._dial = dial
        self._handles = handles  # borrowers get a LeasedConnection, not the connection
        healthy: Callable[[Any], bool] = _is_healthy_connection if handles else _is_healthy
        self._core: PoolCore[C] = PoolCore(config, is_healthy=healthy, rng=rng)
        self._nursery = nursery
        self._hk_scope: trio.CancelScope | None = None
        self._hk_deadline = -math.inf  # the housekeeper's deadline (inf: none; -inf: busy)
        self._clock = trio.lowlevel.current_clock()
        # Each borrow block runs in a cancel scope only when the pool may cancel it.
        self._cancellable_leases = config.leak_action == "cancel"
        self._all_back: trio.Event | None = None
        self._since_yield = 0  # borrows served at once since the last schedule point

    @property
    def config(self) -> PoolConfig:
        """The pool's configuration."""
        return self._config

    def stats(self) -> PoolStats:
        """A snapshot of the pool's state and counters (see :class:`PoolStats`)."""
        return self._core.stats(trio.current_time())

    def borrow(
        self, timeout: float | None = 10.0, *, long_lived: bool = False, shared: bool = False
    ) -> Borrow[C]:
        """Borrow a connection for the duration of an ``async with`` block.

        The connection goes back to the pool when the block exits, however it exits
        (see the module docs for which connections are kept). An idle connection of a
        server not in backoff is reused newest-first; otherwise one is dialed under
        ``dial_timeout``. With ``max_per_server`` reached, or every server in backoff,
        borrowers wait in FIFO order.

        ``shared=True`` asks for a *shared* lease: NATS multiplexes a connection, so many
        shared borrowers may hold the same connection at once (the least-loaded
        connection already in shared service, up to
        ``PoolConfig.shared_leases_per_connection`` leases each; else an idle one, else
        one dialed, while concurrent shared borrowers wait for that dial instead of
        dialing their own). A connection is in shared or in exclusive use, never both.
        Use it for publishing and requests; a subscription made on a shared lease must
        end inside the block (see the pool docs). Every pool rule holds per lease: leak
        detection and ``leak_action``, MaxLife (a shared connection past it takes no new
        leases and is closed when its last lease returns), health checks, backoff.

        Example::

            async with pool.borrow(timeout=5) as nc:
                await nc.publish("orders.new", b"...")

            async with pool.borrow(shared=True) as nc:  # alongside other borrowers
                reply = await nc.request("prices.get", b"AAPL", timeout=2)

        Args:
            timeout: seconds to wait for a connection (queueing and dialing together), or
                None for no deadline of its own: only the enclosing cancel scopes bound the
                wait (each dial is still bounded by ``dial_timeout``).
            long_lived: the block is meant to hold the connection for long (a subscriber
                does, for its whole life): it is never reported or cancelled as a leak.
            shared: a shared lease (see above) instead of an exclusive one.

        The block gets its own handle on the connection (see :class:`LeasedConnection`):
        once the block has exited, using it raises :class:`trionats.ConnectionClosedError`.

        Raises:
            TypeError: ``timeout`` is not a number or None, or ``long_lived`` or
                ``shared`` not a bool.
            ValueError: ``timeout`` is not a finite number > 0.
            PoolTimeoutError: no connection within ``timeout`` (chained to the last dial
                error, if any).
            PoolClosedError: the pool is closing, or (``leak_action="cancel"``) it closed
                while the block ran and cancelled the block.
            LeaseExpiredError: with ``leak_action="cancel"``, the block held the connection
                longer than ``leak_timeout`` and was cancelled.
        """
        seconds: Any = timeout
        kind = type(seconds)
        # A float or an int (not a bool) in range is taken as it is; anything else is
        # checked (and a large float converted) the long way.
        if not ((kind is float or kind is int) and 0 < seconds < _SECONDS_MAX):
            timeout = check_seconds("timeout", timeout, allow_none=True)
        flag: Any = shared
        if flag is True:
            mode = _SHARED
        elif flag is False:
            mode = _EXCLUSIVE
        else:
            mode = check_bool("shared", shared)  # raises: not a bool
        flag = long_lived
        if flag is not False:
            if flag is not True:
                check_bool("long_lived", long_lived)  # raises: not a bool
            mode |= _LONG_LIVED
        frame = sys._getframe(1)
        # Borrow(self, timeout, holder, mode) without the __init__ call
        borrow: Borrow[C] = _new_borrow(Borrow)
        borrow._pool = self
        borrow._timeout = timeout
        borrow.holder = (frame, frame.f_lasti)
        borrow._mode = mode
        borrow._lease = None
        return borrow

    # -- acquiring ---------------------------------------------------------------------
    async def _acquire(self, timeout: float | None, holder: _Holder, shared: bool) -> Lease[C]:
        await checkpoint_if_cancelled()
        core = self._core
        now = trio.current_time()
        result = core.request(now, holder, shared=shared)
        self._drain()
        if type(result) is Lease:
            # Served at once (an idle hit, or a shared lease): a cancel point on every call
            # (above), a schedule point every BORROW_YIELD_EVERY calls, as publish does, so
            # a task that borrows, publishes and returns in a loop is not switched out
            # (and its connection's writes batched) at every borrow.
            self._since_yield += 1
            if self._since_yield < BORROW_YIELD_EVERY:
                return result
            self._since_yield = 0
            await cancel_shielded_checkpoint()
            return result
        last_error: BaseException | None = None
        with trio.CancelScope(deadline=math.inf if timeout is None else now + timeout):
            while True:
                if isinstance(result, Waiter):
                    result = await self._wait(result)
                if isinstance(result, Lease):
                    return result
                assert isinstance(result, DialTicket)
                ticket = result
                try:
                    conn = await self._dial_ticket(ticket)
                except (TrionatsError, OSError) as exc:
                    if isinstance(exc, PoolClosedError):
                        core.dial_aborted(ticket, trio.current_time())
                        self._drain()
                        raise
                    now = trio.current_time()
                    delay = core.dial_failed(ticket, now)
                    self._drain()
                    url = self._urls[ticket.server].display
                    log.info(
                        "dial %s failed (%s); backing off %.3f s", url, redact(repr(exc)), delay
                    )
                    last_error = exc
                    result = core.request(now, holder, retry=True, shared=shared)
                    self._drain()
                    continue
                except BaseException:
                    core.dial_aborted(ticket, trio.current_time())
                    self._drain()
                    raise
                lease = core.dial_succeeded(ticket, conn, trio.current_time())
                if self._discover is not None:
                    self._add_discovered(self._urls[ticket.server], self._discover(conn))
                self._drain()
                if lease is None:
                    raise PoolClosedError("the pool closed while dialing")
                return lease
        core.record_timeout()
        raise PoolTimeoutError(
            f"no connection within {timeout} s"
            + (f" (last dial error: {redact(str(last_error))})" if last_error is not None else "")
        ) from last_error

    async def _wait(self, waiter: Waiter) -> Lease[C] | DialTicket:
        waiter.token = current_task()
        core = self._core

        def abort(_: Any) -> Abort:
            # Still queued (a granted waiter was rescheduled in the same step): leave the
            # queue; nothing was reserved for it.
            core.cancel_waiter(waiter, trio.current_time())
            return Abort.SUCCEEDED

        await wait_task_rescheduled(abort)
        grant = waiter.grant
        if isinstance(grant, PoolClosedError):
            raise grant
        assert grant is not None
        return grant

    async def _dial_ticket(self, ticket: DialTicket) -> C:
        server = self._urls[ticket.server]
        with trio.move_on_after(self._config.dial_timeout) as scope:
            ticket.token = scope
            return await self._dial(server.url)
        if self._core.closing:
            raise PoolClosedError("the pool closed while dialing")
        raise ConnectError(f"dialing {server.display} took more than {self._config.dial_timeout} s")

    def _add_discovered(self, via: ServerURL, announced: list[str]) -> None:
        """Add the servers ``via`` announced (``host:port``) that the pool does not know."""
        for hostport in announced:
            try:
                (url,) = parse_servers(f"{via.scheme}://{hostport}", "connect_urls")
            except (TypeError, ValueError):
                log.debug("ignoring an announced server %r", redact(hostport))
                continue
            key = (url.host.lower(), url.port)
            if key in self._known:
                continue
            self._known.add(key)
            self._urls.append(url)
            self._core.add_server(url.display)
            log.info("pool: discovered server %s (announced by %s)", url.display, via.display)

    # -- returning ---------------------------------------------------------------------
    def _release(self, lease: Lease[C], suspect: bool) -> None:
        core = self._core
        if lease.leak_reported and not lease.detached:
            name, stack = _describe(lease.holder, current_task())  # the holder returns it
            log.warning(
                "leaked %s to %s returned after %.3f s by task %r; it was borrowed at:\n%s",
                "shared lease on a connection" if lease.shared else "connection",
                self._urls[lease.server].display,
                trio.current_time() - lease.borrowed_at,
                name,
                stack,
            )
        core.release(lease, trio.current_time(), suspect=suspect)
        self._drain()

    # -- the outbox ----------------------------------------------------------------------
    def _drain(self) -> None:
        core = self._core
        if core.to_close:
            items = list(core.to_close)
            core.to_close.clear()
            self._nursery.start_soon(self._close_conns, items)
        if core.to_wake:
            for waiter in core.to_wake:
                reschedule(waiter.token)
            core.to_wake.clear()
        if core.new_leaks:
            leaks = list(core.new_leaks)
            core.new_leaks.clear()
            for lease in leaks:
                self._report_leak(lease)
        if core.wake_at < self._hk_deadline:
            self._wake_housekeeper()
        if (
            self._all_back is not None
            and not core.borrowed
            and not core.shared_leases
            and not core.dialing
        ):
            self._all_back.set()

    def _report_leak(self, lease: Lease[C]) -> None:
        name, stack = _describe(lease.holder)
        cancel = self._config.leak_action == "cancel"
        log.warning(
            "%s lease (server %s) held for %.3f s (leak_timeout=%s s) by task %r%s;"
            " borrowed at:\n%s",
            "shared connection" if lease.shared else "connection",
            self._urls[lease.server].display,
            trio.current_time() - lease.borrowed_at,
            self._config.leak_timeout,
            name,
            "; cancelling it" if cancel else "",
            stack,
        )
        if cancel and lease.token is not None:
            lease.revoked = "leak"
            lease.token.cancel()

    async def _close_conns(self, items: list[tuple[C, CloseReason]]) -> None:
        """Close ``items`` concurrently, under one deadline: ``close_timeout`` in total."""

        async def close_one(conn: C, reason: CloseReason) -> None:
            try:
                await conn.aclose()
            except Exception as exc:  # pragma: no cover - aclose does not raise
                log.debug("closing a %s connection failed: %s", reason.value, redact(repr(exc)))

        with trio.CancelScope(shield=True), trio.move_on_after(self._config.close_timeout):
            if len(items) == 1:
                await close_one(*items[0])
                return
            async with trio.open_nursery() as nursery:
                for conn, reason in items:
                    nursery.start_soon(close_one, conn, reason)

    # -- background ----------------------------------------------------------------------
    def _wake_housekeeper(self) -> None:
        """Bring the housekeeper's deadline forward to ``core.wake_at`` (which is earlier)."""
        hk = self._hk_scope
        if hk is not None:
            hk.deadline = self._hk_deadline = self._core.wake_at

    async def _housekeeper(self, *, task_status: trio.TaskStatus[None]) -> None:
        core = self._core
        task_status.started()
        while True:
            core.wake_at = math.inf
            deadline = core.next_deadline()
            with trio.CancelScope(deadline=deadline) as scope:
                self._hk_scope = scope
                self._hk_deadline = deadline
                await trio.sleep_forever()
            self._hk_scope = None
            self._hk_deadline = -math.inf  # running: it reads the core's state itself
            core.tick(trio.current_time())
            self._drain()

    async def _shutdown(self) -> None:
        """Stop lending, close idle connections, wait (bounded) for the borrowed ones."""
        core = self._core
        self._all_back = trio.Event()
        core.close(trio.current_time())
        self._drain()
        timeout = self._config.close_timeout
        with trio.move_on_after(timeout):
            await self._all_back.wait()
        if self._all_back.is_set():
            return
        log.warning(
            "pool closing: %d connection(s) still borrowed, %d shared lease(s) open and %d"
            " dial(s) in progress after %s s; cancelling them",
            core.borrowed,
            core.shared_leases,
            core.dialing,
            timeout,
        )
        cancelled = 0
        for lease in core.leases():
            if lease.token is not None:
                lease.revoked = "shutdown"
                lease.token.cancel()
                cancelled += 1
        for ticket in core.tickets():
            if ticket.token is not None:
                ticket.token.cancel()
                cancelled += 1
        if cancelled:
            with trio.move_on_after(timeout):
                await self._all_back.wait()
        if not self._all_back.is_set():
            log.warning(
                "pool closing: closing %d connection(s) still borrowed and those of %d shared"
                " lease(s)",
                core.borrowed,
                core.shared_leases,
            )
            core.detach_all()
            self._drain()


@asynccontextmanager
async def _run_pool(
    config: PoolConfig,
    dial: Callable[[str], Awaitable[C]],
    rng: random.Random | None,
    handles: bool = False,
    discover: Callable[[C], list[str]] | None = None,
) -> AsyncIterator[Pool[C]]:
    try:
        async with trio.open_nursery() as nursery:
            pool = Pool(config, dial, rng, nursery, handles, discover)
            await nursery.start(pool._housekeeper)
            try:
                yield pool
            finally:
                with trio.CancelScope(shield=True):
                    await pool._shutdown()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Hand callers what their block raised, not the group our one nursery made; a
        # group the block itself raised is below that level and comes out intact.
        reraise_unwrapped(group, levels=1)


@overload
def open_pool(
    config: PoolConfig, *, dial: None = None, rng: random.Random | None = None
) -> AbstractAsyncContextManager[Pool[Connection]]: ...


@overload
def open_pool(
    config: PoolConfig,
    *,
    dial: Callable[[str], Awaitable[C]],
    rng: random.Random | None = None,
) -> AbstractAsyncContextManager[Pool[C]]: ...


def open_pool(
    config: PoolConfig,
    *,
    dial: Callable[[str], Awaitable[Any]] | None = None,
    rng: random.Random | None = None,
) -> AbstractAsyncContextManager[Pool[Any]]:
    """Run a connection pool for the duration of the block.

    The pool's housekeeper (MaxLife retirement, leak sweeps, backoff wake-ups) runs in a
    nursery owned by the block. Leaving the block stops lending, fails waiting borrowers
    with :class:`PoolClosedError`, closes idle connections and waits up to
    ``config.close_timeout`` for borrowed connections to come back. Then dials in progress
    are cancelled and, with ``leak_action="cancel"``, so are the holders' ``borrow`` blocks
    (they raise :class:`PoolClosedError`), waited for as long again; finally whatever is
    still borrowed is closed under its holder (its next operation raises
    :class:`trionats.ConnectionClosedError`). Connections close concurrently, all of them
    within one ``close_timeout``. Nothing outlives the block, even when it is cancelled.

    An exception the block raises comes out as it was raised (a group the block raised
    keeps its levels: only the one the pool's own nursery adds is removed).

    Why only with ``leak_action="cancel"``: cancelling a holder needs a cancel scope around
    every ``borrow`` block, which is about 40 % of the cost of an idle-hit borrow; a pool
    that never cancels its borrowers does not pay for it.

    Example::

        config = trionats.PoolConfig(servers=["nats://127.0.0.1:4222"])
        async with trionats.open_pool(config) as pool:
            async with pool.borrow(timeout=5) as nc:
                await nc.publish("a.b", b"x")
            print(pool.stats().reuse_rate)

    Args:
        config: the pool's configuration.
        dial: ``async def dial(url) -> connection``, given the server's real URL
            (credentials included). Default: a :class:`trionats.Connection` opened with
            ``config``'s ``name``, ``dial_timeout``, ``close_timeout`` and authentication
            and TLS options, on a trio-asyncio loop this block opens when none is running;
            each borrower then gets its own handle on it (see :meth:`Pool.borrow`). Tests
            pass fakes (no asyncio needed; borrowers get the fake itself); the result must
            have ``is_connected``, ``is_closed``, ``is_draining`` and ``aclose()``.
        rng: the random source for server choice and jitter (for reproducible tests).
    """
    if dial is not None:
        return _run_pool(config, dial, rng)
    return _run_real_pool(config, rng)


@asynccontextmanager
async def _run_real_pool(
    config: PoolConfig, rng: random.Random | None
) -> AsyncIterator[Pool[Connection]]:
    from . import _bridge
    from ._connect import connect

    async def dial(url: str) -> Connection:
        try:
            return await connect(
                url,
                name=config.name,
                connect_timeout=config.dial_timeout,
                close_timeout=config.close_timeout,
                user=config.user,
                password=config.password,
                token=config.token,
                nkeys_seed=config.nkeys_seed,
                nkeys_seed_str=config.nkeys_seed_str,
                user_credentials=config.user_credentials,
                tls=config.tls,
                tls_hostname=config.tls_hostname,
            )
        except ConnectError as exc:
            message = str(exc)
            clean = redact(message)
            if clean == message:
                raise
            # The URL the dialer was given carries credentials: never let them surface.
            raise ConnectError(clean) from exc.__cause__

    def discover(conn: Connection) -> list[str]:
        return _bridge.announced_servers(conn._client)

    async with (
        _bridge.loop_scope(),
        _run_pool(config, dial, rng, True, discover) as pool,
    ):
        yield pool
