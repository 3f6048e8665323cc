"""pytest plugin and helpers for testing code that uses trionats.

Registered with the ``pytest11`` entry point, so installing trionats makes these fixtures
available everywhere:

* ``nats_server``: a running nats-server on 127.0.0.1 and a free port
  (``.url``, ``.port``, ``await .stop()``, ``await .start()`` on the same port, ``await .kill()``);
* ``nats_url``: its URL;
* ``nats_cluster``: a 3-node cluster (a list of servers).

The fixtures are Trio fixtures (pytest-trio): use them from async tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ._server import NatsServer, open_nats_cluster, open_nats_server

__all__ = ["nats_cluster", "nats_server", "nats_url"]


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
