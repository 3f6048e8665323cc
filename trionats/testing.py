"""pytest plugin and helpers for testing code that uses trionats.

Registered with the ``pytest11`` entry point, so installing trionats makes these fixtures
available everywhere:

* ``nats_server``: a running nats-server on 127.0.0.1 and a free port
  (``.url``, ``.port``, ``await .stop()``, ``await .start()`` on the same port, ``await .kill()``);
* ``nats_url``: its URL;
* ``nats_cluster``: a 3-node cluster (a list of servers).

The fixtures are Trio fixtures (pytest-trio): use them from async tests. Each server is
stopped when its test ends, and on Linux it also dies with the test process if that is
killed outright (SIGKILL, a CI runner's timeout): no orphaned nats-server is left holding
a port (see :func:`trionats.open_nats_server`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from ._server import NatsServer, monitor_json, open_nats_cluster, open_nats_server

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = [
    "monitor_json",
    "nats_cluster",
    "nats_server",
    "nats_url",
    "wait_for_connections",
]


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
async def nats_cluster() -> AsyncIterator[list[NatsServer]]:
    """A 3-node nats-server cluster on 127.0.0.1."""
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
