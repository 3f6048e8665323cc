"""Structured, rate-limited logging for events that can repeat (handler failures, drops...).

Every logger is named after its module under ``trionats`` (see ``docs/production.md``,
section Logging). Records carry their context as attributes (``extra=``): ``component``
always, ``subject``, ``server``, ``connection`` and ``suppressed`` where they apply, so
structlog or a JSON formatter can render them as fields.

A repeated event goes through a :class:`RateLimiter`: a token bucket per ``(logger, key)``
(``BURST`` records at once, then one more every ``INTERVAL`` seconds). What the bucket
refuses is counted; the next record that gets through says how many similar ones were
suppressed (``suppressed`` field, and in the message), and :meth:`RateLimiter.flush` logs
the count still pending when the thing that produced them stops (a subscription, say), so
no suppressed event goes unreported. A handler failing in a tight loop therefore logs
``BURST`` full tracebacks, then one line every ``INTERVAL`` seconds.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, final

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Mapping

__all__ = ["BURST", "INTERVAL", "MAX_KEYS", "RateLimiter", "conn_fields", "fields"]

BURST = 5
"""Records of one key logged back to back before the limit applies."""

INTERVAL = 10.0
"""Seconds for one more record of a key once its burst is spent."""

MAX_KEYS = 1024
"""Keys a limiter tracks; the least recently used is forgotten (its pending count flushed)."""


def fields(component: str, **values: Any) -> dict[str, Any]:
    """The ``extra=`` of a record: ``component`` and the given fields that are not None."""
    extra = {"component": component}
    for name, value in values.items():
        if value is not None:
            extra[name] = value
    return extra


def conn_fields(conn: Any, component: str, **values: Any) -> dict[str, Any]:
    """:func:`fields` plus the connection's ``server`` (redacted URL) and name."""
    try:
        server, name = conn.connected_url, conn.name
    except Exception:  # a pooled connection whose lease ended, a closed client
        server = name = None
    return fields(component, server=server, connection=name, **values)


@final
class _Bucket:
    __slots__ = ("args", "extra", "level", "msg", "stamp", "suppressed", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.suppressed = 0
        # The last suppressed event, for the summary that flush() logs.
        self.level = logging.NOTSET
        self.msg = ""
        self.args: tuple[Any, ...] = ()
        self.extra: Mapping[str, Any] = {}


@final
class RateLimiter:
    """Token buckets per key in front of one logger.

    Args:
        logger: where the records go.
        burst: records of a key logged at once before the limit applies.
        interval: seconds per refilled token (one more record of that key).
        clock: seconds, monotonic (``time.monotonic``; tests pass their own).
        max_keys: keys tracked at once (least recently used forgotten after a flush).
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = BURST,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()

    def log(
        self,
        level: int,
        key: Hashable,
        msg: str,
        *args: Any,
        exc_info: BaseException | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> bool:
        """Log ``msg % args`` unless ``key`` is over its rate; True when it was logged.

        A record logged after suppressed ones says how many (``suppressed`` field, and
        ``[N similar suppressed]`` at the end of the message).
        """
        logger = self.logger
        if not logger.isEnabledFor(level):
            return False
        now = self.clock()
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
            buckets[key] = bucket
            if len(buckets) > self.max_keys:
                old_key, _ = next(iter(buckets.items()))
                self._flush_one(old_key)
        else:
            buckets.move_to_end(key)
            bucket.tokens = min(
                float(self.burst), bucket.tokens + (now - bucket.stamp) / self.interval
            )
            bucket.stamp = now
        if bucket.tokens < 1.0:
            bucket.suppressed += 1
            bucket.level, bucket.msg, bucket.args = level, msg, args
            bucket.extra = extra or {}
            return False
        bucket.tokens -= 1.0
        suppressed = bucket.suppressed
        bucket.suppressed = 0
        record_extra = dict(extra or {})
        record_extra["suppressed"] = suppressed
        if suppressed:
            msg = f"{msg} [{suppressed} similar suppressed]"
        logger.log(level, msg, *args, exc_info=exc_info, extra=record_extra, stacklevel=2)
        return True

    def flush(self, match: Callable[[Hashable], bool] | None = None) -> None:
        """Log the suppressed counts still pending (of the keys ``match`` accepts) and
        forget those keys."""
        for key in [k for k in self._buckets if match is None or match(k)]:
            self._flush_one(key)

    def _flush_one(self, key: Hashable) -> None:
        bucket = self._buckets.pop(key)
        if bucket.suppressed and self.logger.isEnabledFor(bucket.level):
            extra = dict(bucket.extra)
            extra["suppressed"] = bucket.suppressed
            self.logger.log(
                bucket.level,
                f"{bucket.suppressed} similar record(s) suppressed, the last: {bucket.msg}",
                *bucket.args,
                extra=extra,
            )
