"""Connection events: what happened to a connection, as an async iterator."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

import trio

if TYPE_CHECKING:
    from types import TracebackType

    from ._connection import Connection

__all__ = ["ConnectionEvent", "EventKind", "EventStream"]


class EventKind(enum.Enum):
    """What happened to a connection."""

    DISCONNECTED = "disconnected"
    RECONNECTED = "reconnected"
    ERROR = "error"
    SLOW_CONSUMER = "slow_consumer"
    LAME_DUCK = "lame_duck"
    SERVER_DISCOVERED = "server_discovered"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    """One connection event.

    Attributes:
        kind: what happened.
        error: the error, for ERROR events.
        subject: the subscription's subject, for SLOW_CONSUMER events.
    """

    kind: EventKind
    error: BaseException | None = None
    subject: str | None = None


@final
class EventStream:
    """Connection events as an async iterator; ends when the connection closes.

    Use as ``async with nc.events() as events: async for event in events: ...`` or iterate
    directly. The buffer holds ``buffer`` events; beyond that events are counted as dropped
    (``nc.stats().events_dropped``) rather than blocking the connection.
    """

    def __init__(self, conn: Connection, buffer: int) -> None:
        self._conn = conn
        self._send, self._receive = trio.open_memory_channel[ConnectionEvent](buffer)
        conn._event_streams.add(self)

    def _emit(self, event: ConnectionEvent) -> None:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self._conn._events_dropped += 1
        except trio.ClosedResourceError:  # pragma: no cover - removed before closing
            pass

    def close(self) -> None:
        """Stop receiving events; iteration ends after the buffered ones."""
        self._conn._event_streams.discard(self)
        self._send.close()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> ConnectionEvent:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        self._receive.close()
