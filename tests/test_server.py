"""The embedded nats-server: discovery, start/stop/restart, cluster."""

from __future__ import annotations

import pytest

import trionats
from trionats.testing import monitor_json


def test_find_reports_both_install_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIONATS_NATS_SERVER", "/nonexistent/nats-server")
    with pytest.raises(trionats.ServerNotFoundError, match="not a file"):
        trionats.find_nats_server()
    monkeypatch.delenv("TRIONATS_NATS_SERVER")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr("sysconfig.get_path", lambda name: "/nonexistent")
    monkeypatch.setattr("sys.executable", "/nonexistent/python")
    with pytest.raises(trionats.ServerNotFoundError, match=r"trionats\[server\].*PATH"):
        trionats.find_nats_server()


async def test_restart_on_the_same_port(nats_server: trionats.NatsServer) -> None:
    port = nats_server.port
    first_pid = nats_server.pid
    await nats_server.stop()
    assert not nats_server.is_running
    await nats_server.stop()  # twice is fine
    await nats_server.start()
    assert nats_server.port == port
    assert nats_server.pid != first_pid
    async with trionats.open_connection(nats_server.url) as nc:
        await nc.flush()


async def test_server_is_stopped_when_the_block_exits() -> None:
    async with trionats.open_nats_server() as server:
        process = server._process
        assert process is not None
        assert process.returncode is None
    assert process.returncode is not None


async def test_cluster_routes_messages_between_nodes(
    nats_cluster: list[trionats.NatsServer],
) -> None:
    a, b, _ = nats_cluster
    # wait (bounded) until the routes are up
    import trio

    with trio.fail_after(10):
        while (await monitor_json(a, "/routez"))["num_routes"] < 2:  # noqa: ASYNC110 - polling
            await trio.sleep(0.02)
    async with (
        trionats.open_connection(a.url) as nca,
        trionats.open_connection(b.url) as ncb,
        ncb.subscribe("across") as sub,
    ):
        with trio.fail_after(10):
            while True:  # interest propagates asynchronously across routes
                await nca.publish("across", b"hop")
                await nca.flush()
                with trio.move_on_after(0.05):
                    msg = await sub.next_msg()
                    break
        assert msg.data == b"hop"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"port": "4222"}, TypeError, r"port must be an int.*'4222'"),
        ({"port": 70000}, ValueError, r"port must be in 1\.\.65535, got 70000"),
        ({"port": -1}, ValueError, r"port.*-1"),
        ({"jetstream": 1}, TypeError, r"jetstream must be a bool.*1"),
        ({"args": "-DV"}, TypeError, r"args must be a list or tuple of str.*'-DV'"),
        ({"args": ["-DV", 5]}, TypeError, r"args item.*5"),
    ],
)
async def test_bad_server_options_name_the_field(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        async with trionats.open_nats_server(**kwargs):  # type: ignore[arg-type]
            pass


async def test_bad_cluster_size_and_stop_timeout_name_the_field() -> None:
    with pytest.raises(TypeError, match=r"size must be an int.*'3'"):
        async with trionats.open_nats_cluster("3"):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match=r"size.*0"):
        async with trionats.open_nats_cluster(0):
            pass
    async with trionats.open_nats_server() as server:
        with pytest.raises(ValueError, match=r"timeout.*-1"):
            await server.stop(timeout=-1)
        assert server.is_running


async def test_a_port_taken_by_another_server_is_an_error_not_a_false_ready() -> None:
    """Without the check, the readiness probe met the other server's INFO and reported
    ready while our own process had exited ("address already in use")."""
    async with trionats.open_nats_server() as first:
        with pytest.raises(OSError, match=f"port {first.port} is already in use"):
            async with trionats.open_nats_server(port=first.port):
                pass  # pragma: no cover
