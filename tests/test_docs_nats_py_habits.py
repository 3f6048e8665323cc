"""nats-py habits get a TypeError that says what to write instead.

People arrive from nats-py: ``await nc.subscribe(...)``, ``nc.subscribe(..., cb=...)``
and ``await pool.borrow()`` fail with a message naming the trionats way, against a real
nats-server.
"""

from __future__ import annotations

import pytest
import trio

import trionats


async def test_awaiting_subscribe_says_async_with(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        with pytest.raises(TypeError) as info:
            await nc.subscribe("orders.*")  # type: ignore[misc]
        assert "async with nc.subscribe('orders.*') as sub:" in str(info.value)
        # Nothing was registered, and the real thing still works afterwards.
        async with nc.subscribe("orders.*") as sub:
            await nc.publish("orders.1", b"x")
            with trio.fail_after(5):
                msg = await sub.next_msg()
        assert msg.data == b"x"
        assert not nc._subs  # nothing left registered


async def test_subscribe_with_a_callback_points_at_open_subscriber(nats_url: str) -> None:
    async def handler(msg: trionats.Msg) -> None:
        raise AssertionError("never called")

    async with trionats.open_connection(nats_url) as nc:
        with pytest.raises(TypeError) as info:
            nc.subscribe("orders.*", cb=handler)  # type: ignore[arg-type]
        text = str(info.value)
        assert "trionats.open_subscriber(nc)" in text
        assert "subscriber.start('orders.*', handler)" in text
        assert "async with nc.subscribe('orders.*') as sub" in text


async def test_awaiting_borrow_says_async_with(nats_url: str) -> None:
    async with trionats.open_pool(trionats.PoolConfig(servers=[nats_url])) as pool:
        with pytest.raises(TypeError, match=r"write `async with pool\.borrow\(\) as nc:`"):
            await pool.borrow()  # type: ignore[misc]
        assert pool.stats().borrowed == 0
        async with pool.borrow() as nc:
            with pytest.raises(TypeError, match=r"async with nc\.subscribe\('a'\) as sub:"):
                await nc.subscribe("a")  # type: ignore[misc]
            await nc.publish("a", b"still usable")


async def test_subscribe_block_is_still_cancellable(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        with trio.CancelScope() as scope:
            scope.cancel()
            async with nc.subscribe("x"):
                raise AssertionError("entered a cancelled subscribe")  # pragma: no cover
        assert scope.cancelled_caught
        assert not nc._subs  # nothing left registered
