"""pytest plugin and helpers for testing code that uses trionats.

Registered with the ``pytest11`` entry point, so installing trionats makes these fixtures
available everywhere:

* ``nats_server``: a running nats-server on 127.0.0.1 and a free port
  (``.url``, ``.port``, ``await .stop()``, ``await .start()`` on the same port, ``await .kill()``,
  ``await .freeze()`` / ``await .thaw()`` (SIGSTOP / SIGCONT), ``await .restart(kill=False)``);
* ``nats_url``: its URL;
* ``nats_cluster``: a 3-node cluster (a :class:`NatsCluster`: a list of servers, plus
  ``stop(i)``, ``kill(i)``, ``freeze(i)``, ``thaw(i)``, ``restart(i)`` by index);
* ``fault_proxy``: a :class:`FaultProxy` in front of ``nats_server`` (latency, bandwidth,
  resets, half-close, black holes, single-byte writes; see :mod:`trionats._faults`).

Helpers for plain code too: :func:`open_fault_proxy`, :func:`leak_probe` (Trio tasks,
asyncio tasks, file descriptors and the servers' connections and subscriptions before and
after a block), :func:`wait_for_connections`, :func:`monitor_json`.

The fixtures are Trio fixtures (pytest-trio): use them from async tests. Each server is
stopped when its test ends, and on Linux it also dies with the test process if that is
killed outright (SIGKILL, a CI runner's timeout): no orphaned nats-server is left holding
a port (see :func:`trionats.open_nats_server`).
"""

from __future__ import annotations

import os
import sys
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, final

import pytest
import trio
import trio.testing

from ._faults import Direction, FaultProxy, open_fault_proxy
from ._server import NatsCluster, NatsServer, monitor_json, open_nats_cluster, open_nats_server
from ._validate import check_seconds

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

__all__ = [
    "Direction",
    "FaultProxy",
    "LeakProbe",
    "NatsCluster",
    "fault_proxy",
    "leak_probe",
    "monitor_json",
    "nats_cluster",
    "nats_server",
    "nats_url",
    "open_fault_proxy",
    "wait_for_connections",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--soak-minutes N``: run trionats' soak test for N minutes (default: a short run)."""
    parser.addoption(
        "--soak-minutes",
        type=float,
        default=None,
        help="trionats soak test: run for this many minutes instead of the short CI run",
    )


@pytest.fixture
async def nats_server() -> AsyncIterator[NatsServer]:
    """A nats-server (with JetStream and monitoring) running for the test."""
    async with open_nats_server(jetstream=True, monitor=True) as server:
        yield server


@pytest.fixture
async def nats_url(nats_server: NatsServer) -> str:
    """The URL of the ``nats_server`` fixture."""
    return nats_server.url


@pytest.fixture
async def nats_cluster() -> AsyncIterator[NatsCluster]:
    """A 3-node nats-server cluster on 127.0.0.1 (with monitoring), controllable by index."""
    async with open_nats_cluster(3, monitor=True) as servers:
        yield servers


async def wait_for_connections(server: NatsServer, count: int, timeout: float = 10.0) -> int:
    """Poll ``/connz`` (bounded, with a deadline) until the server counts ``count`` clients.

    Returns the count; raises ``AssertionError`` naming the last count seen on timeout.
    """
    seen = -1
    with trio.move_on_after(timeout):
        while True:
            seen = int((await monitor_json(server, "/connz"))["num_connections"])
            if seen == count:
                return seen
            await trio.sleep(0.01)
    raise AssertionError(f"server counts {seen} connections, expected {count}")


@pytest.fixture
async def fault_proxy(nats_server: NatsServer) -> AsyncIterator[FaultProxy]:
    """A :class:`FaultProxy` in front of the ``nats_server`` fixture: connect to ``.url``."""
    async with open_fault_proxy(nats_server) as proxy:
        yield proxy


# -- leak probe --


def _count_trio_tasks() -> int:
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


def _count_asyncio_tasks() -> int:
    """Unfinished tasks of the trio-asyncio loop around the caller (0 if none)."""
    trio_asyncio = sys.modules.get("trio_asyncio")
    asyncio = sys.modules.get("asyncio")
    if trio_asyncio is None or asyncio is None:
        return 0
    loop = trio_asyncio.current_loop.get()
    if loop is None:
        return 0
    return sum(1 for task in asyncio.all_tasks(loop) if not task.done())


def _count_fds() -> int | None:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return None  # pragma: no cover - no fd folder on this platform


@final
class LeakProbe:
    """What :func:`leak_probe` measured: counts before and after its block.

    Attributes:
        before: the counts when the block started (name -> count).
        after: the counts when the block ended and settled (empty until then).
    """

    def __init__(self, servers: Sequence[NatsServer]) -> None:
        self._servers = list(servers)
        self.before: dict[str, int] = {}
        self.after: dict[str, int] = {}

    async def snapshot(self) -> dict[str, int]:
        """Count everything now: ``trio_tasks``, ``asyncio_tasks``, ``fds`` and, for each
        server, ``connz[<port>]`` and ``subsz[<port>]`` (its ``/connz`` and ``/subsz``)."""
        counts = {"trio_tasks": _count_trio_tasks(), "asyncio_tasks": _count_asyncio_tasks()}
        fds = _count_fds()
        if fds is not None:
            counts["fds"] = fds
        for server in self._servers:
            if not server.is_running or server.is_frozen:
                continue
            connz = await monitor_json(server, "/connz")
            subsz = await monitor_json(server, "/subsz")
            counts[f"connz[{server.port}]"] = int(connz["num_connections"])
            counts[f"subsz[{server.port}]"] = int(subsz["num_subscriptions"])
        return counts

    @property
    def leaks(self) -> dict[str, tuple[int, int]]:
        """Every count that differs: name -> (before, after). Empty means no leak."""
        names = sorted(set(self.before) & set(self.after))
        return {
            n: (self.before[n], self.after[n]) for n in names if self.before[n] != self.after[n]
        }

    def assert_no_leaks(self) -> None:
        """Raise ``AssertionError`` naming every count that did not return to its baseline."""
        leaks = self.leaks
        if leaks:
            detail = ", ".join(f"{n}: {b} -> {a}" for n, (b, a) in leaks.items())
            raise AssertionError(f"not back to baseline: {detail}")

    def __repr__(self) -> str:
        return f"<LeakProbe before={self.before} after={self.after} leaks={self.leaks}>"


@asynccontextmanager
async def leak_probe(
    servers: NatsServer | Sequence[NatsServer] = (), *, settle_timeout: float = 5.0
) -> AsyncIterator[LeakProbe]:
    """Count Trio tasks, asyncio tasks, open fds and the servers' connections and
    subscriptions before and after the block.

    Example::

        async with leak_probe(nats_server) as probe:
            async with trionats.open_connection(nats_server.url) as nc:
                ...
        probe.assert_no_leaks()

    The baseline is taken when two counts 50 ms apart agree. After the block the counts
    are taken again until they equal the baseline or ``settle_timeout`` passes (a server
    notices a closed client a moment later); then ``probe.after`` holds the last counts
    and ``probe.leaks`` what differs. It never raises a leak by itself: call
    ``probe.assert_no_leaks()``.

    The counts: ``trio_tasks`` (the whole task tree), ``asyncio_tasks`` (unfinished tasks
    of the trio-asyncio loop open around the probe; a connection opened inside the block
    without such a loop runs its own, which ends with it), ``fds`` (``/proc/self/fd``),
    and per server (started with ``monitor=True``) ``connz[<port>]``, ``subsz[<port>]``.
    Servers stopped or frozen at either moment are skipped.

    Raises:
        TypeError: ``settle_timeout`` is not a number.
        ValueError: ``settle_timeout`` is not a finite number >= 0.
    """
    settle_timeout = check_seconds("settle_timeout", settle_timeout, allow_zero=True)
    listed = [servers] if isinstance(servers, NatsServer) else list(servers)
    probe = LeakProbe(listed)
    # The baseline is taken once two counts 50 ms apart agree (bounded by settle_timeout):
    # a server still counts a client that closed a moment ago (a readiness probe, say).
    with trio.move_on_after(settle_timeout):
        await trio.testing.wait_all_tasks_blocked()
        probe.before = await probe.snapshot()
        while True:
            await trio.sleep(0.05)
            await trio.testing.wait_all_tasks_blocked()
            again = await probe.snapshot()
            if again == probe.before:
                break
            probe.before = again
    yield probe
    with trio.move_on_after(settle_timeout):
        while True:
            await trio.testing.wait_all_tasks_blocked()
            probe.after = await probe.snapshot()
            if not probe.leaks:
                return
            await trio.sleep(0.02)  # bounded polling: a server sees closes a little later
