"""Frozen, validated configuration objects.

A bad value raises :class:`ValueError` on construction, naming the field and the value, so
a typo in a config file fails at start-up rather than at the first borrow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, final

__all__ = ["PoolConfig"]

_SCHEMES = ("nats", "tls", "ws", "wss")


def _fail(name: str, value: object, why: str) -> ValueError:
    return ValueError(f"PoolConfig.{name} {why}, got {value!r}")


def _check_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(name, value, "must be a number of seconds")
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise _fail(name, value, "must be a finite number of seconds > 0")
    return float(value)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, value, "must be an int")
    if value < minimum:
        raise _fail(name, value, f"must be >= {minimum}")
    return value


def _check_url(url: object) -> str:
    if not isinstance(url, str) or not url.strip():
        raise _fail("servers", url, "must hold non-empty URL strings")
    url = url.strip()
    if "://" not in url:
        url = "nats://" + url
    scheme, _, rest = url.partition("://")
    host_port = rest.rsplit("@", 1)[-1].split("/", 1)[0]
    host, sep, port = host_port.rpartition(":") if ":" in host_port else (host_port, "", "")
    if (
        scheme not in _SCHEMES
        or not host
        or any(c.isspace() for c in url)
        or (sep and (not port.isdigit() or not 0 < int(port) < 65536))
    ):
        raise _fail("servers", url, "holds a malformed NATS URL")
    return url


@final
@dataclass(frozen=True, slots=True)
class PoolConfig:
    """How a connection pool behaves. Validated on construction.

    Example::

        config = trionats.PoolConfig(
            servers=["nats://nats-a.example:4222", "nats://nats-b.example:4222"],
            idle_per_server=8,
            leak_timeout=60.0,
        )

    Attributes:
        servers: the NATS URLs (``nats://host:port``; a bare ``host:port`` gets ``nats://``).
            Each connection goes to one server; a str is one URL.
        idle_per_server: idle connections kept per server (more are closed on return).
        max_per_server: cap on open connections per server (idle + borrowed + dialing), or
            None for no cap. Borrowers beyond it wait in FIFO order.
        dial_timeout: seconds one dial may take before it counts as a failure.
        max_life: seconds a connection lives, counted from its birth (kept across borrows).
        max_life_jitter: each connection's life is ``max_life * (1 ± max_life_jitter)``
            (uniform), in [0, 1), so connections born together do not expire together.
        backoff_min: seconds a server is avoided after its first dial failure (at least).
        backoff_max: cap on the avoidance after repeated failures.
        leak_timeout: seconds a lease may be held before it is reported as a leak.
        leak_action: "report" (log and count) or "cancel" (also cancel the holder's
            ``borrow`` block, which then raises :class:`trionats.LeaseExpiredError`).
        close_timeout: at shutdown, seconds to wait for borrowed connections to come back
            (then their holders are cancelled and waited for as long again); also bounds
            each connection's close.
        name: the client name the pool's connections announce to the server.
    """

    servers: Sequence[str]
    idle_per_server: int = 32
    max_per_server: int | None = None
    dial_timeout: float = 10.0
    max_life: float = 3600.0
    max_life_jitter: float = 0.025
    backoff_min: float = 1.0
    backoff_max: float = 30.0
    leak_timeout: float = 300.0
    leak_action: Literal["report", "cancel"] = "report"
    close_timeout: float = 10.0
    name: str | None = field(default=None)

    def __post_init__(self) -> None:
        servers: object = self.servers
        if isinstance(servers, str):
            servers = [servers]
        if not isinstance(servers, Sequence) or isinstance(servers, bytes):
            raise _fail("servers", servers, "must be a list of NATS URLs")
        urls = tuple(_check_url(u) for u in servers)
        if not urls:
            raise _fail("servers", self.servers, "must not be empty")
        if len(set(urls)) != len(urls):
            raise _fail("servers", self.servers, "must not list a server twice")
        object.__setattr__(self, "servers", urls)
        _check_int("idle_per_server", self.idle_per_server, 0)
        if self.max_per_server is not None:
            _check_int("max_per_server", self.max_per_server, 1)
        for name in (
            "dial_timeout",
            "max_life",
            "backoff_min",
            "backoff_max",
            "leak_timeout",
            "close_timeout",
        ):
            object.__setattr__(self, name, _check_seconds(name, getattr(self, name)))
        jitter = self.max_life_jitter
        if (
            isinstance(jitter, bool)
            or not isinstance(jitter, int | float)
            or math.isnan(jitter)
            or not 0 <= jitter < 1
        ):
            raise _fail("max_life_jitter", jitter, "must be a number in [0, 1)")
        object.__setattr__(self, "max_life_jitter", float(jitter))
        if self.backoff_min > self.backoff_max:
            raise _fail(
                "backoff_min", self.backoff_min, f"must be <= backoff_max ({self.backoff_max!r})"
            )
        if self.leak_action not in ("report", "cancel"):
            raise _fail("leak_action", self.leak_action, 'must be "report" or "cancel"')
        if self.name is not None and not isinstance(self.name, str):
            raise _fail("name", self.name, "must be a str or None")
