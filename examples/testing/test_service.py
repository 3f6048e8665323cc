"""A test suite for a small service, using the trionats pytest plugin's fixtures.

Run from this directory: ``python -m pytest`` (needs ``pip install 'trionats[test]'``).
Each test gets its own nats-server on 127.0.0.1, stopped when the test ends.
"""

import trio

import trionats
from trionats import NatsServer
from trionats.testing import FaultProxy, leak_probe


async def double_service(nc: trionats.Connection, task_status: trio.TaskStatus[None]) -> None:
    """The code under test: answers ``math.double`` requests."""
    async with nc.subscribe("math.double") as sub:
        task_status.started()
        async for msg in sub:
            await msg.respond(b"%d" % (2 * int(msg.data)))


async def test_the_service_answers(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc, trio.open_nursery() as nursery:
        await nursery.start(double_service, nc)
        reply = await nc.request("math.double", b"21", timeout=5)
        assert reply.data == b"42"
        nursery.cancel_scope.cancel()


async def test_the_service_leaves_nothing_behind(nats_server: NatsServer) -> None:
    async with leak_probe(nats_server) as probe:  # counts before and after the block
        await run_once(nats_server.url)
    probe.assert_no_leaks()


async def run_once(url: str) -> None:
    async with trionats.open_connection(url) as nc, trio.open_nursery() as nursery:
        await nursery.start(double_service, nc)
        await nc.request("math.double", b"1", timeout=5)
        nursery.cancel_scope.cancel()


async def test_a_request_times_out_behind_a_black_hole(fault_proxy: FaultProxy) -> None:
    async with trionats.open_connection(fault_proxy.url) as nc, trio.open_nursery() as nursery:
        await nursery.start(double_service, nc)
        fault_proxy.blackhole("down")  # the server's answers never arrive
        try:
            await nc.request("math.double", b"1", timeout=0.3)
        except trionats.TimeoutError:
            pass
        else:
            raise AssertionError("expected a timeout")
        nursery.cancel_scope.cancel()


async def test_requests_survive_a_server_restart(nats_server: NatsServer) -> None:
    async with (
        trionats.open_connection(nats_server.url, reconnect_time_wait=0.1) as nc,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(double_service, nc)
        await nats_server.restart()
        with trio.fail_after(10):  # bounded polling, no fixed sleep
            while True:
                try:
                    reply = await nc.request("math.double", b"5", timeout=1)
                    break
                except (trionats.TimeoutError, trionats.ConnectionClosedError):
                    await trio.sleep(0.05)
        assert reply.data == b"10"
        nursery.cancel_scope.cancel()
