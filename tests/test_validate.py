"""The shared validators and the one server-URL parser (pure functions, no server)."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from trionats._validate import (
    ServerURL,
    check_bool,
    check_headers,
    check_int,
    check_number,
    check_seconds,
    check_str,
    parse_server_url,
    parse_servers,
    redact,
)

# -- numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1.5, "3", True, False, None, b"1"])
def test_check_int_wrong_type_is_a_type_error_naming_field_and_value(value: object) -> None:
    with pytest.raises(TypeError, match=r"PoolConfig\.idle_per_server must be an int") as info:
        check_int("PoolConfig.idle_per_server", value)
    assert repr(value) in str(info.value)


def test_check_int_values() -> None:
    assert check_int("n", 0) == 0
    assert check_int("n", 5, minimum=5) == 5
    assert check_int("n", None, allow_none=True) is None
    with pytest.raises(ValueError, match=r"n must be >= 1, got 0"):
        check_int("n", 0, minimum=1)
    with pytest.raises(ValueError, match=r"pending_size must be >= 0, got -1"):
        check_int("pending_size", -1, minimum=0)
    with pytest.raises(TypeError, match="or None"):
        check_int("n", "x", allow_none=True)


@pytest.mark.parametrize("value", ["5", True, None, [1], b"2"])
def test_check_number_wrong_type(value: object) -> None:
    with pytest.raises(TypeError, match=r"timeout must be a number") as info:
        check_number("timeout", value)
    assert repr(value) in str(info.value)


def test_check_number_values() -> None:
    assert check_number("x", 3) == 3.0
    assert isinstance(check_number("x", 3), float)
    assert check_number("x", None, allow_none=True) is None
    assert check_number("x", math.inf, allow_inf=True) == math.inf
    assert check_number("x", 0.5, minimum=0, exclusive_maximum=1) == 0.5
    cases: list[tuple[dict[str, Any], float, str]] = [
        ({}, math.nan, "must be a number, got nan"),
        ({}, math.inf, "must be finite, got inf"),
        ({}, -math.inf, "must be finite"),
        ({"allow_inf": True}, math.nan, "got nan"),
        ({"minimum": 0}, -0.1, ">= 0, got -0.1"),
        ({"exclusive_minimum": 0}, 0, "> 0, got 0"),
        ({"maximum": 1}, 1.5, "<= 1, got 1.5"),
        ({"exclusive_maximum": 1}, 1.0, "< 1, got 1.0"),
    ]
    for kwargs, value, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            check_number("x", value, **kwargs)


def test_check_seconds() -> None:
    assert check_seconds("t", 2) == 2.0
    assert check_seconds("t", None, allow_none=True) is None
    assert check_seconds("t", 0, allow_zero=True) == 0.0
    for value in (0, -1, math.nan, math.inf, -0.0):
        with pytest.raises(ValueError, match=r"t must be a finite number of seconds > 0"):
            check_seconds("t", value)
    with pytest.raises(ValueError, match=">= 0"):
        check_seconds("t", -1, allow_zero=True)
    wrong_types: list[object] = ["1", True, None]
    for wrong in wrong_types:
        with pytest.raises(TypeError, match=r"t must be a number of seconds, got"):
            check_seconds("t", wrong)


def test_check_seconds_keeps_the_contract_check_positive_had() -> None:
    """check_positive (a second validator for durations) is gone: check_seconds has it."""
    check_seconds("timeout", 0.1)
    check_seconds("timeout", None, allow_none=True)
    with pytest.raises(TypeError, match="timeout"):
        check_seconds("timeout", "1")
    with pytest.raises(TypeError, match="timeout"):
        check_seconds("timeout", None)
    with pytest.raises(ValueError, match="timeout"):
        check_seconds("timeout", 0)


def test_check_bool_and_str() -> None:
    assert check_bool("no_echo", True) is True
    for value in (0, 1, "yes", None):
        with pytest.raises(TypeError, match=r"no_echo must be a bool, got") as info:
            check_bool("no_echo", value)
        assert repr(value) in str(info.value)
    assert check_str("user", "joe") == "joe"
    assert check_str("user", None, allow_none=True) is None
    assert check_str("name", "", allow_empty=True) == ""
    with pytest.raises(TypeError, match=r"user must be a str or None, got int: 5"):
        check_str("user", 5, allow_none=True)
    with pytest.raises(TypeError, match=r"user must be a str, got bytes"):
        check_str("user", b"joe")
    with pytest.raises(ValueError, match=r"user must not be empty"):
        check_str("user", "")


def test_header_names_are_ascii_tokens_and_values_have_no_line_breaks() -> None:
    assert check_headers({"X-Trace-Id": "a b c", "k": ""}) == {"X-Trace-Id": "a b c", "k": ""}
    for name in ("bad key", "", "a:b", "é", "a(b)", "a\nb", "a\x00"):
        with pytest.raises(ValueError, match="header name"):
            check_headers({name: "v"})
    for value in ("a\rb", "a\nb"):
        with pytest.raises(ValueError, match="line break"):
            check_headers({"k": value})
    with pytest.raises(TypeError, match="headers"):
        check_headers({"k": 1})
    with pytest.raises(TypeError, match="headers"):
        check_headers([("k", "v")])


# -- server URLs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "url", "display", "scheme", "host", "port", "creds"),
    [
        ("nats://h:1", "nats://h:1", "nats://h:1", "nats", "h", 1, False),
        ("h", "nats://h", "nats://h", "nats", "h", 4222, False),
        ("127.0.0.1:4223", "nats://127.0.0.1:4223", None, "nats", "127.0.0.1", 4223, False),
        ("NATS://H:5", "nats://H:5", "nats://H:5", "nats", "h", 5, False),
        ("nats://u:p@h:4", "nats://u:p@h:4", "nats://***@h:4", "nats", "h", 4, True),
        ("tls://s3cr3t@h", "tls://s3cr3t@h", "tls://***@h", "tls", "h", 4222, True),
        ("u:p@h:9", "nats://u:p@h:9", "nats://***@h:9", "nats", "h", 9, True),
        ("nats://[::1]:7", "nats://[::1]:7", "nats://[::1]:7", "nats", "::1", 7, False),
        ("nats://u:p@[::1]:7", "nats://u:p@[::1]:7", "nats://***@[::1]:7", "nats", "::1", 7, True),
        ("nats://u:p@ss@h", "nats://u:p@ss@h", "nats://***@h", "nats", "h", 4222, True),
        ("ws://h/nats", "ws://h/nats", "ws://h/nats", "ws", "h", 80, False),
        ("wss://t@h", "wss://t@h", "wss://***@h", "wss", "h", 443, True),
    ],
)
def test_parse_server_url(
    given: str, url: str, display: str | None, scheme: str, host: str, port: int, creds: bool
) -> None:
    parsed = parse_server_url(given)
    display = display or url
    assert parsed == ServerURL(url, display, scheme, host, port, creds)
    assert str(parsed) == display
    assert repr(parsed) == f"ServerURL({display!r})"
    assert parse_server_url(parsed) is parsed


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("", "empty"),
        ("http://u:pw123@a:1", "scheme"),
        ("nats://u:pw123@a:99999", "port"),
        ("nats://u:pw123@a:x", "port"),
        ("nats://u:pw123@a:0", "port"),
        ("nats://u:pw123@:4222", "no host"),
        ("nats://:4222", "no host"),
        ("nats://u:pw123@a b", "whitespace"),
        (" nats://a", "whitespace"),
        ("nats://u:pw123@a\n", "whitespace"),
        ("nats://u:pw/123@a", "percent-encode"),
        ("nats://u:pw123@a:1/path", "no path"),
    ],
)
def test_parse_server_url_rejects_naming_the_field_and_never_the_password(
    given: str, why: str
) -> None:
    with pytest.raises(ValueError, match=r"PoolConfig\.servers") as info:
        parse_server_url(given, "PoolConfig.servers")
    message = str(info.value)
    assert why in message
    assert "pw123" not in message
    assert "pw/123" not in message
    if "@" in given:
        assert "***@" in message


@pytest.mark.parametrize("value", [None, 5, b"nats://a", ["nats://a", 3]])
def test_parse_servers_wrong_type(value: object) -> None:
    with pytest.raises(TypeError, match="servers"):
        parse_servers(value)


def test_parse_servers_shapes() -> None:
    one = parse_servers("nats://a:1")
    assert [s.url for s in one] == ["nats://a:1"]
    comma = parse_servers("nats://a:1, b:2 ,tls://u:p@c")
    assert [s.url for s in comma] == ["nats://a:1", "nats://b:2", "tls://u:p@c"]
    assert [str(s) for s in comma] == ["nats://a:1", "nats://b:2", "tls://***@c"]
    assert parse_servers(("a", "a")) == (parse_server_url("a"),) * 2  # the caller decides
    assert [s.url for s in parse_servers(["a", "b"])] == ["nats://a", "nats://b"]
    empties: list[object] = [[], (), "", "a,,b"]
    for empty in empties:
        with pytest.raises(ValueError, match="servers"):
            parse_servers(empty)


# -- redaction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nats://user:pass@host:4222", "nats://***@host:4222"),
        ("token nats://s3cr3t@host", "token nats://***@host"),
        (
            "could not connect to nats://u:p@a:4222, tls://t@b:1",
            "could not connect to nats://***@a:4222, tls://***@b:1",
        ),
        ("nats://u:p@a,nats://c:d@b", "nats://***@a,nats://***@b"),
        ("['nats://u:p@[::1]:4222']", "['nats://***@[::1]:4222']"),
        ("nats://u:p@ss@h", "nats://***@h"),
        ("nats://u:pa/ss@h", "nats://***@h"),
        ("ws://u:p@h/path", "ws://***@h/path"),
        ("nats://[::1]:4222 and mail me@example.org", "nats://[::1]:4222 and mail me@example.org"),
        ("-nats://u:p@h", "-nats://***@h"),
        ("x1tls://t@h", "x1tls://***@h"),
        ("url=nats://u:p@h;next", "url=nats://***@h;next"),
        ("no url here, a@b", "no url here, a@b"),
        ("", ""),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redact_is_linear_on_hostile_text() -> None:
    # A long run of letters before '://' and no '@' after it: a regex tried each letter as
    # a scheme start (quadratic: 8,000 letters took 4 s; 100,000, minutes).
    hostile = [
        "@ " + "a" * 100_000 + "://" + "x" * 100_000,
        "@ " + "a1" * 50_000 + "://" + "x" * 100_000,
        "@" + "nats://" * 30_000,
        ("nats://u:p@h " * 10_000),
    ]
    start = time.perf_counter()
    for text in hostile[:3]:
        assert redact(text) == text
    assert redact(hostile[3]) == "nats://***@h " * 10_000
    assert time.perf_counter() - start < 1.0  # linear: a few ms here
