"""Argument checks shared by the public API: clear errors before anything is sent."""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "check_data",
    "check_headers",
    "check_positive",
    "check_publish_subject",
    "check_queue",
    "check_subscribe_subject",
]

# Validated publish subjects, so the hot path pays one set lookup per call.
_PUBLISH_OK: set[str] = set()
_PUBLISH_CACHE_MAX = 8192
_FORBIDDEN = frozenset(" \t\r\n\x00")


def _tokens(what: str, subject: object) -> list[str]:
    if not isinstance(subject, str):
        raise TypeError(f"{what} must be a str, got {type(subject).__name__}: {subject!r}")
    if not subject:
        raise ValueError(f"{what} must not be empty")
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
    if queue is None:
        return None
    if not isinstance(queue, str):
        raise TypeError(f"queue must be a str or None, got {type(queue).__name__}: {queue!r}")
    if not queue or not _FORBIDDEN.isdisjoint(queue) or "*" in queue or ">" in queue:
        raise ValueError(
            f"queue must be a non-empty name without whitespace or wildcards: {queue!r}"
        )
    return queue


def check_data(data: object) -> bytes | bytearray | memoryview:
    if isinstance(data, bytes | bytearray | memoryview):
        return data
    raise TypeError(
        f"data must be bytes, bytearray or memoryview, got {type(data).__name__}"
        + (" (encode str first, e.g. data.encode())" if isinstance(data, str) else "")
    )


def check_headers(headers: object) -> dict[str, str] | None:
    if headers is None:
        return None
    if not isinstance(headers, dict):
        raise TypeError(f"headers must be a dict[str, str], got {type(headers).__name__}")
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"headers must be a dict[str, str], got item {key!r}: {value!r}")
        if not key.strip() or ":" in key or not _FORBIDDEN.isdisjoint(key):
            raise ValueError(f"header name is not valid: {key!r}")
        if "\r" in value or "\n" in value:
            raise ValueError(f"header {key!r} has a line break in its value: {value!r}")
    return headers


def check_positive(name: str, value: Any, *, allow_none: bool = False) -> None:
    """``value`` must be a finite number > 0 (or None where allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    if not (value > 0) or math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
