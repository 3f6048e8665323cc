"""`trionats top` against the embedded server: what it prints for a process publishing its
resource snapshots, and its errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import trio

import trionats
from trionats._top import format_plain, render_table


async def _top(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "trionats", "top", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            stdin=b"",
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


async def _publishing(nats_url: str, task_status: trio.TaskStatus[None]) -> None:
    """A service: a subscriber working, a resource manager publishing every 0.1 s."""

    async def handle(msg: trionats.Msg) -> None:
        if msg.data == b"fail":
            raise ValueError("bad order")

    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_subscriber(nc) as sub,
        trionats.open_resource_manager(interval=0.1, publish_on=nc, name="orders-svc") as rm,
    ):
        await sub.start("top.orders", handle)
        rm.register_subscriber("orders", sub)
        rm.register_connection("events", nc)
        task_status.started()
        i = 0
        while True:
            await nc.publish("top.orders", b"fail" if i % 10 == 0 else b"ok")
            i += 1
            await trio.sleep(0.005)


async def test_top_prints_every_publishing_process(nats_url: str) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_publishing, nats_url)
        done = await _top("--url", nats_url, "--duration", "3")
        once = await _top("--url", nats_url, "--once")
        nursery.cancel_scope.cancel()
    out = done.stdout.decode()
    assert done.returncode == 0, (out, done.stderr)
    lines = out.splitlines()
    assert lines[0] == f"trionats top: listening on trionats.stats.> at {nats_url}"
    processes = [line for line in lines if line.startswith("process orders-svc (id ")]
    assert len(processes) >= 5, out  # ~10 a second for 3 s, on a loaded machine too
    assert re.search(r": (healthy|degraded|unhealthy); rss [\d.]+ MB, fds \d+", processes[-1])
    subscriber = [line for line in lines if line.startswith("  subscriber orders [")]
    assert len(subscriber) == len(processes)
    assert re.search(r"[\d.]+ msg/s, in flight \d+/64, pending \d+, dropped 0, failed \d+", out)
    assert re.search(r"  connection events \[\w+\]: connected, in [\d.]+ msg/s", out)
    # a handler fails one message in ten: over the default max_failure_rate of 10 % or not
    assert "  alerts: none" in out or "  alert: subscriber 'orders' failure_rate" in out
    assert re.search(r"trionats top: \d+ snapshots from 1 processes$", out.strip())
    assert done.stderr == b""
    once_out = once.stdout.decode()
    assert once.returncode == 0, (once_out, once.stderr)
    assert once_out.count("process orders-svc (id ") == 1
    assert "  subscriber orders [" in once_out


async def test_top_errors_are_one_line(nats_url: str) -> None:
    nothing = await _top("--url", nats_url, "--once", "--duration", "0.5")
    assert nothing.returncode == 1
    assert nothing.stderr.decode().splitlines() == [
        "trionats top: no snapshot on trionats.stats.> within 0.5 s: is a resource manager "
        "publishing there (open_resource_manager(publish_on=nc))?"
    ]
    unreachable = await _top("--url", "nats://127.0.0.1:1", "--once")
    assert unreachable.returncode == 1
    (line,) = unreachable.stderr.decode().splitlines()
    assert line.startswith("trionats top: could not connect to nats://127.0.0.1:1")
    bad_subject = await _top("--url", nats_url, "--subject", "a b")
    assert bad_subject.returncode == 1
    assert bad_subject.stderr.decode().startswith("trionats top: --subject ")
    usage = await _top("--duration", "-1")
    assert usage.returncode == 2
    assert b"--duration must be > 0" in usage.stderr


def _snapshot(**overrides: object) -> dict[str, object]:
    snap: dict[str, object] = {
        "type": "io.trionats.resource_stats.v1",
        "id": "abc",
        "name": "svc",
        "host": "h",
        "interval": 1.0,
        "health": "degraded",
        "process": {
            "pid": 7,
            "rss_bytes": 50_000_000,
            "open_fds": 12,
            "cpu_percent": 3.0,
            "trio_tasks": 20,
            "asyncio_tasks": 4,
        },
        "pools": [
            {
                "name": "main",
                "health": "healthy",
                "borrowed": 2,
                "idle": 3,
                "open": 5,
                "waiting": 0,
                "reuse_rate_total": 0.97,
                "borrows": 100,
                "window": 1.0,
                "waits": 1,
                "timeouts": 0,
                "wait_time": {"p99": 0.002},
            }
        ],
        "subscribers": [],
        "connections": [],
        "alerts": [{"message": "pool 'main' borrowed 2 > 1 (critical)"}],
    }
    snap.update(overrides)
    return snap


def test_the_plain_and_table_views() -> None:
    text = format_plain(_snapshot())
    assert text.splitlines() == [
        "process svc (id abc, pid 7 on h): degraded; rss 50.0 MB, fds 12, cpu 3%, "
        "trio tasks 20, asyncio tasks 4",
        "  pool main [healthy]: borrowed 2, idle 3, open 5, waiting 0; reuse 97%, waits 1, "
        "timeouts 0, wait p99 2.0 ms",
        "  alert: pool 'main' borrowed 2 > 1 (critical)",
    ]
    from rich.console import Console

    console = Console(width=160, record=True)
    console.print(render_table({"abc": _snapshot()}, {"abc"}))
    shown = console.export_text()
    assert "trionats top: 1 processes" in shown
    assert "svc 7@h (stale)" in shown
    assert "2 borrowed / 5 open, 0 waiting, reuse 97%" in shown
    assert "100.0 borrows/s" in shown
    assert "svc 7: pool 'main' borrowed 2 > 1 (critical)" in shown
