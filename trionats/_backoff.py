"""Reconnect backoff: exponential growth with full jitter, as pure functions.

The pool keeps, per server, the number of consecutive dial failures. After failure number
``attempt`` (1, 2, 3, ...) the server is left alone for :func:`backoff_delay` seconds:

* the *ceiling* doubles exactly once per failure, starting at ``2 * backoff_min`` and
  capped at ``backoff_max`` (``backoff_ceiling``);
* the delay is drawn uniformly from ``[backoff_min, ceiling]`` ("full jitter" with a floor,
  so a flapping server is never retried sooner than ``backoff_min``).

The original Go pool doubled the delay twice per failure (once when computing it, once
when storing it); ``tests`` pin the sequence of ceilings so that cannot come back.

The random source is injectable so tests and the pool's property tests are reproducible.
"""

from __future__ import annotations

import random

__all__ = ["backoff_ceiling", "backoff_delay"]

# 2**_MAX_SHIFT * backoff_min is far above any sane backoff_max; it only keeps the float
# arithmetic finite for absurd attempt counts.
_MAX_SHIFT = 62


def backoff_ceiling(attempt: int, backoff_min: float, backoff_max: float) -> float:
    """The largest delay after ``attempt`` consecutive failures.

    Args:
        attempt: the number of consecutive failures so far, >= 1.
        backoff_min: the smallest delay (seconds), > 0.
        backoff_max: the cap (seconds), >= backoff_min.

    Returns:
        ``min(backoff_max, backoff_min * 2 ** attempt)``: 2, 4, 8, 16, 30, 30, ... for
        ``backoff_min=1, backoff_max=30``.

    Raises:
        ValueError: ``attempt`` < 1.

    Example::

        >>> [backoff_ceiling(n, 1.0, 30.0) for n in range(1, 7)]
        [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt!r}")
    return float(min(backoff_max, backoff_min * 2.0 ** min(attempt, _MAX_SHIFT)))


def backoff_delay(
    attempt: int,
    backoff_min: float,
    backoff_max: float,
    rng: random.Random | None = None,
) -> float:
    """The delay before retrying a server after ``attempt`` consecutive failures.

    Drawn uniformly from ``[backoff_min, backoff_ceiling(attempt, ...)]``, so it always
    lies in ``[backoff_min, backoff_max]``.

    Args:
        attempt: the number of consecutive failures so far, >= 1.
        backoff_min: the smallest delay (seconds), > 0.
        backoff_max: the cap (seconds), >= backoff_min.
        rng: the random source (default: the ``random`` module's shared instance).

    Returns:
        The delay in seconds.

    Example::

        >>> 1.0 <= backoff_delay(3, 1.0, 30.0, random.Random(7)) <= 8.0
        True
    """
    ceiling = backoff_ceiling(attempt, backoff_min, backoff_max)
    r = (rng if rng is not None else random).random()
    delay = backoff_min + r * (ceiling - backoff_min)
    # Guard against float rounding at the edges.
    return min(max(delay, backoff_min), backoff_max)
