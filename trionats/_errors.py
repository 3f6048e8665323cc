"""One exception hierarchy for everything trionats raises.

Nothing from asyncio or nats-py escapes un-wrapped: the bridge translates them into
these classes and keeps the original as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "ConnectError",
    "ConnectionClosedError",
    "LeaseExpiredError",
    "NoRespondersError",
    "PoolClosedError",
    "PoolTimeoutError",
    "ReconnectBufferFullError",
    "ServerNotFoundError",
    "SubscriptionClosedError",
    "TimeoutError",
    "TrionatsError",
]


class TrionatsError(Exception):
    """Base class of every error raised by trionats."""


class ConnectError(TrionatsError):
    """The connection to NATS could not be established (refused, timed out, auth failed)."""


class ConnectionClosedError(TrionatsError):
    """The connection is closed (or draining) and cannot be used for this operation."""


class TimeoutError(TrionatsError):
    """An operation with a ``timeout=`` argument did not finish in time."""


class NoRespondersError(TrionatsError):
    """A request found no subscriber listening on its subject (server status 503)."""


class SubscriptionClosedError(TrionatsError):
    """The subscription was closed (unsubscribed or its connection closed)."""


class ServerNotFoundError(TrionatsError):
    """No ``nats-server`` binary could be found to start an embedded server."""


class PoolTimeoutError(TrionatsError):
    """``pool.borrow(timeout=...)`` could not get a connection in time."""


class PoolClosedError(TrionatsError):
    """The pool is closing or closed."""


class LeaseExpiredError(TrionatsError):
    """A lease was held past ``leak_timeout`` and the pool cancelled it (leak_action="cancel")."""


class ReconnectBufferFullError(TrionatsError):
    """Publishing while disconnected, and the reconnect buffer (``pending_size``) is full."""
