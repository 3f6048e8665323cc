"""Unit tests of the pool's pure parts: backoff and PoolConfig validation."""

from __future__ import annotations

import math
import random

import pytest

from trionats._backoff import backoff_ceiling, backoff_delay
from trionats._config import PoolConfig


class _Fixed(random.Random):
    """A Random whose random() always returns the same value."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def test_backoff_ceiling_doubles_once_per_failure() -> None:
    # The original pool doubled twice per failure (4, 16, 30...): pin the sequence.
    assert [backoff_ceiling(n, 1.0, 30.0) for n in range(1, 8)] == [
        2.0,
        4.0,
        8.0,
        16.0,
        30.0,
        30.0,
        30.0,
    ]
    assert [backoff_ceiling(n, 0.25, 100.0) for n in range(1, 5)] == [0.5, 1.0, 2.0, 4.0]


def test_backoff_delay_sequence_at_the_extremes_of_the_jitter() -> None:
    top = [backoff_delay(n, 1.0, 30.0, _Fixed(0.999999999)) for n in range(1, 7)]
    assert [round(d, 3) for d in top] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    bottom = [backoff_delay(n, 1.0, 30.0, _Fixed(0.0)) for n in range(1, 7)]
    assert bottom == [1.0] * 6


def test_backoff_delay_full_jitter_range() -> None:
    rng = random.Random(42)
    for attempt in range(1, 40):
        for _ in range(50):
            d = backoff_delay(attempt, 0.5, 9.0, rng)
            assert 0.5 <= d <= min(9.0, backoff_ceiling(attempt, 0.5, 9.0))
    # jitter actually spreads the values
    values = {round(backoff_delay(4, 1.0, 30.0, rng), 6) for _ in range(100)}
    assert len(values) > 50


def test_backoff_huge_attempt_is_finite() -> None:
    assert backoff_ceiling(10_000, 1.0, 30.0) == 30.0
    assert math.isfinite(backoff_delay(10**9, 1.0, 30.0, random.Random(1)))


def test_backoff_attempt_must_be_positive() -> None:
    with pytest.raises(ValueError, match="attempt"):
        backoff_ceiling(0, 1.0, 2.0)


def test_pool_config_defaults() -> None:
    c = PoolConfig(servers=["nats://127.0.0.1:4222"])
    assert c.servers == ("nats://127.0.0.1:4222",)
    assert c.idle_per_server == 32
    assert c.max_per_server is None
    assert c.dial_timeout == 10.0
    assert c.max_life == 3600.0
    assert c.max_life_jitter == 0.025
    assert c.backoff_min == 1.0
    assert c.backoff_max == 30.0
    assert c.leak_timeout == 300.0
    assert c.leak_action == "report"


def test_pool_config_normalizes_servers() -> None:
    assert PoolConfig(servers="127.0.0.1:4222").servers == ("nats://127.0.0.1:4222",)
    assert PoolConfig(servers=("tls://a:1", "b")).servers == ("tls://a:1", "nats://b")


def test_pool_config_is_frozen() -> None:
    c = PoolConfig(servers=["a:1"])
    with pytest.raises(AttributeError):
        c.idle_per_server = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("servers", []),
        ("servers", ["http://a:1"]),
        ("servers", ["nats://a:99999"]),
        ("servers", ["nats://a:x"]),
        ("servers", ["nats://:4222"]),
        ("servers", [""]),
        ("servers", ["a:1", "a:1"]),
        ("servers", [3]),
        ("idle_per_server", -1),
        ("idle_per_server", 1.5),
        ("idle_per_server", True),
        ("max_per_server", 0),
        ("dial_timeout", 0),
        ("dial_timeout", -1.0),
        ("dial_timeout", math.nan),
        ("dial_timeout", math.inf),
        ("dial_timeout", "5"),
        ("max_life", 0.0),
        ("max_life_jitter", 1.0),
        ("max_life_jitter", -0.1),
        ("backoff_min", 0),
        ("backoff_max", -3),
        ("leak_timeout", 0),
        ("leak_action", "explode"),
        ("close_timeout", 0),
    ],
)
def test_pool_config_rejects_bad_values(field: str, value: object) -> None:
    kwargs: dict[str, object] = {"servers": ["nats://127.0.0.1:4222"], field: value}
    with pytest.raises(ValueError, match=field) as info:
        PoolConfig(**kwargs)  # type: ignore[arg-type]
    assert repr(value)[:10] in str(info.value) or field == "servers"


def test_pool_config_backoff_min_above_max() -> None:
    with pytest.raises(ValueError, match=r"backoff_min.*backoff_max.*5\.0"):
        PoolConfig(servers=["a:1"], backoff_min=5.0, backoff_max=2.0)
