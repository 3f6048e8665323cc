"""The batch publisher against a real nats-server: every branch of its contract."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing
from polling import wait_until

import trionats
from trionats._config import PoolConfig
from trionats._pool import open_pool


def balanced(s: trionats.BatchPublisherStats) -> bool:
    return s.accepted == s.sent + s.lost + s.pending


async def collect(sub: trionats.Subscription, into: list[bytes], n: int) -> None:
    async for msg in sub:
        into.append(msg.data)
        if len(into) == n:
            return


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"max_batch": 0}, ValueError, "max_batch"),
        ({"max_batch": 1.5}, TypeError, "max_batch"),
        ({"max_delay": -1}, ValueError, "max_delay"),
        ({"max_delay": math.nan}, ValueError, "max_delay"),
        ({"max_delay": "1"}, TypeError, "max_delay"),
        ({"flush_timeout": 0}, ValueError, "flush_timeout"),
    ],
)
async def test_bad_arguments_name_the_field(
    nats_url: str, kwargs: dict[str, object], error: type[Exception], words: str
) -> None:
    async with trionats.open_connection(nats_url) as nc:
        with pytest.raises(error, match=words):
            async with trionats.open_batch_publisher(nc, **kwargs):  # type: ignore[arg-type]
                pass


async def test_not_a_connection_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="Connection or a Pool, got str"):
        async with trionats.open_batch_publisher("nats://x"):  # type: ignore[arg-type]
            pass


async def test_exit_flushes_everything_in_order(nats_url: str) -> None:
    got: list[bytes] = []
    async with (
        trionats.open_connection(nats_url) as pub,
        trionats.open_connection(nats_url) as subc,
        subc.subscribe("bp.order") as sub,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(collect, sub, got, 2500)
        async with trionats.open_batch_publisher(pub, max_batch=1000, max_delay=60) as bp:
            for i in range(2500):
                await bp.publish("bp.order", b"%d" % i)
            assert bp.stats().accepted == 2500
        s = bp.stats()
        assert (s.accepted, s.sent, s.lost, s.pending) == (2500, 2500, 0, 0)
        assert s.batches == 3
        assert s.full_batches == 2
        assert s.flush_duration.count == 3
        with trio.fail_after(10):
            await wait_until(lambda: len(got) == 2500)
    assert got == [b"%d" % i for i in range(2500)]


async def test_a_batch_goes_out_after_max_delay(nats_url: str) -> None:
    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_batch_publisher(nc, max_batch=1000, max_delay=0.01) as bp,
    ):
        for i in range(3):
            await bp.publish("bp.delay", b"%d" % i)
        await wait_until(lambda: bp.stats().sent == 3)
        s = bp.stats()
        assert s.batches == 1
        assert s.full_batches == 0
        assert balanced(s)


async def test_a_full_batch_goes_out_at_once(nats_url: str) -> None:
    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_batch_publisher(nc, max_batch=10, max_delay=600) as bp,
    ):
        for i in range(25):
            await bp.publish("bp.size", b"%d" % i, headers={"i": str(i)})
        await wait_until(lambda: bp.stats().sent == 20)
        s = bp.stats()
        assert s.full_batches == 2
        assert s.pending == 5
        assert balanced(s)
    assert bp.stats().sent == 25


async def test_too_big_is_refused_at_publish_not_at_flush(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        async with trionats.open_batch_publisher(nc) as bp:
            with pytest.raises(ValueError, match="exceeds the server's max_payload"):
                await bp.publish("bp.big", b"x" * (nc.max_payload + 1))
            with pytest.raises(ValueError, match="exceeds"):
                await bp.publish("bp.big", b"x" * nc.max_payload, headers={"k": "v"})
            with pytest.raises(ValueError, match="subject"):
                await bp.publish("bad subject", b"")
            with pytest.raises(TypeError, match="data"):
                await bp.publish("bp.big", "text")  # type: ignore[arg-type]
            await bp.publish("bp.big", b"fine")
        s = bp.stats()
        assert (s.accepted, s.sent, s.lost) == (1, 1, 0)


async def test_backpressure_and_a_cancelled_publish_accepts_nothing(
    nats_server: trionats.NatsServer,
) -> None:
    async with trionats.open_connection(nats_server.url) as nc:
        async with trionats.open_batch_publisher(nc, max_batch=5, max_delay=600) as bp:
            await nats_server.freeze()
            try:
                for i in range(5):  # the first batch: its flush waits for the frozen server
                    await bp.publish("bp.bp", b"%d" % i)
                await wait_until(lambda: bp.stats().pending == 5 and not bp._buffer)
                for i in range(5):  # the next batch fills up
                    await bp.publish("bp.bp", b"%d" % i)
                with trio.move_on_after(0.2) as scope:
                    await bp.publish("bp.bp", b"no room")  # waits for room
                assert scope.cancelled_caught
                assert bp.stats().accepted == 10
            finally:
                await nats_server.thaw()
        s = bp.stats()
        assert (s.accepted, s.sent, s.lost, s.pending) == (10, 10, 0, 0)


async def test_cancelling_the_block_still_sends_what_was_accepted(nats_url: str) -> None:
    got: list[bytes] = []
    async with (
        trionats.open_connection(nats_url) as pub,
        trionats.open_connection(nats_url) as subc,
        subc.subscribe("bp.cancel") as sub,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(collect, sub, got, 50)
        with trio.CancelScope() as scope:
            async with trionats.open_batch_publisher(pub, max_batch=1000, max_delay=600) as bp:
                for i in range(50):
                    await bp.publish("bp.cancel", b"%d" % i)
                scope.cancel()
                await trio.sleep_forever()
        assert scope.cancelled_caught
        s = bp.stats()
        assert (s.accepted, s.sent, s.lost) == (50, 50, 0)
        await wait_until(lambda: len(got) == 50)


async def test_an_exception_in_the_block_still_sends_and_comes_out(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        with pytest.raises(KeyError, match="mine"):  # noqa: PT012
            async with trionats.open_batch_publisher(nc, max_delay=600) as bp:
                await bp.publish("bp.exc", b"1")
                raise KeyError("mine")
        assert bp.stats().sent == 1


async def test_server_killed_mid_batch_is_reported_with_the_count(
    nats_server: trionats.NatsServer,
) -> None:
    async with trionats.open_connection(nats_server.url) as nc:
        with pytest.raises(trionats.BatchPublishError, match="7 accepted") as info:  # noqa: PT012
            async with trionats.open_batch_publisher(
                nc, max_batch=1000, max_delay=600, flush_timeout=3
            ) as bp:
                for i in range(7):
                    await bp.publish("bp.kill", b"%d" % i)
                await nats_server.kill()
        assert info.value.lost == 7
        assert isinstance(info.value.__cause__, trionats.TrionatsError)
        s = bp.stats()
        assert (s.accepted, s.sent, s.lost, s.pending) == (7, 0, 7, 0)
        assert bp.error is info.value


async def test_after_a_failure_publish_raises_and_counts(
    nats_server: trionats.NatsServer,
) -> None:
    async with trionats.open_connection(nats_server.url) as nc:
        with pytest.raises(trionats.BatchPublishError):  # noqa: PT012
            async with trionats.open_batch_publisher(
                nc, max_batch=1000, max_delay=0.01, flush_timeout=3
            ) as bp:
                await nats_server.kill()
                await bp.publish("bp.fail", b"1")
                await wait_until(lambda: bp.error is not None)
                for _ in range(2):
                    with pytest.raises(trionats.BatchPublishError, match="1 accepted") as info:
                        await bp.publish("bp.fail", b"2")
                    assert info.value.lost == 1
        s = bp.stats()
        assert (s.accepted, s.lost) == (1, 1)
        assert balanced(s)


async def test_a_cancel_whose_final_flush_fails_raises_the_loss(
    nats_server: trionats.NatsServer,
) -> None:
    async with trionats.open_connection(nats_server.url) as nc:
        with trio.CancelScope() as scope:
            with pytest.raises(trionats.BatchPublishError, match="3 accepted") as info:  # noqa: PT012
                async with trionats.open_batch_publisher(nc, max_delay=600, flush_timeout=3) as bp:
                    for i in range(3):
                        await bp.publish("bp.cc", b"%d" % i)
                    await nats_server.kill()
                    scope.cancel()
                    await trio.sleep_forever()
            assert isinstance(info.value.__context__, trio.Cancelled)
        assert bp.stats().lost == 3


async def test_publish_after_the_block_is_an_error(nats_url: str) -> None:
    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_batch_publisher(nc) as bp,
    ):
        pass
    with pytest.raises(trionats.TrionatsError, match="block has ended"):
        await bp.publish("bp.late", b"")
    assert "ended" in repr(bp)


async def test_publish_checks_for_cancellation(nats_url: str) -> None:
    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_batch_publisher(nc, max_delay=600) as bp,
    ):
        with trio.CancelScope() as scope:
            scope.cancel()
            await bp.publish("bp.x", b"")
        assert bp.stats().accepted == 0


async def test_over_a_pool_one_lease_for_the_block(nats_url: str) -> None:
    got: list[bytes] = []
    async with (
        open_pool(PoolConfig(servers=[nats_url])) as pool,
        trionats.open_connection(nats_url) as subc,
        subc.subscribe("bp.pool") as sub,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(collect, sub, got, 100)
        async with trionats.open_batch_publisher(pool, max_batch=10) as bp:
            assert pool.stats().borrowed == 1
            for i in range(100):
                await bp.publish("bp.pool", b"%d" % i)
        assert pool.stats().borrowed == 0
        await wait_until(lambda: len(got) == 100)
    assert got == [b"%d" % i for i in range(100)]


async def test_concurrent_publishers_share_one_batcher(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        async with (
            trionats.open_batch_publisher(nc, max_batch=64, max_delay=0.001) as bp,
            trio.open_nursery() as nursery,
        ):

            async def worker(k: int) -> None:
                for i in range(200):
                    await bp.publish("bp.conc", b"%d.%d" % (k, i))

            for k in range(10):
                nursery.start_soon(worker, k)
        s = bp.stats()
        assert (s.accepted, s.sent, s.lost, s.pending) == (2000, 2000, 0, 0)
