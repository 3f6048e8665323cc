"""Cancellation in both directions, and clean shutdown, against a real nats-server."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
import trio_asyncio

import trionats
from trionats import _bridge
from trionats.testing import wait_for_connections


class CancelAtStep(trio.abc.Instrument):
    """Cancel ``scope`` right after the task named ``name`` finished its ``n``-th step, that
    is while it is parked at its ``n``-th checkpoint: the cancel aborts that wait."""

    def __init__(self, n: int, name: str, scope: trio.CancelScope) -> None:
        self.n = n
        self.name = name
        self.scope = scope
        self.steps = 0
        self.fired = False

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name == self.name:
            self.steps += 1
            if self.steps == self.n:
                self.fired = True
                self.scope.cancel()


async def cancel_at_every_checkpoint(
    operation: Callable[[], Awaitable[Any]], check: Callable[[], Awaitable[None]]
) -> int:
    """Run ``operation`` in a task cancelled at its 1st, 2nd, ... checkpoint, until a run
    completes without the cancel firing; after each run, ``check`` that the connection
    is consistent and usable.

    Returns how many steps (cancellation points) were exercised.
    """
    n = 1
    while True:
        scope = trio.CancelScope()
        instrument = CancelAtStep(n, f"cancel-probe-{n}", scope)
        outcome: list[str] = []

        async def run(scope: trio.CancelScope = scope, outcome: list[str] = outcome) -> None:
            with scope:
                await operation()
                outcome.append("done")
            if scope.cancelled_caught:
                outcome.append("cancelled")

        trio.lowlevel.add_instrument(instrument)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, name=instrument.name)
        finally:
            trio.lowlevel.remove_instrument(instrument)
        await check()
        if not instrument.fired:
            assert outcome == ["done"]
            return n - 1
        assert outcome in (["cancelled"], ["done"]), outcome
        n += 1
        assert n < 200, "operation never completed"


async def test_request_cancelled_at_every_checkpoint(nats_url: str) -> None:
    async with (
        trionats.open_connection(nats_url) as nc,
        nc.subscribe("echo") as sub,
        trio.open_nursery() as nursery,
    ):

        async def responder() -> None:
            async for msg in sub:
                await msg.respond(msg.data)

        nursery.start_soon(responder)

        async def check() -> None:
            assert nc._router is None or not nc._router.waiting
            reply = await nc.request("echo", b"still usable", timeout=5)
            assert reply.data == b"still usable"

        points = await cancel_at_every_checkpoint(
            lambda: nc.request("echo", b"x", timeout=5), check
        )
        assert points >= 2  # at least: entry, waiting for the reply
        nursery.cancel_scope.cancel()


async def test_publish_cancelled_sends_nothing(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc, nc.subscribe("p") as sub:
        with trio.CancelScope() as scope:
            scope.cancel()
            await nc.publish("p", b"never")
        assert scope.cancelled_caught
        await nc.publish("p", b"sent")
        await nc.flush()
        assert [m.data for m in await sub.receive_batch()] == [b"sent"]


async def test_publish_loop_yields_to_other_tasks(nats_url: str) -> None:
    """A tight publish loop must not starve the scheduler (full yield every N calls)."""
    async with trionats.open_connection(nats_url) as nc:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.lowlevel.checkpoint()
            start = ticks
            for _ in range(5000):
                await nc.publish("spin", b"x")
            assert ticks - start >= 5000 // 256 - 1
            nursery.cancel_scope.cancel()


async def test_flush_cancelled_then_usable(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:

        async def check() -> None:
            await nc.flush(timeout=5)

        points = await cancel_at_every_checkpoint(lambda: nc.flush(timeout=5), check)
        assert points >= 1


async def test_subscribe_cancelled_at_every_checkpoint_leaves_no_subscription(
    nats_url: str,
) -> None:
    async with trionats.open_connection(nats_url) as nc:

        async def subscribe_once() -> None:
            async with nc.subscribe("s.cancel") as sub:
                assert sub.subject == "s.cancel"

        async def check() -> None:
            assert not nc._subs
            # only the request mux (if any) stays registered in nats-py
            assert len(nc._client._subs) == (0 if nc._router is None else 1)
            await nc.flush()

        await cancel_at_every_checkpoint(subscribe_once, check)


async def test_receive_cancelled_loses_no_message(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc, nc.subscribe("r") as sub:
        with trio.move_on_after(0.05) as scope:
            await sub.next_msg()
        assert scope.cancelled_caught
        await nc.publish("r", b"after")
        await nc.flush()
        with trio.CancelScope() as cancelled:
            cancelled.cancel()
            await sub.next_msg()
        # a cancelled receive took nothing: the message is still there
        assert sub.pending == 1
        assert (await sub.next_msg()).data == b"after"


async def test_connect_cancelled_leaves_nothing_behind(nats_server: trionats.NatsServer) -> None:
    async def connect_once() -> None:
        async with trionats.open_connection(nats_server.url) as nc:
            await nc.flush()

    async def check() -> None:
        await wait_for_connections(nats_server, 0)

    points = await cancel_at_every_checkpoint(connect_once, check)
    assert points >= 3


async def test_drain_cancelled_still_closes(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc, nc.subscribe("dr") as sub:
        await nc.publish("dr", b"1")
        await nc.flush()
        with trio.move_on_after(0.2) as scope:
            await nc.drain(timeout=30)  # nobody consumes: waits until cancelled
        assert scope.cancelled_caught  # the Trio cancel was not lost
        assert nc.is_closed
        assert sub.pending == 1


async def test_swallowed_asyncio_cancel_does_not_lose_the_trio_cancel() -> None:
    """An asyncio coroutine that catches CancelledError and returns normally (as nats-py's
    drain and _flush_pending do) must not make a Trio cancel vanish."""

    async def stubborn() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "swallowed"
        return "slept"  # pragma: no cover

    async with _bridge.loop_scope():
        with trio.move_on_after(0.05) as scope:
            await _bridge.run_aio(stubborn)
            pytest.fail("the cancel vanished")  # pragma: no cover
        assert scope.cancelled_caught


async def test_leaving_open_connection_leaves_no_tasks(nats_server: trionats.NatsServer) -> None:
    """Normal exit, exit by exception and exit by cancel: no asyncio task and no Trio task
    survive the block, and the server no longer counts the connection."""
    async with trio_asyncio.open_loop() as loop:
        baseline_trio = trio.lowlevel.current_statistics().tasks_living
        baseline_aio = len(asyncio.all_tasks(loop))

        async def use() -> None:
            async with trionats.open_connection(nats_server.url) as nc, nc.subscribe("x"):
                await nc.publish("x", b"1")
                raise KeyError("boom")

        with pytest.raises(KeyError):
            await use()
        with trio.move_on_after(0.05):
            async with trionats.open_connection(nats_server.url) as nc, nc.subscribe("y"):
                await trio.sleep_forever()
        async with trionats.open_connection(nats_server.url) as nc:
            await nc.publish("z", b"1")
        await trio.testing.wait_all_tasks_blocked()
        assert len([t for t in asyncio.all_tasks(loop) if not t.done()]) == baseline_aio
        assert trio.lowlevel.current_statistics().tasks_living == baseline_trio
        await wait_for_connections(nats_server, 0)


async def test_open_connection_from_plain_trio_run_leaves_no_loop(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        assert trio_asyncio.current_loop.get() is not None
        await nc.flush()
    assert trio_asyncio.current_loop.get() is None


async def test_request_cancelled_concurrently_keeps_connection_usable(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc, nc.subscribe("never"):
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(functools.partial(nc.request, "never", b"", timeout=30))
            await trio.testing.wait_all_tasks_blocked()
            assert nc._router is not None
            assert len(nc._router.waiting) == 50
            nursery.cancel_scope.cancel()
        assert not nc._router.waiting
        with pytest.raises(trionats.NoRespondersError):
            await nc.request("nobody", b"")
