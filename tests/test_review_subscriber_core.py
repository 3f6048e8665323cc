"""Review fixes: handler-failure logs are rate-limited per subscription, not per subject."""

from __future__ import annotations

import logging

import pytest
from polling import wait_until

import trionats
from trionats import SubscriberConfig, open_subscriber
from trionats._log import BURST


async def test_failures_are_rate_limited_per_subscription_not_per_subject(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trionats.subscriber")

    async def broken(msg: trionats.Msg) -> None:
        raise ValueError("bad")

    def failures() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name == "trionats.subscriber" and "failed on message" in r.getMessage()
        ]

    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_connection(nats_url) as pub,
        open_subscriber(nc, SubscriberConfig(max_workers=4)) as subscriber,
    ):
        first = await subscriber.start("review.same", broken)
        for _ in range(BURST + 1):
            await pub.publish("review.same", b"x")
        await pub.flush()
        await wait_until(lambda: first.stats().failed == BURST + 1)
        assert len(failures()) == BURST  # the first subscription's burst is spent
        second = await subscriber.start("review.same", broken)
        await pub.publish("review.same", b"y")
        await pub.flush()
        await wait_until(lambda: second.stats().failed == 1 and first.stats().failed == BURST + 2)
        # The second subscription has a bucket of its own: its first failure is logged.
        assert len(failures()) == BURST + 1
        await first.stop()  # reports only its own suppressed failures
        summaries = [r for r in caplog.records if "similar record(s) suppressed" in r.getMessage()]
        assert [r.suppressed for r in summaries] == [2]  # type: ignore[attr-defined]
        await second.stop()
