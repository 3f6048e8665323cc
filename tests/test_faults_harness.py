"""The rest of the fault harness of trionats.testing: servers frozen, thawed, killed and
restarted (alone and in a cluster, by index), and the leak probe catching each kind of
leak it counts. Against real nats-servers on 127.0.0.1."""

from __future__ import annotations

import socket

import pytest
import trio
import trio_asyncio

import trionats
from trionats.testing import NatsCluster, leak_probe, open_fault_proxy, wait_for_connections


async def test_freeze_and_thaw(nats_server: trionats.NatsServer) -> None:
    async with trionats.open_connection(nats_server.url) as nc:
        await nats_server.freeze()
        assert nats_server.is_frozen
        with pytest.raises(trionats.TimeoutError):
            await nc.flush(timeout=0.3)
        await nats_server.thaw()
        assert not nats_server.is_frozen
        await nc.flush(timeout=5)


async def test_stop_a_frozen_server_is_prompt(nats_server: trionats.NatsServer) -> None:
    await nats_server.freeze()
    start = trio.current_time()
    await nats_server.stop(timeout=5)
    assert trio.current_time() - start < 2  # thawed first, so SIGTERM is handled at once
    assert not nats_server.is_running
    assert not nats_server.is_frozen
    with pytest.raises(trionats.TrionatsError, match=str(nats_server.port)):
        await nats_server.freeze()


async def test_kill_a_frozen_server(nats_server: trionats.NatsServer) -> None:
    await nats_server.freeze()
    await nats_server.kill()
    assert not nats_server.is_running
    assert not nats_server.is_frozen
    await nats_server.start()
    async with trionats.open_connection(nats_server.url) as nc:
        await nc.flush(timeout=5)


@pytest.mark.parametrize("kill", [False, True])
async def test_restart_same_port(nats_server: trionats.NatsServer, kill: bool) -> None:
    async with (
        trionats.open_connection(nats_server.url, reconnect_time_wait=0.1) as nc,
        nc.events() as events,
    ):
        pid = nats_server.pid
        await nats_server.restart(kill=kill)
        assert nats_server.pid != pid
        kinds = []
        with trio.fail_after(10):
            async for event in events:
                kinds.append(event.kind)
                if event.kind is trionats.EventKind.RECONNECTED:
                    break
        assert trionats.EventKind.DISCONNECTED in kinds
        await nc.flush(timeout=5)
    with pytest.raises(TypeError, match="kill"):
        await nats_server.restart(kill="yes")  # type: ignore[arg-type]


async def test_cluster_by_index(nats_cluster: NatsCluster) -> None:
    assert isinstance(nats_cluster, list)
    assert nats_cluster.urls == [s.url for s in nats_cluster]
    assert nats_cluster.index_of(nats_cluster[2].url) == 2
    assert nats_cluster.index_of("nats://127.0.0.1:1") is None
    assert nats_cluster.index_of(None) is None
    await nats_cluster.kill(1)
    assert not nats_cluster[1].is_running
    await nats_cluster.restart(1)
    assert nats_cluster[1].is_running
    await nats_cluster.freeze(0)
    assert nats_cluster[0].is_frozen
    await nats_cluster.thaw(0)
    await nats_cluster.stop(2)
    await nats_cluster.start(2)
    # the restarted nodes route again: a message crosses from node 2 to node 1
    async with (
        trionats.open_connection(nats_cluster[1].url) as a,
        trionats.open_connection(nats_cluster[2].url) as b,
        a.subscribe("x.cluster") as sub,
    ):
        await a.flush(timeout=5)
        with trio.fail_after(10):
            while True:  # bounded: until the route carries the interest
                await b.publish("x.cluster", b"hop")
                await b.flush(timeout=5)
                with trio.move_on_after(0.2):
                    assert (await sub.next_msg()).data == b"hop"
                    break


async def test_leak_probe_clean(nats_server: trionats.NatsServer) -> None:
    async with (
        leak_probe(nats_server) as probe,
        trionats.open_connection(nats_server.url) as nc,
        nc.subscribe("a"),
    ):
        await nc.flush(timeout=5)
        inside = await probe.snapshot()
        assert (
            inside[f"connz[{nats_server.port}]"] == probe.before[f"connz[{nats_server.port}]"] + 1
        )
        assert inside["trio_tasks"] > probe.before["trio_tasks"]
    probe.assert_no_leaks()
    assert probe.leaks == {}
    assert set(probe.after) >= {"trio_tasks", "asyncio_tasks", "fds"}


async def test_leak_probe_sees_a_leaked_task_fd_and_connection(
    nats_server: trionats.NatsServer,
) -> None:
    async with trio.open_nursery() as nursery:
        outer_done = trio.Event()

        async def outer_connection(task_status: trio.TaskStatus[None]) -> None:
            async with trionats.open_connection(nats_server.url) as nc, nc.subscribe("leak"):
                await nc.flush(timeout=5)
                task_status.started()
                await outer_done.wait()

        leaked = socket.socket()
        async with leak_probe(nats_server, settle_timeout=0.3) as probe:
            nursery.start_soon(trio.sleep_forever)  # a task that outlives the block
            await nursery.start(outer_connection)  # a connection and a subscription
            leaked.close()
            leaked = socket.socket()  # an fd opened inside the block
        try:
            leaks = probe.leaks
            port = nats_server.port
            assert leaks["trio_tasks"][1] > leaks["trio_tasks"][0]
            assert leaks[f"connz[{port}]"] == (0, 1)
            assert leaks[f"subsz[{port}]"][1] == leaks[f"subsz[{port}]"][0] + 1
            assert "fds" in leaks
            with pytest.raises(AssertionError, match=r"connz\[\d+\]: 0 -> 1"):
                probe.assert_no_leaks()
        finally:
            leaked.close()
            outer_done.set()
            nursery.cancel_scope.cancel()


async def test_leak_probe_counts_asyncio_tasks(nats_server: trionats.NatsServer) -> None:
    async with trio_asyncio.open_loop():
        async with (
            leak_probe(nats_server) as probe,
            trionats.open_connection(nats_server.url) as nc,
        ):
            await nc.flush(timeout=5)
            inside = await probe.snapshot()
            assert inside["asyncio_tasks"] > probe.before["asyncio_tasks"]
        probe.assert_no_leaks()


async def test_leak_probe_bad_settle_timeout() -> None:
    with pytest.raises(ValueError, match="settle_timeout"):
        async with leak_probe(settle_timeout=-1):
            pass  # pragma: no cover
    with pytest.raises(TypeError, match="settle_timeout"):
        async with leak_probe(settle_timeout="1"):  # type: ignore[arg-type]
            pass  # pragma: no cover


async def test_fault_proxy_block_is_cancellable(nats_server: trionats.NatsServer) -> None:
    """Cancelling a block with a live, stalled connection through the proxy ends at once."""
    with trio.move_on_after(0.5) as scope:
        async with (
            open_fault_proxy(nats_server) as proxy,
            trionats.open_connection(proxy.url, close_timeout=0.5) as nc,
        ):
            proxy.blackhole()
            await nc.flush(timeout=None)  # hangs until the cancel
    assert scope.cancelled_caught
    await wait_for_connections(nats_server, 0)
