"""Opening a connection: ``connect`` and ``open_connection``."""

from __future__ import annotations

import ssl
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from . import _errors
from ._connection import Connection, _bridge
from ._msg import Msg
from ._otel import tracer_for
from ._request import _ReplyRouter
from ._subscription import Subscription
from ._validate import (
    check_auth_options,
    check_bool,
    check_int,
    check_publish_subject,
    check_seconds,
    check_str,
    parse_servers,
    redact,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

__all__ = ["connect", "open_connection"]  # connect is private: the pool uses it


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
    tracing: object = None,
) -> Connection:
    """Connect inside a trio-asyncio loop the caller owns; the caller must ``aclose()``.

    Private: the pool uses it inside its own loop. Users open connections with
    :func:`open_connection`, which owns the loop and the close.
    """
    server_list = parse_servers(servers)
    check_seconds("connect_timeout", connect_timeout)
    check_seconds("close_timeout", close_timeout)
    check_seconds("reconnect_time_wait", reconnect_time_wait, allow_zero=True)
    check_seconds("ping_interval", ping_interval)
    check_str("name", name, allow_none=True)
    check_auth_options(
        "",
        {
            "user": user,
            "password": password,
            "token": token,
            "nkeys_seed": nkeys_seed,
            "nkeys_seed_str": nkeys_seed_str,
            "user_credentials": user_credentials,
            "tls_hostname": tls_hostname,
            "tls": tls,
        },
    )
    check_bool("allow_reconnect", allow_reconnect)
    check_bool("no_echo", no_echo)
    check_int("max_reconnect_attempts", max_reconnect_attempts, minimum=-1)
    check_int("max_outstanding_pings", max_outstanding_pings, minimum=1)
    check_int("pending_size", pending_size, minimum=0)
    check_publish_subject(inbox_prefix, "inbox_prefix", cache=False)
    tracer = tracer_for(tracing)

    bridge = _bridge()
    bridge.check_internals()
    client = bridge.new_client()
    conn = Connection(client, name=name, close_timeout=close_timeout, servers=server_list)
    conn._tracer = tracer
    bridge.install_msg_factory(client, Msg, conn, (Subscription, _ReplyRouter))
    errors: list[BaseException] = []
    scope = trio.CancelScope(deadline=trio.current_time() + connect_timeout)
    fatal = False
    ok = False  # the first connect succeeded

    async def on_error(exc: Exception) -> None:
        nonlocal fatal
        if not ok:
            if not client.is_connected and not conn._closed and bridge.is_connecting(client):
                errors.append(exc)  # still connecting: reported in the ConnectError
                if _is_fatal_connect_error(exc):
                    fatal = True  # retrying cannot help: fail now, not at the deadline
                    scope.cancel()
                return
        elif not client.is_connected and not client.is_closed:
            # A reconnect attempt failed: nats-py leaves the socket of an attempt that
            # timed out (a frozen server) open, and the next attempt replaces it.
            bridge.abort_failed_attempt(client)
        await conn._on_error(exc)

    # Each attempt gets its share of the budget, so a server that accepts TCP and never
    # answers cannot eat the whole connect_timeout while another listed server is alive.
    attempts = 2 * len(server_list)  # every server is tried twice (see below)
    per_attempt = max(connect_timeout / attempts, min(connect_timeout, 1.0))
    options: dict[str, Any] = dict(
        servers=[s.url for s in server_list],
        name=name,
        error_cb=on_error,
        disconnected_cb=conn._on_disconnected,
        reconnected_cb=conn._on_reconnected,
        discovered_server_cb=conn._on_discovered,
        closed_cb=conn._on_closed,
        lame_duck_mode_cb=conn._on_lame_duck,
        connect_timeout=per_attempt,
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
    where = ", ".join(s.display for s in server_list)
    try:
        try:
            with scope:
                await bridge.run_aio(client.connect, **bridge.connect_options(options))
        except _errors.ConnectError as exc:
            cause = errors[-1] if errors else exc.__cause__
            raise _errors.ConnectError(
                redact(f"could not connect to {where}: {cause or exc}")
            ) from None
        if scope.cancelled_caught:
            last = f"{errors[-1]}" if errors else ""
            if fatal:
                raise _errors.ConnectError(redact(f"could not connect to {where}: {last}"))
            raise _errors.ConnectError(
                redact(
                    f"could not connect to {where} within {connect_timeout} s"
                    + (f" (last error: {last})" if last else "")
                )
            )
        ok = True
        conn._last_url = conn.connected_url
    finally:
        if not ok:
            conn._closed = True
            conn._released = True
            await bridge.force_close(client, close_timeout)
    bridge.set_reconnect_options(
        client,
        allow_reconnect=allow_reconnect,
        max_reconnect_attempts=max_reconnect_attempts,
        reconnect_time_wait=reconnect_time_wait,
        connect_timeout=connect_timeout,
    )
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
    ``close_timeout``, and no asyncio or Trio task is left behind. If the server closed
    the connection (a ``-ERR``) and no operation inside the block has raised that yet,
    leaving the block normally raises it: a connection never dies silently.

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
            ``no_echo``, ``pending_size`` (reconnect buffer bytes), ``inbox_prefix``,
            ``tracing``: OpenTelemetry spans (see the Production guide): None (the
            default) traces when ``opentelemetry-api`` is installed and a real tracer
            provider is set globally when the connection opens; False never; True with
            the global provider; or a ``TracerProvider`` to use.

    Raises:
        ConnectError: no server could be reached within ``connect_timeout``.
        ConnectionClosedError: the server closed the connection, unnoticed in the block.
        TypeError / ValueError: an unknown option, or a bad value (named in the message).
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
            if conn._death is not None and not conn._death_seen:
                raise conn._closed_error()
