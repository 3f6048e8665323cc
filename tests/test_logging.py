"""Logging: rate limits on repeated events, one record per transition into dropping,
structured fields on every record, and never a secret."""

from __future__ import annotations

import logging
import traceback

import pytest
import trio
from polling import wait_until

import trionats
from trionats import SubscriberConfig, open_subscriber
from trionats._log import BURST, RateLimiter, fields

PASSWORD = "pw-s3cr3t-XYZ"


def records_of(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger]


# -- the rate limiter on its own (a fake clock) ------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_one_per_interval_with_the_suppressed_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="test.limiter")
    clock = FakeClock()
    limiter = RateLimiter(logging.getLogger("test.limiter"), burst=3, interval=10, clock=clock)
    logged = [limiter.log(logging.WARNING, "k", "event %d", i, extra={"x": 1}) for i in range(10)]
    assert logged == [True] * 3 + [False] * 7
    clock.now = 10.0  # one token back
    assert limiter.log(logging.WARNING, "k", "event %d", 10)
    assert not limiter.log(logging.WARNING, "k", "event %d", 11)
    assert limiter.log(logging.WARNING, "other", "another key")  # keys are independent
    limiter.flush()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "event 0",
        "event 1",
        "event 2",
        "event 10 [7 similar suppressed]",
        "another key",
        "1 similar record(s) suppressed, the last: event 11",
    ]
    assert [r.suppressed for r in caplog.records] == [0, 0, 0, 7, 0, 1]  # type: ignore[attr-defined]
    assert caplog.records[0].x == 1  # type: ignore[attr-defined]
    # Every event is accounted for: logged ones plus the suppressed counts.
    events = sum(1 for m in messages if "similar record(s)" not in m)
    assert events + sum(r.suppressed for r in caplog.records) == 13  # type: ignore[attr-defined]
    caplog.clear()
    limiter.flush()  # nothing pending any more
    assert caplog.records == []


def test_forgotten_keys_report_their_count_and_disabled_levels_cost_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="test.limiter2")
    limiter = RateLimiter(
        logging.getLogger("test.limiter2"), burst=1, interval=10, clock=FakeClock(), max_keys=2
    )
    for key in ("a", "a", "b", "c"):  # "c" pushes out "a" (least recently used)
        limiter.log(logging.WARNING, key, "event %s", key)
    assert [r.getMessage() for r in caplog.records] == [
        "event a",
        "event b",
        "1 similar record(s) suppressed, the last: event a",
        "event c",
    ]
    caplog.clear()
    assert not limiter.log(logging.DEBUG, "d", "below the level")
    limiter.flush()
    assert caplog.records == []


def test_fields_drop_the_missing_ones() -> None:
    assert fields("pool", subject=None, server="nats://***@h:4222") == {
        "component": "pool",
        "server": "nats://***@h:4222",
    }


# -- against a real server -----------------------------------------------------------------


async def test_a_failing_handler_cannot_flood_the_logs(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trionats.subscriber")

    async def broken(msg: trionats.Msg) -> None:
        raise ValueError(f"bad message {msg.data!r}")

    async with (
        trionats.open_connection(nats_url, name="worker") as nc,
        trionats.open_connection(nats_url) as pub,
        open_subscriber(nc, SubscriberConfig(max_workers=8)) as subscriber,
    ):
        handle = await subscriber.start("flood.*", broken)
        for i in range(1000):
            await pub.publish("flood.x", b"%d" % i)
        await pub.flush()
        await wait_until(lambda: handle.stats().failed == 1000)
        await handle.stop()  # reports what is still suppressed
    records = records_of(caplog, "trionats.subscriber")
    # BURST at once, one more per 10 s (a slow machine), one summary at the stop.
    assert BURST <= len(records) <= BURST + 10
    failures = [r for r in records if "similar record(s) suppressed" not in r.getMessage()]
    summaries = [r for r in records if "similar record(s) suppressed" in r.getMessage()]
    assert len(summaries) == 1
    assert len(failures) + sum(r.suppressed for r in records) == 1000  # type: ignore[attr-defined]
    first = records[0]
    assert first.levelno == logging.ERROR
    assert first.exc_info is not None  # the first failures keep their traceback
    assert "flood.*" in first.getMessage()
    assert "ValueError" in first.getMessage()
    assert summaries[0].exc_info is None
    for record in records:
        assert record.component == "subscriber"  # type: ignore[attr-defined]
        assert record.subject == "flood.*"  # type: ignore[attr-defined]
        assert record.connection == "worker"  # type: ignore[attr-defined]
        assert record.server.startswith("nats://127.0.0.1:")  # type: ignore[attr-defined]


async def test_drops_are_logged_once_per_transition_into_dropping(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trionats.connection")
    async with (
        trionats.open_connection(nats_url, name="slow") as nc,
        trionats.open_connection(nats_url) as pub,
        nc.subscribe("drops", max_pending_msgs=5) as sub,
    ):
        for _round in (1, 2):
            for i in range(50):
                await pub.publish("drops", b"%d" % i)
            await pub.flush()
            await wait_until(lambda: sub.delivered + sub.pending + sub.dropped == 50 * _round)  # noqa: B023
            assert sub.dropped == 45 * _round
            slow = [r for r in records_of(caplog, "trionats.connection") if "slow" in r.msg]
            assert len(slow) == _round  # 45 drops, one record
            while sub.pending:  # catching up ends the dropping state
                sub.take_nowait()
    record = slow[0]
    assert record.levelno == logging.WARNING
    assert record.subject == "drops"  # type: ignore[attr-defined]
    assert record.component == "connection"  # type: ignore[attr-defined]
    assert record.connection == "slow"  # type: ignore[attr-defined]
    assert "'drops'" in record.getMessage()


async def test_reconnect_attempts_are_rate_limited_and_secrets_never_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="trionats")
    async with trionats.open_nats_server(args=["--user", "alice", "--pass", PASSWORD]) as server:
        url = f"nats://alice:{PASSWORD}@127.0.0.1:{server.port}"
        async with (
            trionats.open_connection(url, name="svc", reconnect_time_wait=0.01) as nc,
            nc.events() as events,
        ):
            errors = 0
            await server.stop()
            with trio.fail_after(30):
                async for event in events:
                    if event.kind is trionats.EventKind.ERROR:
                        errors += 1
                        if errors == 40:
                            break
            await server.start()
            with trio.fail_after(30):
                async for event in events:
                    if event.kind is trionats.EventKind.RECONNECTED:
                        break
            await nc.publish("after", b"x")
            await nc.flush()
    records = records_of(caplog, "trionats.connection")
    attempts = [r for r in records if r.levelno == logging.WARNING and "lost" not in r.msg]
    # 40 failed attempts (or more), each a WARNING before: now a burst per error type,
    # then the count of the rest when the connection closes.
    assert len(attempts) < 40
    assert sum(r.suppressed for r in attempts) > 0  # type: ignore[attr-defined]
    lost = [r for r in records if "lost" in r.msg]
    assert len(lost) == 1
    assert lost[0].server == f"nats://***@127.0.0.1:{server.port}"  # type: ignore[attr-defined]
    assert any("reconnected" in r.getMessage() for r in records)
    # No secret in any record: message, fields, traceback.
    text = []
    for record in caplog.records:
        text.append(record.getMessage())
        text.append(repr(vars(record)))
        if record.exc_info and record.exc_info[1] is not None:
            text.append("".join(traceback.format_exception(record.exc_info[1])))
    joined = "\n".join(text)
    assert "***" in joined
    assert PASSWORD not in joined
