"""One exception hierarchy for everything trionats raises.

Nothing from asyncio or nats-py escapes un-wrapped: the bridge translates them into
these classes and keeps the original as ``__cause__``.
"""

from __future__ import annotations

import builtins
from typing import NoReturn

import trio

__all__ = [
    "ConnectError",
    "ConnectionClosedError",
    "JetStreamError",
    "LeaseExpiredError",
    "NoRespondersError",
    "PoolClosedError",
    "PoolTimeoutError",
    "ReconnectBufferFullError",
    "ServerNotFoundError",
    "SubscriptionClosedError",
    "TimeoutError",
    "TrionatsError",
    "reraise_unwrapped",
    "unwrap_group",
]


class TrionatsError(Exception):
    """Base class of every error raised by trionats."""


class ConnectError(TrionatsError):
    """The connection to NATS could not be established (refused, timed out, auth failed)."""


class ConnectionClosedError(TrionatsError):
    """The connection is closed (or draining) and cannot be used for this operation."""


class TimeoutError(TrionatsError, builtins.TimeoutError):
    """An operation with a ``timeout=`` argument did not finish in time.

    Also a builtin :class:`TimeoutError`, so ``except TimeoutError`` catches it.
    """


class NoRespondersError(TrionatsError):
    """A request found no subscriber listening on its subject (server status 503)."""


class SubscriptionClosedError(TrionatsError):
    """The subscription was closed (unsubscribed or its connection closed)."""


class ServerNotFoundError(TrionatsError):
    """No ``nats-server`` binary could be found to start an embedded server."""


class PoolTimeoutError(TimeoutError):
    """``pool.borrow(timeout=...)`` could not get a connection in time."""


class PoolClosedError(TrionatsError):
    """The pool is closing or closed."""


class LeaseExpiredError(TrionatsError):
    """A lease was held past ``leak_timeout`` and the pool cancelled it (leak_action="cancel")."""


class ReconnectBufferFullError(TrionatsError):
    """Publishing while disconnected, and the reconnect buffer (``pending_size``) is full."""


class JetStreamError(TrionatsError):
    """The JetStream API refused a request, or JetStream is not available.

    Attributes:
        code: the server's status code (400, 404, 503...; 0 when it gave none).
        err_code: the server's JetStream error code (10059 stream not found...; 0 if none).
        description: the server's description.
    """

    def __init__(
        self, message: str, *, code: int = 0, err_code: int = 0, description: str = ""
    ) -> None:
        super().__init__(message)
        self.code = code
        self.err_code = err_code
        self.description = description or message


def unwrap_group(group: BaseExceptionGroup[BaseException], levels: int = 1) -> BaseException:
    """What to raise instead of ``group``, a group that *our own* nurseries created.

    Strips exactly ``levels`` levels (the nurseries the caller opened, no more), the way
    trio's ``raise_single_exception_from_group`` does for one: at each level a
    KeyboardInterrupt or SystemExit wins, :class:`trio.Cancelled` is dropped when a real
    error sits beside it, and a level holding several real errors is kept as it is. A
    group the user's own code raised is below those levels, so it comes out intact.
    """
    exc: BaseException = group
    for _ in range(levels):
        if not isinstance(exc, BaseExceptionGroup):
            break
        inner = exc.exceptions
        for e in inner:
            if isinstance(e, KeyboardInterrupt | SystemExit):
                return e
        real = [e for e in inner if not isinstance(e, trio.Cancelled)]
        if len(real) > 1:
            return exc
        exc = real[0] if real else inner[0]
    return exc


def reraise_unwrapped(group: BaseExceptionGroup[BaseException], levels: int = 1) -> NoReturn:
    """Raise :func:`unwrap_group`'s choice, keeping its own ``__context__``."""
    exc = unwrap_group(group, levels)
    if exc is group:
        raise group
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context
