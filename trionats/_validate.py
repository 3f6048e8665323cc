"""Argument checks shared by the public API: clear errors before anything is sent.

One set of validators for every module (subjects, headers, payloads, numbers, durations,
flags, strings) and the one server-URL parser, with the same rules everywhere: a wrong
type is a :class:`TypeError`, a wrong value a :class:`ValueError`, and the message names
the field and shows the value (a URL always redacted: credentials never reach a message).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, final, overload
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "MAX_SUBJECT_BYTES",
    "SECRET_OPTIONS",
    "ServerURL",
    "check_auth_options",
    "check_bool",
    "check_data",
    "check_headers",
    "check_int",
    "check_number",
    "check_publish_subject",
    "check_queue",
    "check_seconds",
    "check_str",
    "check_subscribe_subject",
    "parse_server_url",
    "parse_servers",
    "redact",
]

# Validated publish subjects, so the hot path pays one set lookup per call.
_PUBLISH_OK: set[str] = set()
_PUBLISH_CACHE_MAX = 8192
_FORBIDDEN = frozenset(" \t\r\n\x00")
# An HTTP token (RFC 9110, 5.6.2): what a header name may be, in ASCII only.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_NAMES_OK: set[str] = set()


MAX_SUBJECT_BYTES = 1024
"""The longest subject (UTF-8 bytes) we send.

A protocol line (``PUB <subject> <reply> <size>``, ``SUB <subject> <queue> <sid>``) must
fit the server's ``max_control_line``, 4096 bytes by default, which the client cannot
learn from the server. A subject and a reply (or queue) of at most 1024 bytes each always
fit the default. A server configured with a smaller limit refuses a longer line with
``-ERR`` and closes the connection; trionats then raises the server's reason.
"""


def _tokens(what: str, subject: object) -> list[str]:
    if not isinstance(subject, str):
        raise TypeError(f"{what} must be a str, got {type(subject).__name__}: {subject!r}")
    if not subject:
        raise ValueError(f"{what} must not be empty")
    if len(subject) > MAX_SUBJECT_BYTES // 4 and len(subject.encode()) > MAX_SUBJECT_BYTES:
        raise ValueError(
            f"{what} is {len(subject.encode())} bytes long, over the {MAX_SUBJECT_BYTES}-byte "
            f"limit (the server's protocol line must hold it): {subject[:40]!r}..."
        )
    if not _FORBIDDEN.isdisjoint(subject):
        raise ValueError(f"{what} must not contain whitespace or NUL: {subject!r}")
    tokens = subject.split(".")
    if "" in tokens:
        raise ValueError(
            f"{what} has an empty token (leading, trailing or double dot): {subject!r}"
        )
    return tokens


def check_publish_subject(subject: object, what: str = "subject", *, cache: bool = True) -> str:
    """A literal subject: non-empty tokens, no whitespace, no wildcards.

    Valid subjects are remembered (``cache``) so a publish loop pays one set lookup;
    one-off subjects such as reply inboxes should pass ``cache=False``.
    """
    if subject in _PUBLISH_OK:
        return subject
    tokens = _tokens(what, subject)
    for token in tokens:
        if token in ("*", ">") or "*" in token or ">" in token:
            raise ValueError(f"{what} must not contain wildcards ('*' or '>'): {subject!r}")
    assert isinstance(subject, str)
    if not cache:
        return subject
    if len(_PUBLISH_OK) >= _PUBLISH_CACHE_MAX:
        _PUBLISH_OK.clear()
    _PUBLISH_OK.add(subject)
    return subject


def check_subscribe_subject(subject: object) -> str:
    """A subscription subject: wildcards allowed as whole tokens, '>' only last."""
    tokens = _tokens("subject", subject)
    for i, token in enumerate(tokens):
        if token == ">" and i != len(tokens) - 1:
            raise ValueError(f"subject: '>' is only allowed as the last token: {subject!r}")
        if token not in ("*", ">") and ("*" in token or ">" in token):
            raise ValueError(f"subject: wildcards must be whole tokens: {subject!r}")
    assert isinstance(subject, str)
    return subject


def check_queue(queue: object) -> str | None:
    """A queue group name, or None."""
    if queue is None:
        return None
    if not isinstance(queue, str):
        raise TypeError(f"queue must be a str or None, got {type(queue).__name__}: {queue!r}")
    if not queue or not _FORBIDDEN.isdisjoint(queue) or "*" in queue or ">" in queue:
        raise ValueError(
            f"queue must be a non-empty name without whitespace or wildcards: {queue!r}"
        )
    if len(queue.encode()) > MAX_SUBJECT_BYTES:
        raise ValueError(
            f"queue is {len(queue.encode())} bytes long, over the {MAX_SUBJECT_BYTES}-byte "
            f"limit: {queue[:40]!r}..."
        )
    return queue


def check_data(data: object) -> bytes | bytearray | memoryview:
    """A payload: bytes, bytearray or memoryview (a str is refused with a hint)."""
    if isinstance(data, bytes | bytearray | memoryview):
        return data
    raise TypeError(
        f"data must be bytes, bytearray or memoryview, got {type(data).__name__}"
        + (" (encode str first, e.g. data.encode())" if isinstance(data, str) else "")
    )


def check_headers(headers: object) -> dict[str, str] | None:
    """A dict of str to str: names are ASCII tokens, values hold no CR or LF."""
    if headers is None:
        return None
    if not isinstance(headers, dict):
        raise TypeError(f"headers must be a dict[str, str], got {type(headers).__name__}")
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"headers must be a dict[str, str], got item {key!r}: {value!r}")
        if key not in _HEADER_NAMES_OK:
            if not _HEADER_NAME.fullmatch(key):
                raise ValueError(
                    f"header name {key!r} is not valid: it must be a non-empty ASCII token"
                    " (letters, digits and !#$%&'*+-.^_`|~; no spaces, no ':')"
                )
            if len(_HEADER_NAMES_OK) >= _PUBLISH_CACHE_MAX:
                _HEADER_NAMES_OK.clear()
            _HEADER_NAMES_OK.add(key)
        if "\r" in value or "\n" in value:
            raise ValueError(f"header {key!r} has a line break in its value: {value!r}")
    return headers


# -- options: one set of validators for every module -------------------------------------
#
# The rules, the same everywhere: a bool is not a number; a wrong type is a TypeError, a
# wrong value (NaN, an infinity where not allowed, below the minimum, empty) a ValueError;
# the message names the field (``name`` may be "PoolConfig.max_life" or "connect_timeout")
# and shows the value.


def _type_error(name: str, expected: str, value: object) -> TypeError:
    return TypeError(f"{name} must be {expected}, got {type(value).__name__}: {value!r}")


@overload
def check_int(
    name: str, value: object, *, minimum: int | None = None, allow_none: Literal[False] = False
) -> int: ...


@overload
def check_int(
    name: str, value: object, *, minimum: int | None = None, allow_none: bool
) -> int | None: ...


def check_int(
    name: str, value: object, *, minimum: int | None = None, allow_none: bool = False
) -> int | None:
    """``value`` must be an int (not a bool), at least ``minimum``; None where allowed.

    Raises:
        TypeError: not an int (a float, a str, a bool...).
        ValueError: below ``minimum``.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an int" + (" or None" if allow_none else ""), value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


@overload
def check_number(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    exclusive_minimum: float | None = None,
    maximum: float | None = None,
    exclusive_maximum: float | None = None,
    allow_none: Literal[False] = False,
    allow_inf: bool = False,
) -> float: ...


@overload
def check_number(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    exclusive_minimum: float | None = None,
    maximum: float | None = None,
    exclusive_maximum: float | None = None,
    allow_none: bool,
    allow_inf: bool = False,
) -> float | None: ...


def check_number(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    exclusive_minimum: float | None = None,
    maximum: float | None = None,
    exclusive_maximum: float | None = None,
    allow_none: bool = False,
    allow_inf: bool = False,
) -> float | None:
    """``value`` must be an int or float (not a bool, not NaN), within the bounds given.

    Returns it as a float (None where allowed). Infinity is refused unless ``allow_inf``.

    Raises:
        TypeError: not a number.
        ValueError: NaN, an infinity where not allowed, or out of bounds.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(name, "a number" + (" or None" if allow_none else ""), value)
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if math.isinf(number) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and not number >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if exclusive_minimum is not None and not number > exclusive_minimum:
        raise ValueError(f"{name} must be > {exclusive_minimum}, got {value!r}")
    if maximum is not None and not number <= maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value!r}")
    if exclusive_maximum is not None and not number < exclusive_maximum:
        raise ValueError(f"{name} must be < {exclusive_maximum}, got {value!r}")
    return number


@overload
def check_seconds(
    name: str, value: object, *, allow_none: Literal[False] = False, allow_zero: bool = False
) -> float: ...


@overload
def check_seconds(
    name: str, value: object, *, allow_none: bool, allow_zero: bool = False
) -> float | None: ...


def check_seconds(
    name: str, value: object, *, allow_none: bool = False, allow_zero: bool = False
) -> float | None:
    """A duration: a finite number of seconds > 0 (>= 0 with ``allow_zero``), or None.

    None (where allowed) means "no deadline of its own".

    Raises:
        TypeError: not a number.
        ValueError: NaN, infinite, negative, or zero where not allowed.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(name, "a number of seconds" + (" or None" if allow_none else ""), value)
    number = float(value)
    ok = number >= 0 if allow_zero else number > 0
    if not ok or math.isnan(number) or math.isinf(number):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number of seconds {bound}, got {value!r}")
    return number


SECRET_OPTIONS = frozenset({"password", "token", "nkeys_seed_str"})
_FILE_OPTIONS = frozenset({"nkeys_seed", "user_credentials"})  # paths, read at connect
"""Options whose value is a secret: never echoed in a message or a repr."""


def check_auth_options(prefix: str, options: dict[str, object]) -> None:
    """The auth and TLS options of a connection (``open_connection``, ``PoolConfig``).

    ``options`` maps ``user``, ``password``, ``token``, ``nkeys_seed``,
    ``nkeys_seed_str``, ``user_credentials``, ``tls_hostname`` (each a str or None) and
    ``tls`` (an ``ssl.SSLContext`` or None). Messages name ``prefix + field``; a secret's
    value is never shown, only its type.

    Raises:
        TypeError: a wrong type.
        ValueError: an empty string, or a seed or creds file that does not exist.
    """
    import ssl  # only here: most callers never pass TLS options

    for field, value in options.items():
        name = prefix + field
        if field == "tls":
            if value is not None and not isinstance(value, ssl.SSLContext):
                raise TypeError(
                    f"{name} must be an ssl.SSLContext or None, got {type(value).__name__}"
                )
        elif field in SECRET_OPTIONS and value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
        else:
            path = check_str(name, value, allow_none=True)
            if field in _FILE_OPTIONS and path is not None and not os.path.isfile(path):
                raise ValueError(f"{name}: no such file: {value!r}")


def check_bool(name: str, value: object) -> bool:
    """``value`` must be True or False (not 0, 1 or "yes").

    Raises:
        TypeError: not a bool.
    """
    if not isinstance(value, bool):
        raise _type_error(name, "a bool", value)
    return value


@overload
def check_str(
    name: str, value: object, *, allow_none: Literal[False] = False, allow_empty: bool = False
) -> str: ...


@overload
def check_str(
    name: str, value: object, *, allow_none: bool, allow_empty: bool = False
) -> str | None: ...


def check_str(
    name: str, value: object, *, allow_none: bool = False, allow_empty: bool = False
) -> str | None:
    """``value`` must be a str, non-empty unless ``allow_empty``; None where allowed.

    Raises:
        TypeError: not a str (bytes included).
        ValueError: empty where not allowed.
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise _type_error(name, "a str" + (" or None" if allow_none else ""), value)
    if not value and not allow_empty:
        raise ValueError(f"{name} must not be empty, got {value!r}")
    return value


# -- server URLs: the one parser ---------------------------------------------------------

_SCHEMES = ("nats", "tls", "ws", "wss")
_DEFAULT_PORTS = {"nats": 4222, "tls": 4222, "ws": 80, "wss": 443}

# After each ``://``, the userinfo runs up to the last '@' before a whitespace or the next
# ``://`` (so several URLs in one string are each scrubbed, and a password holding a raw
# '@', '/' or ':' is scrubbed whole). Scrubbing too much is harmless; too little leaks.
# A plain scan, linear in the text: a regex for this backtracks quadratically on hostile
# input (a long run of letters before '://').
_WHITESPACE = re.compile(r"\s")
_REDACTED = "***"


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``.

    ``nats://user:secret@host:4222`` becomes ``nats://***@host:4222``; a token
    (``nats://s3cr3t@host``) is scrubbed the same way. For exception messages and log
    records that embed a URL from elsewhere (nats-py's own error strings, for one).

    Example::

        redact("could not connect to nats://u:p@a:4222, nats://t@b")
        # 'could not connect to nats://***@a:4222, nats://***@b'
    """
    if "@" not in text:
        return text
    sep = text.find("://")
    if sep == -1:
        return text
    parts: list[str] = []
    done = 0
    while sep != -1:
        start = sep + 3
        following = text.find("://", start)
        limit = len(text) if following == -1 else following
        space = _WHITESPACE.search(text, start, limit)
        at = text.rfind("@", start, limit if space is None else space.start())
        if at != -1:
            parts.append(text[done:start])
            parts.append(_REDACTED)
            done = at
        sep = following
    parts.append(text[done:])
    return "".join(parts)


@final
@dataclass(frozen=True, slots=True, repr=False)
class ServerURL:
    """One NATS server URL, parsed and checked; its credentials never show.

    ``str()`` and ``repr()`` give :attr:`display`; only :attr:`url` (what nats-py is given)
    holds the credentials.

    Attributes:
        url: the URL for the client, credentials included, ``nats://`` added when the
            scheme was missing (and the scheme lower-cased).
        display: the URL with its userinfo (``user:pass@`` or ``token@``) replaced by
            ``***@``: safe for logs, stats, reprs and error messages.
        scheme: ``nats``, ``tls``, ``ws`` or ``wss``.
        host: the host name or address (an IPv6 address without its brackets).
        port: the port, or the scheme's default (4222; 80 for ws, 443 for wss).
        has_credentials: the URL carries a userinfo part.
    """

    url: str
    display: str
    scheme: str
    host: str
    port: int
    has_credentials: bool

    def __repr__(self) -> str:
        return f"ServerURL({self.display!r})"

    def __str__(self) -> str:
        return self.display


def _url_error(name: str, shown: str, why: str) -> ValueError:
    return ValueError(f"{name}: {why}: {shown!r}")


def parse_server_url(url: object, name: str = "servers") -> ServerURL:
    """Parse and check one NATS server URL (a bare ``host:port`` gets ``nats://``).

    Args:
        url: ``nats://host:port``, ``tls://...``, ``ws://...``, ``wss://...``, optionally
            with ``user:pass@`` or ``token@``; or a :class:`ServerURL` (returned as is).
        name: the field named in errors.

    Raises:
        TypeError: not a str.
        ValueError: empty, whitespace inside, unknown scheme, no host, bad port, or raw
            ``/ ? #`` in the credentials. The message shows the URL *redacted*.
    """
    if isinstance(url, ServerURL):
        return url
    if not isinstance(url, str):
        raise _type_error(name, "a URL string", url)
    if not url:
        raise ValueError(f"{name}: a server URL must not be empty, got ''")
    raw = url if "://" in url else "nats://" + url
    scheme, _, rest = raw.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    shown = f"{scheme}://{_REDACTED}@{hostpart}" if at else raw
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in raw):
        raise _url_error(name, shown, "whitespace or a control character in the URL")
    scheme = scheme.lower()
    if scheme not in _SCHEMES:
        raise _url_error(name, shown, f"the scheme must be one of {', '.join(_SCHEMES)}")
    if at and any(c in userinfo for c in "/?#"):
        raise _url_error(
            name, shown, "the credentials hold a raw '/', '?' or '#' (percent-encode them)"
        )
    try:
        parts = urlsplit(f"{scheme}://{hostpart}")
        port = parts.port
    except ValueError as exc:
        raise _url_error(name, shown, f"malformed host or port ({exc})") from None
    host = parts.hostname
    if not host:
        raise _url_error(name, shown, "no host")
    if port is None:
        if parts.netloc.endswith(":"):
            raise _url_error(name, shown, "empty port")
        port = _DEFAULT_PORTS[scheme]
    elif port == 0:
        raise _url_error(name, shown, "the port must be in 1..65535")
    if scheme in ("nats", "tls") and (parts.path not in ("", "/") or parts.query):
        raise _url_error(name, shown, "a nats:// or tls:// URL has no path or query")
    full = f"{scheme}://{rest}"
    display = f"{scheme}://{_REDACTED}@{hostpart}" if at else full
    return ServerURL(
        url=full, display=display, scheme=scheme, host=host, port=port, has_credentials=bool(at)
    )


def parse_servers(value: object, name: str = "servers") -> tuple[ServerURL, ...]:
    """Parse a server list: one URL, a comma-separated str, or a list/tuple of URLs.

    Spaces around the commas of a comma-separated str are ignored. Duplicates are kept
    (the caller decides; :class:`trionats.PoolConfig` refuses them).

    Raises:
        TypeError: not a str or a list/tuple of str.
        ValueError: empty, or a bad URL (see :func:`parse_server_url`).
    """
    items: Sequence[object]
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")] if "," in value else [value]
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise _type_error(name, "a URL, a comma-separated str or a list of URLs", value)
    if not items:
        raise ValueError(f"{name} must not be empty, got {value!r}")
    return tuple(parse_server_url(item, name) for item in items)
