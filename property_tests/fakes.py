"""Fake connections and a fake network for driving the pool without I/O or asyncio."""

from __future__ import annotations

import itertools
from typing import final

import trio

_ids = itertools.count(1)


@final
class FakeConn:
    """Quacks like trionats.Connection for the pool: health flags and aclose()."""

    def __init__(self, server: str, network: FakeNetwork | None = None, born: float = 0.0) -> None:
        self.id = next(_ids)
        self.server = server
        self.network = network
        self.born = born
        self.broken = False
        self.closed = False
        self.is_draining = False
        self.expires_at: float | None = None
        self.close_calls = 0

    @property
    def is_connected(self) -> bool:
        down = self.network is not None and self.server in self.network.down
        return not (self.broken or self.closed or down)

    @property
    def is_closed(self) -> bool:
        return self.closed

    async def aclose(self) -> None:
        self.close_calls += 1
        self.closed = True
        await trio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        return f"<FakeConn #{self.id} {self.server}{' broken' if self.broken else ''}>"


def is_healthy(conn: FakeConn) -> bool:
    return conn.is_connected and not conn.is_draining


@final
class FakeNetwork:
    """Servers that can be down; a dial takes ``dial_time`` virtual seconds."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.dial_time: dict[str, float] = {}
        self.conns: list[FakeConn] = []
        self.dials = 0
        self.failures = 0

    async def dial(self, url: str) -> FakeConn:
        self.dials += 1
        await trio.sleep(self.dial_time.get(url, 0.0))
        if url in self.down:
            self.failures += 1
            raise OSError(f"connection refused: {url}")
        conn = FakeConn(url, self, trio.current_time())
        self.conns.append(conn)
        return conn
