"""Every program in examples/ runs, against a real nats-server, within a time bound."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import trionats

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


async def _run(args: list[str], env: dict[str, str], cwd: Path = EXAMPLES) -> str:
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, *args],
            cwd=cwd,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            capture_stdout=True,
            stderr=subprocess.STDOUT,
            check=False,
            stdin=b"",
        )
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return out


def test_every_example_is_run_here() -> None:
    programs = {p.name for p in EXAMPLES.glob("*.py")}
    assert programs == {
        "request_reply.py",
        "pool_concurrency.py",
        "subscriber_handlers.py",
        "graceful_shutdown.py",
        "batch_processing.py",
        "production_monitoring.py",
        "tracing.py",
    }
    assert {p.name for p in (EXAMPLES / "testing").glob("test_*.py")} == {"test_service.py"}


@pytest.mark.parametrize(
    ("program", "expected"),
    [
        ("request_reply.py", r"100 concurrent requests answered\nno responders: "),
        ("pool_concurrency.py", r"published 196, borrow timeouts 4; [1-8] connections created"),
        (
            "subscriber_handlers.py",
            r"b'done 42'\nreceived 101: processed 81, failed 10, timed out 10, dropped 0",
        ),
        (
            "batch_processing.py",
            r"published 5000, lost 0, in \d+ batches\nstored 5000 events: processed 5000, "
            r"dropped 0\nbulk inserts: \d+ runs",
        ),
        (
            "production_monitoring.py",
            r"(?s)health: degraded\n  subscriber 'orders': drop_rate .*suggestion "
            r"\[subscriber_drops\]: subscriber 'orders' dropped \d+ messages in .*"
            r'trionats_messages_processed_total\{component="orders",status="dropped"\} .*'
            r"stopped: sampler, endpoint and alert watcher ended",
        ),
        (
            "tracing.py",
            r"GET /orders/42 \[internal\]\n  request orders.status \[client\] nats\n"
            r"    process orders.status \[consumer\] nats\n      db lookup \[internal\]\n"
            r"4 spans, 1 trace",
        ),
    ],
)
async def test_example_runs(program: str, expected: str, nats_url: str) -> None:
    out = await _run([program], {"NATS_URL": nats_url})
    assert re.search(expected, out), out


async def test_graceful_shutdown_finishes_in_flight_work_on_sigterm(nats_url: str) -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "graceful_shutdown.py"],
        cwd=EXAMPLES,
        env={**os.environ, "NATS_URL": nats_url, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    output = b""

    async def read_until(marker: bytes) -> None:
        nonlocal output
        assert process.stdout is not None
        while marker not in output:
            chunk = await process.stdout.receive_some(4096)
            assert chunk, output
            output += chunk

    replies: list[bytes] = []
    try:
        with trio.fail_after(30):
            await read_until(b"ready")
            async with trionats.open_connection(nats_url) as nc, trio.open_nursery() as nursery:

                async def ask(i: int) -> None:
                    reply = await nc.request("svc.work", b"job %d" % i, timeout=10)
                    replies.append(reply.data)

                for i in range(4):
                    nursery.start_soon(ask, i)
                for i in range(4):  # all four handlers are running: now stop the service
                    await read_until(b"working on job %d" % i)
                process.send_signal(signal.SIGTERM)
            await read_until(b"stopped cleanly")
            while chunk := await process.stdout.receive_some(4096):
                output += chunk
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.stdout.aclose()
    assert process.returncode == 0, output
    assert b"got SIGTERM: stopping" in output
    assert b"stopped cleanly: processed 4, cancelled 0, in flight 0" in output
    assert sorted(replies) == [b"handled job %d" % i for i in range(4)]


async def test_the_example_test_suite_passes() -> None:
    out = await _run(["-m", "pytest", "-q", "-p", "no:cacheprovider"], {}, EXAMPLES / "testing")
    assert "4 passed" in out, out
