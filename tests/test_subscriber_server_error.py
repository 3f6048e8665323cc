"""A server error that closes the connection shows in the subscriber's stats and log
(against a real nats-server on 127.0.0.1 started with a small ``max_control_line``)."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio

import trionats
from trionats._server import open_nats_server
from trionats._subscriber import SubscriberStats, open_subscriber

LOGGER = "trionats.subscriber"


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Bounded polling: for conditions that depend on the server, not on our tasks."""
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - the condition has no event to wait on
            await trio.sleep(0.005)


def warnings_from(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING and text in r.getMessage()
    ]


# -- 6. a connection error shows in the stats ------------------------------------------------


@asynccontextmanager
async def small_control_line_server(limit: int) -> AsyncIterator[trionats.NatsServer]:
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as conf:
        conf.write(f"max_control_line: {limit}\n")
    try:
        async with open_nats_server(args=["-c", conf.name]) as server:
            yield server
    finally:
        os.unlink(conf.name)


async def test_a_server_error_shows_in_the_subscriber_stats(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server answers -ERR to a line longer than its max_control_line and closes."""

    async def handler(msg: trionats.Msg) -> None:
        pass  # pragma: no cover

    seen: list[SubscriberStats] = []

    async def body(url: str) -> None:
        async with (
            trionats.open_connection(url, max_reconnect_attempts=0) as nc,
            open_subscriber(nc) as subscriber,
        ):
            handle = await subscriber.start("short", handler)
            assert subscriber.stats().connection_error is None
            # The publish or, at the latest, the flush after it finds out.
            with pytest.raises(trionats.ConnectionClosedError):  # noqa: PT012
                await nc.publish("long." + "x" * 300, b"")
                await nc.flush(timeout=5)
            await wait_until(lambda: subscriber.stats().connection_error is not None)
            await wait_until(lambda: handle.stopped)  # its subscription ended with it
            seen.extend([subscriber.stats(), handle.stats()])

    caplog.set_level(logging.WARNING, logger=LOGGER)
    async with small_control_line_server(256) as server:
        url = server.url.replace("nats://", "nats://someone:s3cr3t@")
        # Leaving open_connection reports how the connection ended.
        with pytest.raises(trionats.ConnectionClosedError, match="control line"):
            await body(url)
    subscriber_stats, handle_stats = seen
    reason = subscriber_stats.connection_error
    assert reason is not None
    assert "maximum control line exceeded" in reason.lower()
    assert "s3cr3t" not in reason
    assert handle_stats.connection_error == reason
    assert (subscriber_stats.active, handle_stats.active) == (0, 0)
    # The subscriber's own log names the reason the subscription ended.
    (warning,) = warnings_from(caplog, "ended (connection closed")
    assert "'short'" in warning
    assert "control line" in warning
    assert "s3cr3t" not in caplog.text
