"""Frozen, validated configuration objects.

A bad option fails on construction, naming the field and the value (``PoolConfig.<field>``):
:class:`TypeError` for a wrong type, :class:`ValueError` for a wrong value, so a typo in a
config file fails at start-up rather than at the first borrow. The checks are the shared
ones of ``_validate``, the same as ``open_connection``'s.

Secrets never show: ``repr(config)`` prints ``'***'`` for the password, the token and the
nkeys seed, and server URLs only in their redacted form (``nats://***@host:4222``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal, final

from ._validate import (
    SECRET_OPTIONS,
    ServerURL,
    check_auth_options,
    check_bool,
    check_int,
    check_number,
    check_seconds,
    check_str,
    parse_servers,
)

if TYPE_CHECKING:
    import ssl
    from collections.abc import Sequence

__all__ = ["PoolConfig"]


@final
@dataclass(frozen=True, slots=True, init=False, repr=False)
class PoolConfig:
    """How a connection pool behaves. Validated on construction.

    Example::

        config = trionats.PoolConfig(
            servers=["nats://nats-a.example:4222", "nats://nats-b.example:4222"],
            user="svc",
            password=os.environ["NATS_PASSWORD"],
            idle_per_server=8,
            leak_timeout=60.0,
        )

    Attributes:
        servers: the NATS servers, parsed (:class:`ServerURL`; ``str()`` of one is its
            redacted form). Given as URLs (``nats://host:port``; a bare ``host:port`` gets
            ``nats://``), a list of them, or one str (several separated by commas). Each
            connection goes to one server. Credentials may sit in a URL, but the
            ``user``/``password``/``token``/... options keep them out of URLs altogether.
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
            (then their holders are cancelled and waited for as long again); it also bounds
            the closing of all the pool's connections together (they close concurrently).
        name: the client name the pool's connections announce to the server.
        user: user name for user/password authentication (with ``password``).
        password: the password (never shown by ``repr``).
        token: an authentication token (never shown by ``repr``).
        nkeys_seed: path of a file holding an NKEYS seed.
        nkeys_seed_str: the NKEYS seed itself (never shown by ``repr``).
        user_credentials: path of a ``.creds`` file (JWT and seed).
        tls: the :class:`ssl.SSLContext` for ``tls://`` servers (or to require TLS).
        tls_hostname: the host name to verify the servers' certificates against.
        discover_servers: add the servers a cluster announces (``connect_urls`` in the
            server's INFO) to the pool's servers, so a pool given one node of a cluster
            spreads over the whole cluster and keeps working when that node is down.
            Discovered servers get the scheme of the server that announced them and the
            pool's auth and TLS options. On by default; False keeps exactly ``servers``.
        shared_leases_per_connection: cap on the shared leases
            (``pool.borrow(shared=True)``) one connection carries at once, or None for no
            cap (the default: every shared borrower multiplexes onto one connection, as
            tasks sharing one nats-py connection do). With a cap, shared borrowers spread
            over more connections (the least loaded first); beyond what
            ``max_per_server`` allows they wait in FIFO order.

    Raises:
        TypeError: a field has the wrong type; the message names the field.
        ValueError: a field has a bad value; the message names the field and the value.
    """

    servers: tuple[ServerURL, ...]
    idle_per_server: int
    max_per_server: int | None
    dial_timeout: float
    max_life: float
    max_life_jitter: float
    backoff_min: float
    backoff_max: float
    leak_timeout: float
    leak_action: Literal["report", "cancel"]
    close_timeout: float
    name: str | None
    user: str | None
    password: str | None
    token: str | None
    nkeys_seed: str | None
    nkeys_seed_str: str | None
    user_credentials: str | None
    tls: ssl.SSLContext | None
    tls_hostname: str | None
    discover_servers: bool
    shared_leases_per_connection: int | None

    def __init__(
        self,
        servers: str | Sequence[str | ServerURL],
        idle_per_server: int = 32,
        max_per_server: int | None = None,
        dial_timeout: float = 10.0,
        max_life: float = 3600.0,
        max_life_jitter: float = 0.025,
        backoff_min: float = 1.0,
        backoff_max: float = 30.0,
        leak_timeout: float = 300.0,
        leak_action: Literal["report", "cancel"] = "report",
        close_timeout: float = 10.0,
        name: str | None = None,
        *,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        nkeys_seed: str | None = None,
        nkeys_seed_str: str | None = None,
        user_credentials: str | None = None,
        tls: ssl.SSLContext | None = None,
        tls_hostname: str | None = None,
        discover_servers: bool = True,
        shared_leases_per_connection: int | None = None,
    ) -> None:
        def put(field: str, value: object) -> None:
            object.__setattr__(self, field, value)

        urls = parse_servers(servers, "PoolConfig.servers")
        seen: set[tuple[str, str, int]] = set()
        for url in urls:
            key = (url.scheme, url.host.lower(), url.port)
            if key in seen:
                raise ValueError(f"PoolConfig.servers must not list a server twice: {url!r}")
            seen.add(key)
        put("servers", urls)
        put("idle_per_server", check_int("PoolConfig.idle_per_server", idle_per_server, minimum=0))
        put(
            "max_per_server",
            check_int("PoolConfig.max_per_server", max_per_server, minimum=1, allow_none=True),
        )
        put("dial_timeout", check_seconds("PoolConfig.dial_timeout", dial_timeout))
        put("max_life", check_seconds("PoolConfig.max_life", max_life))
        put(
            "max_life_jitter",
            check_number(
                "PoolConfig.max_life_jitter", max_life_jitter, minimum=0, exclusive_maximum=1
            ),
        )
        put("backoff_min", check_seconds("PoolConfig.backoff_min", backoff_min))
        put("backoff_max", check_seconds("PoolConfig.backoff_max", backoff_max))
        if self.backoff_min > self.backoff_max:
            raise ValueError(
                f"PoolConfig.backoff_min must be <= backoff_max ({self.backoff_max!r}),"
                f" got {self.backoff_min!r}"
            )
        put("leak_timeout", check_seconds("PoolConfig.leak_timeout", leak_timeout))
        check_str("PoolConfig.leak_action", leak_action)
        if leak_action not in ("report", "cancel"):
            raise ValueError(
                f'PoolConfig.leak_action must be "report" or "cancel", got {leak_action!r}'
            )
        put("leak_action", leak_action)
        put("close_timeout", check_seconds("PoolConfig.close_timeout", close_timeout))
        put("name", check_str("PoolConfig.name", name, allow_none=True, allow_empty=True))
        auth: dict[str, object] = {
            "user": user,
            "password": password,
            "token": token,
            "nkeys_seed": nkeys_seed,
            "nkeys_seed_str": nkeys_seed_str,
            "user_credentials": user_credentials,
            "tls_hostname": tls_hostname,
            "tls": tls,
        }
        check_auth_options("PoolConfig.", auth)
        for field, value in auth.items():
            put(field, value)
        put("discover_servers", check_bool("PoolConfig.discover_servers", discover_servers))
        put(
            "shared_leases_per_connection",
            check_int(
                "PoolConfig.shared_leases_per_connection",
                shared_leases_per_connection,
                minimum=1,
                allow_none=True,
            ),
        )

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_OPTIONS and value is not None:
                parts.append(f"{f.name}='***'")
            else:
                parts.append(f"{f.name}={value!r}")
        return f"PoolConfig({', '.join(parts)})"
