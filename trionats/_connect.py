"""Opening a connection: ``connect`` and ``open_connection``."""

from __future__ import annotations

import functools
import ssl
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from . import _errors
from ._connection import Connection, _bridge
from ._msg import Msg
from ._validate import check_positive

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

__all__ = ["connect", "open_connection"]


def _normalize_servers(servers: str | Sequence[str]) -> list[str]:
    if isinstance(servers, str):
        servers = [s.strip() for s in servers.split(",")]
    if not isinstance(servers, list | tuple):
        raise TypeError(f"servers must be a URL or a list of URLs, got {servers!r}")
    result: list[str] = []
    for url in servers:
        if not isinstance(url, str) or not url:
            raise ValueError(f"servers: each server must be a non-empty URL string, got {url!r}")
        if "://" not in url:
            url = "nats://" + url
        scheme, _, rest = url.partition("://")
        if scheme not in ("nats", "tls", "ws", "wss") or not rest or rest.startswith(":"):
            raise ValueError(f"servers: malformed NATS URL {url!r}")
        host_port = rest.rsplit("@", 1)[-1].split("/", 1)[0]
        if ":" in host_port:
            port = host_port.rsplit(":", 1)[1]
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"servers: bad port in {url!r}")
        result.append(url)
    if not result:
        raise ValueError("servers must not be empty")
    return result


def _is_fatal_connect_error(exc: BaseException) -> bool:
    """Errors that another attempt cannot fix: TLS verification, bad credentials."""
    return isinstance(exc, ssl.SSLError) or "authorization" in str(exc).lower()


async def connect(
    servers: str | Sequence[str] = "nats://127.0.0.1:4222",
    *,
    name: str | None = None,
    connect_timeout: float = 5.0,
    close_timeout: float = 5.0,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    nkeys_seed: str | None = None,
    nkeys_seed_str: str | None = None,
    user_credentials: str | None = None,
    tls: ssl.SSLContext | None = None,
    tls_hostname: str | None = None,
    allow_reconnect: bool = True,
    max_reconnect_attempts: int = -1,
    reconnect_time_wait: float = 2.0,
    ping_interval: float = 120.0,
    max_outstanding_pings: int = 2,
    no_echo: bool = False,
    pending_size: int = 2 * 1024 * 1024,
    inbox_prefix: str = "_INBOX",
) -> Connection:
    """Connect without a context manager; the caller must ``await conn.aclose()``.

    Needs a trio-asyncio loop in this task tree (the pool opens one). Most code wants
    :func:`open_connection`, which owns the loop and the close.
    """
    server_list = _normalize_servers(servers)
    check_positive("connect_timeout", connect_timeout)
    check_positive("close_timeout", close_timeout)
    check_positive("reconnect_time_wait", reconnect_time_wait)
    check_positive("ping_interval", ping_interval)
    if tls is not None and not isinstance(tls, ssl.SSLContext):
        raise TypeError(f"tls must be an ssl.SSLContext, got {type(tls).__name__}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    bridge = _bridge()
    client = bridge.new_client()
    conn = Connection(client, name=name, close_timeout=close_timeout)
    client.msg_class = functools.partial(Msg, conn)
    errors: list[BaseException] = []
    scope = trio.CancelScope(deadline=trio.current_time() + connect_timeout)
    fatal = False

    async def on_error(exc: Exception) -> None:
        nonlocal fatal
        if not client.is_connected and not conn._closed and client._status in (0, 4):
            errors.append(exc)  # still connecting: reported in the ConnectError
            if _is_fatal_connect_error(exc):
                fatal = True  # retrying cannot help: fail now, not at the deadline
                scope.cancel()
            return
        await conn._on_error(exc)

    options: dict[str, Any] = dict(
        servers=server_list,
        name=name,
        error_cb=on_error,
        disconnected_cb=conn._on_disconnected,
        reconnected_cb=conn._on_reconnected,
        discovered_server_cb=conn._on_discovered,
        closed_cb=conn._on_closed,
        lame_duck_mode_cb=conn._on_lame_duck,
        connect_timeout=connect_timeout,
        # First connect: try each server twice, quickly; connect_timeout bounds the whole.
        allow_reconnect=True,
        max_reconnect_attempts=1,
        reconnect_time_wait=min(reconnect_time_wait, 0.05),
        ping_interval=ping_interval,
        max_outstanding_pings=max_outstanding_pings,
        no_echo=no_echo,
        pending_size=pending_size,
        inbox_prefix=inbox_prefix,
        user=user,
        password=password,
        token=token,
        nkeys_seed=nkeys_seed,
        nkeys_seed_str=nkeys_seed_str,
        user_credentials=user_credentials,
        tls=tls,
        tls_hostname=tls_hostname,
        skip_subject_validation=True,  # validated here, with clearer errors
    )
    where = ", ".join(server_list)
    ok = False
    try:
        try:
            with scope:
                await bridge.run_aio(client.connect, **options)
        except _errors.ConnectError as exc:
            cause = errors[-1] if errors else exc.__cause__
            raise _errors.ConnectError(f"could not connect to {where}: {cause or exc}") from cause
        if scope.cancelled_caught:
            if fatal:
                raise _errors.ConnectError(f"could not connect to {where}: {errors[-1]}") from (
                    errors[-1]
                )
            raise _errors.ConnectError(
                f"could not connect to {where} within {connect_timeout} s"
                + (f" (last error: {errors[-1]})" if errors else "")
            )
        ok = True
    finally:
        if not ok:
            conn._closed = True
            await bridge.force_close(client, close_timeout)
    client.options["allow_reconnect"] = allow_reconnect
    client.options["max_reconnect_attempts"] = max_reconnect_attempts
    client.options["reconnect_time_wait"] = reconnect_time_wait
    return conn


@asynccontextmanager
async def open_connection(
    servers: str | Sequence[str] = "nats://127.0.0.1:4222",
    **options: Any,
) -> AsyncIterator[Connection]:
    """Connect to NATS for the duration of the block.

    Works from a plain ``trio.run(main)``: the asyncio loop nats-py needs is opened (and
    closed) here when none is running in this task tree.

    Leaving the block normally flushes what was published and closes; leaving it by an
    exception or a cancel closes at once. Either way the close is shielded and bounded by
    ``close_timeout``, and no asyncio or Trio task is left behind.

    Example::

        async with trionats.open_connection("nats://127.0.0.1:4222", name="svc") as nc:
            await nc.publish("greet.joe", b"hello")
            reply = await nc.request("svc.echo", b"hi", timeout=2)

    Args:
        servers: a URL (``nats://host:port``), a comma-separated list, or a list of URLs.
        name: the client name shown by the server.
        connect_timeout: seconds for the whole first connect (all servers); then
            :class:`trionats.ConnectError`.
        close_timeout: bound on the shutdown of the connection.
        **options: ``user``, ``password``, ``token``, ``nkeys_seed`` (a seed file),
            ``nkeys_seed_str`` (the seed itself), ``user_credentials`` (a creds file),
            ``tls`` (an ``ssl.SSLContext``), ``tls_hostname``,
            ``allow_reconnect``, ``max_reconnect_attempts`` (-1: forever),
            ``reconnect_time_wait``, ``ping_interval``, ``max_outstanding_pings``,
            ``no_echo``, ``pending_size`` (reconnect buffer bytes), ``inbox_prefix``.

    Raises:
        ConnectError: no server could be reached within ``connect_timeout``.
        TypeError: an unknown option.
    """
    async with _bridge().loop_scope():
        conn = await connect(servers, **options)
        try:
            yield conn
        except BaseException:
            await conn.aclose()
            raise
        else:
            if not conn._closed:
                with trio.move_on_after(conn._close_timeout, shield=True):
                    try:
                        if conn.is_connected:
                            await conn.flush(timeout=conn._close_timeout)
                    except _errors.TrionatsError:
                        pass
            await conn.aclose()
