"""Unit tests of the pool's pure parts: backoff and PoolConfig validation (no server)."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import pytest

from trionats._backoff import backoff_ceiling, backoff_delay
from trionats._config import PoolConfig
from trionats._validate import parse_server_url


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
    assert c.servers == (parse_server_url("nats://127.0.0.1:4222"),)
    assert c.idle_per_server == 32
    assert c.max_per_server is None
    assert c.dial_timeout == 10.0
    assert c.max_life == 3600.0
    assert c.max_life_jitter == 0.025
    assert c.backoff_min == 1.0
    assert c.backoff_max == 30.0
    assert c.leak_timeout == 300.0
    assert c.leak_action == "report"
    assert c.close_timeout == 10.0
    for name in ("name", "user", "password", "token", "nkeys_seed", "nkeys_seed_str"):
        assert getattr(c, name) is None
    assert c.user_credentials is None
    assert c.tls is None
    assert c.tls_hostname is None


def test_pool_config_normalizes_servers() -> None:
    def urls(c: PoolConfig) -> list[str]:
        return [s.url for s in c.servers]

    assert urls(PoolConfig(servers="127.0.0.1:4222")) == ["nats://127.0.0.1:4222"]
    assert urls(PoolConfig(servers=("tls://a:1", "b"))) == ["tls://a:1", "nats://b"]
    assert urls(PoolConfig(servers="a:1, b:2")) == ["nats://a:1", "nats://b:2"]
    same = PoolConfig(servers=["a:1"])
    assert PoolConfig(servers=same.servers) == same
    assert dataclasses.replace(same, idle_per_server=3).servers == same.servers


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
        ("servers", ["a:1", "nats://A:1"]),
        ("idle_per_server", -1),
        ("max_per_server", 0),
        ("dial_timeout", 0),
        ("dial_timeout", -1.0),
        ("dial_timeout", math.nan),
        ("dial_timeout", math.inf),
        ("max_life", 0.0),
        ("max_life_jitter", 1.0),
        ("max_life_jitter", -0.1),
        ("max_life_jitter", math.nan),
        ("backoff_min", 0),
        ("backoff_max", -3),
        ("leak_timeout", 0),
        ("leak_action", "explode"),
        ("close_timeout", 0),
        ("user", ""),
        ("tls_hostname", ""),
    ],
)
def test_pool_config_rejects_bad_values(field: str, value: object) -> None:
    kwargs: dict[str, object] = {"servers": ["nats://127.0.0.1:4222"], field: value}
    with pytest.raises(ValueError, match=rf"PoolConfig\.{field}") as info:
        PoolConfig(**kwargs)  # type: ignore[arg-type]
    assert repr(value)[:10] in str(info.value) or field == "servers"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("servers", [3]),
        ("servers", 3),
        ("servers", None),
        ("idle_per_server", 1.5),
        ("idle_per_server", True),
        ("idle_per_server", "4"),
        ("max_per_server", 2.0),
        ("dial_timeout", "5"),
        ("dial_timeout", None),
        ("max_life", True),
        ("max_life_jitter", "0.1"),
        ("leak_action", 3),
        ("name", 5),
        ("user", 5),
        ("nkeys_seed", b"path"),
        ("user_credentials", 1),
        ("tls", "yes"),
        ("tls_hostname", 1),
    ],
)
def test_pool_config_rejects_bad_types(field: str, value: object) -> None:
    kwargs: dict[str, object] = {"servers": ["nats://127.0.0.1:4222"], field: value}
    with pytest.raises(TypeError, match=rf"PoolConfig\.{field}") as info:
        PoolConfig(**kwargs)  # type: ignore[arg-type]
    assert type(value).__name__ in str(info.value) or field == "servers"


@pytest.mark.parametrize("field", ["password", "token", "nkeys_seed_str"])
def test_pool_config_secret_of_the_wrong_type_is_not_echoed(field: str) -> None:
    secret = b"hunter2-secret"
    with pytest.raises(TypeError, match=rf"PoolConfig\.{field} must be a str or None") as info:
        PoolConfig(servers=["a:1"], **{field: secret})  # type: ignore[arg-type]
    assert "hunter2" not in str(info.value)


def test_pool_config_repr_hides_secrets(tmp_path: Path) -> None:
    seed_file = tmp_path / "seed.nk"
    seed_file.write_text("not read by PoolConfig, only checked to exist")
    c = PoolConfig(
        servers=["nats://alice:pw-in-url@a:1", "nats://tok-in-url@b:2"],
        user="alice",
        password="hunter2",
        token="tok-3",
        nkeys_seed_str="SUAseed",
        nkeys_seed=str(seed_file),
    )
    text = repr(c)
    for secret in ("hunter2", "tok-3", "SUAseed", "pw-in-url", "tok-in-url"):
        assert secret not in text
        assert secret not in str(c)
    assert "password='***'" in text
    assert "token='***'" in text
    assert "nkeys_seed_str='***'" in text
    assert "ServerURL('nats://***@a:1')" in text
    assert "user='alice'" in text
    assert f"nkeys_seed={str(seed_file)!r}" in text  # a path, not a secret
    assert "password=None" in repr(PoolConfig(servers=["a:1"]))
    # the real URLs still reach the dialer
    assert [s.url for s in c.servers] == ["nats://alice:pw-in-url@a:1", "nats://tok-in-url@b:2"]


def test_pool_config_backoff_min_above_max() -> None:
    with pytest.raises(ValueError, match=r"backoff_min.*backoff_max.*5\.0"):
        PoolConfig(servers=["a:1"], backoff_min=5.0, backoff_max=2.0)
