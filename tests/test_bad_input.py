"""The bad-input catalogue: every public entry point, table-driven, against a real server.

Each bad value gets the documented exception (``TypeError`` for a wrong type,
``ValueError`` for a wrong value, ``ConnectionClosedError`` for a closed connection or an
ended lease, ...) with a message naming the field or the value, and the connection is
still usable afterwards (checked by a publish + receive round trip after every case).
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

import trionats
from trionats import PoolConfig, SubscriberConfig

Case = tuple[str, Callable[[trionats.Connection], Awaitable[Any]], type[BaseException], str]

BIG = 2 * 1024 * 1024  # over the default max_payload (1 MiB)


async def _sub(nc: trionats.Connection, subject: Any, **kw: Any) -> None:
    async with nc.subscribe(subject, **kw):
        pass  # pragma: no cover


def _cases() -> list[Case]:
    c: list[Case] = []

    def add(
        name: str, fn: Callable[[trionats.Connection], Awaitable[Any]], exc: type, words: str
    ) -> None:
        c.append((name, fn, exc, words))

    # publish: subjects
    for subject, exc in [
        ("", ValueError),
        ("a..b", ValueError),
        ("a b", ValueError),
        ("a.*", ValueError),
        ("a.>", ValueError),
        (">", ValueError),
        ("a\r\nPUB x 1", ValueError),
        ("a" * 1025, ValueError),
        (b"bytes.subject", TypeError),
        (None, TypeError),
        (42, TypeError),
    ]:
        add(
            f"publish subject {subject!r:.20}",
            lambda nc, s=subject: nc.publish(s, b"x"),
            exc,
            "subject",
        )
    # publish: payloads
    for data, exc, words in [
        ("text", TypeError, "data"),
        (None, TypeError, "data"),
        (12, TypeError, "data"),
        ([b"x"], TypeError, "data"),
        (b"x" * BIG, ValueError, "max_payload"),
    ]:
        add(
            f"publish data {type(data).__name__}",
            lambda nc, d=data: nc.publish("ok", d),
            exc,
            words,
        )
    # publish: headers and reply
    for headers, exc, words in [
        ({"k": 1}, TypeError, "header"),
        ({1: "v"}, TypeError, "header"),
        ("k: v", TypeError, "headers"),
        ({"bad name": "v"}, ValueError, "bad name"),
        ({"k": "line\r\nbreak"}, ValueError, "k"),
        ({"k": "v" * BIG}, ValueError, "max_payload"),
    ]:
        add(
            f"publish headers {headers!r:.20}",
            lambda nc, h=headers: nc.publish("ok", b"x", headers=h),
            exc,
            words,
        )
    add("publish reply wildcard", lambda nc: nc.publish("ok", b"", reply="r.*"), ValueError, "r.*")
    add("publish reply type", lambda nc: nc.publish("ok", b"", reply=5), TypeError, "reply")
    # request
    for timeout, exc in [
        (-1, ValueError),
        (0, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("2", TypeError),
        (True, TypeError),
    ]:
        add(
            f"request timeout {timeout!r}",
            lambda nc, t=timeout: nc.request("ok", b"", timeout=t),
            exc,
            "timeout",
        )
    add("request subject wildcard", lambda nc: nc.request("a.*", b""), ValueError, "a.*")
    add("request data str", lambda nc: nc.request("ok", "x"), TypeError, "data")
    # subscribe
    for subject, exc in [
        ("", ValueError),
        ("a..b", ValueError),
        ("a.>.b", ValueError),
        ("a b", ValueError),
        (b"x", TypeError),
        (None, TypeError),
    ]:
        add(f"subscribe subject {subject!r}", lambda nc, s=subject: _sub(nc, s), exc, "subject")
    for queue, exc in [("", ValueError), ("q q", ValueError), ("q.*", ValueError), (5, TypeError)]:
        add(f"subscribe queue {queue!r}", lambda nc, q=queue: _sub(nc, "s", queue=q), exc, "queue")
    for field, value, exc in [
        ("max_pending_msgs", 0, ValueError),
        ("max_pending_msgs", -5, ValueError),
        ("max_pending_msgs", 1.5, TypeError),
        ("max_pending_bytes", 0, ValueError),
        ("max_pending_bytes", "1", TypeError),
        ("timeout", -1, ValueError),
        ("timeout", math.nan, ValueError),
    ]:
        add(
            f"subscribe {field}={value!r}",
            lambda nc, f=field, v=value: _sub(nc, "s", **{f: v}),
            exc,
            field,
        )
    # flush and drain timeouts (drain: last, it closes the connection when it works)
    for timeout, exc in [(-1, ValueError), (math.inf, ValueError), ("1", TypeError)]:
        add(f"flush timeout {timeout!r}", lambda nc, t=timeout: nc.flush(timeout=t), exc, "timeout")
        add(f"drain timeout {timeout!r}", lambda nc, t=timeout: nc.drain(timeout=t), exc, "timeout")
    return c


CASES = _cases()


async def _round_trip(nc: trionats.Connection) -> None:
    async with nc.subscribe("catalogue.alive") as sub:
        await nc.publish("catalogue.alive", b"still here")
        with trio.fail_after(5):
            assert (await sub.next_msg()).data == b"still here"


def _named(exc: BaseException, words: str) -> None:
    assert words.lower() in str(exc).lower(), f"{words!r} not in {str(exc)!r}"


@pytest.mark.parametrize(("name", "call", "exc", "words"), CASES, ids=[c[0] for c in CASES])
async def test_connection_bad_input(
    nats_url: str, name: str, call: Callable[..., Awaitable[Any]], exc: type, words: str
) -> None:
    async with trionats.open_connection(nats_url) as nc:
        with pytest.raises(exc) as info:
            await call(nc)
        _named(info.value, words)
        assert not isinstance(info.value, trionats.ConnectionClosedError)
        await _round_trip(nc)  # nothing was sent: the connection is fine


OPEN_CASES: list[tuple[str, dict[str, Any], type, str]] = [
    ("servers empty", {"servers": ""}, ValueError, "servers"),
    ("servers bad scheme", {"servers": "http://127.0.0.1:4222"}, ValueError, "http"),
    ("servers bad port", {"servers": "nats://127.0.0.1:99999"}, ValueError, "99999"),
    ("servers port text", {"servers": "nats://127.0.0.1:abc"}, ValueError, "abc"),
    ("servers type", {"servers": 4222}, TypeError, "servers"),
    ("servers list item", {"servers": ["nats://127.0.0.1:4222", 5]}, TypeError, "5"),
    ("connect_timeout", {"connect_timeout": -1}, ValueError, "connect_timeout"),
    ("connect_timeout nan", {"connect_timeout": math.nan}, ValueError, "connect_timeout"),
    ("connect_timeout str", {"connect_timeout": "5"}, TypeError, "connect_timeout"),
    ("close_timeout inf", {"close_timeout": math.inf}, ValueError, "close_timeout"),
    ("reconnect_time_wait", {"reconnect_time_wait": -0.1}, ValueError, "reconnect_time_wait"),
    ("ping_interval", {"ping_interval": 0}, ValueError, "ping_interval"),
    ("max_outstanding_pings", {"max_outstanding_pings": 0}, ValueError, "max_outstanding_pings"),
    ("max_reconnect_attempts", {"max_reconnect_attempts": -2}, ValueError, "max_reconnect"),
    ("max_reconnect_attempts f", {"max_reconnect_attempts": 1.0}, TypeError, "max_reconnect"),
    ("pending_size", {"pending_size": -1}, ValueError, "pending_size"),
    ("allow_reconnect", {"allow_reconnect": 1}, TypeError, "allow_reconnect"),
    ("no_echo", {"no_echo": "yes"}, TypeError, "no_echo"),
    ("name", {"name": 5}, TypeError, "name"),
    ("inbox_prefix", {"inbox_prefix": "a.*"}, ValueError, "inbox_prefix"),
    ("user type", {"user": 5}, TypeError, "user"),
    ("token type", {"token": b"t"}, TypeError, "token"),
    ("tls type", {"tls": "yes"}, TypeError, "tls"),
    ("creds file missing", {"user_credentials": "/no/such.creds"}, ValueError, "user_credentials"),
    ("seed file missing", {"nkeys_seed": "/no/such.nk"}, ValueError, "nkeys_seed"),
    ("unknown option", {"colour": "blue"}, TypeError, "colour"),
]


@pytest.mark.parametrize(("name", "kw", "exc", "words"), OPEN_CASES, ids=[c[0] for c in OPEN_CASES])
async def test_open_connection_bad_input(
    nats_url: str, name: str, kw: dict[str, Any], exc: type, words: str
) -> None:
    kw = {"servers": nats_url, **kw}
    servers = kw.pop("servers")
    start = trio.current_time()
    with pytest.raises(exc) as info:
        async with trionats.open_connection(servers, **kw):
            pass  # pragma: no cover
    _named(info.value, words)
    assert trio.current_time() - start < 1  # refused before any network wait


POOL_CASES: list[tuple[str, dict[str, Any], type, str]] = [
    ("servers", {"servers": []}, ValueError, "servers"),
    (
        "servers twice",
        {"servers": ["127.0.0.1:4222", "nats://127.0.0.1:4222"]},
        ValueError,
        "twice",
    ),
    ("idle_per_server", {"idle_per_server": -1}, ValueError, "idle_per_server"),
    ("idle_per_server type", {"idle_per_server": 1.5}, TypeError, "idle_per_server"),
    ("max_per_server", {"max_per_server": 0}, ValueError, "max_per_server"),
    ("dial_timeout", {"dial_timeout": math.nan}, ValueError, "dial_timeout"),
    ("max_life", {"max_life": -5}, ValueError, "max_life"),
    ("max_life_jitter", {"max_life_jitter": 1.0}, ValueError, "max_life_jitter"),
    ("backoff order", {"backoff_min": 5.0, "backoff_max": 1.0}, ValueError, "backoff_min"),
    ("leak_timeout", {"leak_timeout": math.inf}, ValueError, "leak_timeout"),
    ("leak_action", {"leak_action": "explode"}, ValueError, "explode"),
    ("leak_action type", {"leak_action": 1}, TypeError, "leak_action"),
    ("close_timeout", {"close_timeout": "1"}, TypeError, "close_timeout"),
    ("name", {"name": 1}, TypeError, "name"),
    ("password type", {"user": "u", "password": 5}, TypeError, "password"),
    ("creds file missing", {"user_credentials": "/no/such.creds"}, ValueError, "user_credentials"),
]


@pytest.mark.parametrize(("name", "kw", "exc", "words"), POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_pool_config_bad_input(name: str, kw: dict[str, Any], exc: type, words: str) -> None:
    kw = {"servers": ["nats://127.0.0.1:4222"], **kw}
    with pytest.raises(exc) as info:
        PoolConfig(**kw)
    _named(info.value, words)
    assert "PoolConfig" in str(info.value)


SUBSCRIBER_CASES: list[tuple[str, dict[str, Any], type, str]] = [
    ("max_workers", {"max_workers": 0}, ValueError, "max_workers"),
    ("max_workers type", {"max_workers": "8"}, TypeError, "max_workers"),
    ("pending_msgs", {"pending_msgs": -1}, ValueError, "pending_msgs"),
    ("pending_bytes", {"pending_bytes": 0}, ValueError, "pending_bytes"),
    ("handler_timeout", {"handler_timeout": -1}, ValueError, "handler_timeout"),
    ("stop_timeout", {"stop_timeout": math.nan}, ValueError, "stop_timeout"),
]


@pytest.mark.parametrize(
    ("name", "kw", "exc", "words"), SUBSCRIBER_CASES, ids=[c[0] for c in SUBSCRIBER_CASES]
)
def test_subscriber_config_bad_input(name: str, kw: dict[str, Any], exc: type, words: str) -> None:
    with pytest.raises(exc) as info:
        SubscriberConfig(**kw)
    _named(info.value, words)


async def _handler(msg: trionats.Msg) -> None:
    pass


def _sync_handler(msg: trionats.Msg) -> None:
    pass  # pragma: no cover


async def test_pool_borrow_and_lease_bad_input(nats_url: str) -> None:
    async with trionats.open_pool(PoolConfig(servers=[nats_url])) as pool:
        for timeout, exc in [(-1, ValueError), (math.nan, ValueError), ("1", TypeError)]:
            with pytest.raises(exc) as info:
                async with pool.borrow(timeout=timeout):  # type: ignore[arg-type]
                    pass  # pragma: no cover
            _named(info.value, "timeout")
        with pytest.raises(TypeError, match="long_lived"):
            async with pool.borrow(long_lived="yes"):  # type: ignore[arg-type]
                pass  # pragma: no cover
        async with pool.borrow() as nc:
            await _round_trip(nc)
        # a returned lease
        with pytest.raises(trionats.ConnectionClosedError, match="lease"):
            await nc.publish("x", b"")
        with pytest.raises(trionats.ConnectionClosedError, match="lease"):
            await nc.request("x", b"", timeout=1)
        # the pool still works
        async with pool.borrow() as again:
            await _round_trip(again)


async def test_subscriber_bad_input(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc, trionats.open_subscriber(nc) as sub:
        for handler, exc, words in [
            (_sync_handler, TypeError, "_sync_handler"),
            (None, TypeError, "None"),
            ("handler", TypeError, "handler"),
        ]:
            with pytest.raises(exc) as info:
                await sub.start("s", handler)  # type: ignore[arg-type]
            _named(info.value, words)
        for kw, exc, words in [
            ({"queue": "a b"}, ValueError, "queue"),
            ({"max_workers": 0}, ValueError, "max_workers"),
        ]:
            with pytest.raises(exc) as info:
                await sub.start("s", _handler, **kw)
            _named(info.value, words)
        with pytest.raises(ValueError, match="subject"):
            await sub.start("a..b", _handler)
        handle = await sub.start("s", _handler)
        with pytest.raises(ValueError, match="timeout"):
            await handle.stop(timeout=-1)
        await handle.stop()
        await handle.stop()  # a stopped handle: safe to stop again
        await _round_trip(nc)
    with pytest.raises(TypeError, match="open_subscriber"):
        async with trionats.open_subscriber("nats://x"):  # type: ignore[arg-type]
            pass  # pragma: no cover


async def test_closed_connection(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        pass
    for call in [
        lambda: nc.publish("a", b""),
        lambda: nc.request("a", b"", timeout=1),
        lambda: _sub(nc, "a"),
        lambda: nc.flush(timeout=1),
    ]:
        with pytest.raises(trionats.ConnectionClosedError, match=re.compile("clos", re.I)):
            await call()
    await nc.drain(timeout=1)  # draining a closed connection: nothing to do, no error
