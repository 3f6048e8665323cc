"""`trionats bench` and `trionats server` stop their whole process tree on a signal.

Ctrl-C (SIGINT) and SIGTERM cancel the command: the raw nats-py child and the embedded
nats-server are stopped on the way out. SIGKILL cannot be caught: then the children see
their parent die (the server by PR_SET_PDEATHSIG, Linux only; the benchmark child by the
end-of-file on its stdin pipe) and exit by themselves.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import trio
from test_server_lifetime import process_gone, wait_gone

from trionats._bench import BenchError, _child_command, _run_child


def _default_sigint() -> None:
    # A shell running us in the background without job control starts children with
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler: undo that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def _start(args: list[str], marker: bytes) -> tuple[trio.Process, bytes]:
    """Start ``python -m trionats *args``; read its output until ``marker`` and a newline."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trionats", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=_default_sigint,
    )
    assert process.stdout is not None
    output = b""
    try:
        with trio.fail_after(30):
            while marker not in output or b"\n" not in output.partition(marker)[2]:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, output
                output += chunk
    except BaseException:
        process.kill()
        await process.wait()
        await process.stdout.aclose()
        raise
    return process, output


async def _finish(process: trio.Process, output: bytes, timeout: float) -> bytes:
    """Read to end-of-file and wait for the exit, within ``timeout``."""
    assert process.stdout is not None
    with trio.fail_after(timeout):
        while chunk := await process.stdout.receive_some(4096):
            output += chunk
        await process.wait()
    return output


_SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG: Linux")
@pytest.mark.parametrize("signum", _SIGNALS, ids=[s.name for s in _SIGNALS])
async def test_bench_leaves_no_process_after_a_signal(signum: signal.Signals) -> None:
    args = ["bench", "--verbose", "--scenario", "publish", "--reps", "1"]
    args += ["--count", "500000000"]  # minutes of work: only the signal ends it
    process, output = await _start(args, b"started raw nats-py child")
    pids: list[int] = []
    try:
        server = re.search(rb"embedded nats-server at \S+, pid (\d+)", output)
        child = re.search(rb"raw nats-py child \(publish, rep 1\), pid (\d+)", output)
        assert server is not None, output
        assert child is not None, output
        pids = [int(server.group(1)), int(child.group(1))]
        assert not any(process_gone(pid) for pid in pids)
        t0 = time.monotonic()
        process.send_signal(signum)
        output = await _finish(process, output, 15)
        left = await wait_gone(pids, 10)
        elapsed = time.monotonic() - t0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        assert process.stdout is not None
        await process.stdout.aclose()
        for pid in pids:
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert left == [], output
    assert elapsed < 5, (elapsed, output)
    if signum == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 128 + signum, output
        assert b"stopped cleanly" in output
        assert b"Traceback" not in output, output


@pytest.mark.parametrize("signum", _SIGNALS[:2], ids=[s.name for s in _SIGNALS[:2]])
async def test_server_command_stops_cleanly_on_a_signal(signum: signal.Signals) -> None:
    process, output = await _start(["server"], b"Ctrl-C to stop")
    match = re.search(rb"\(pid (\d+)\)", output)
    assert match is not None, output
    pid = int(match.group(1))
    try:
        process.send_signal(signum)
        output = await _finish(process, output, 15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        assert process.stdout is not None
        await process.stdout.aclose()
    assert process.returncode == 128 + signum, output
    assert b"stopped cleanly" in output
    assert await wait_gone([pid], 5) == []


async def test_ignored_sigint_stays_ignored() -> None:
    """A background job started with SIGINT ignored must not start obeying it."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trionats", "server"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert process.stdout is not None
    output = b""
    try:
        with trio.fail_after(30):
            while b"Ctrl-C to stop" not in output:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, output
                output += chunk
        process.send_signal(signal.SIGINT)
        # Still running: a SIGTERM after the SIGINT is what stops it (143, not 130).
        process.send_signal(signal.SIGTERM)
        output = await _finish(process, output, 15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.stdout.aclose()
    assert process.returncode == 128 + signal.SIGTERM, output
    assert b"terminated: stopped cleanly" in output


async def test_a_failing_child_reports_its_own_stderr(nats_url: str) -> None:
    command = _child_command("no-such-scenario", nats_url, 10, 8, 1)
    with pytest.raises(BenchError) as caught:
        await _run_child(command, "raw nats-py child (no-such-scenario, rep 1)", None, nats_url)
    message = str(caught.value)
    assert "raw nats-py child (no-such-scenario, rep 1) exited with status 1" in message
    assert "KeyError: 'no-such-scenario'" in message  # the child's own traceback


async def test_a_killed_child_is_named_with_its_signal() -> None:
    code = "import os, signal, sys; sys.stderr.write('about to die'); os.kill(os.getpid(), 9)"
    with pytest.raises(BenchError, match=r"was killed by signal 9:\nabout to die"):
        await _run_child([sys.executable, "-c", code], "the child")


async def test_cancelling_run_child_stops_the_child() -> None:
    pids: list[int] = []
    with trio.move_on_after(30) as scope:
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                code = "import time\nwhile True: time.sleep(1)"
                await _run_child(
                    [sys.executable, "-c", code], "sleeper", lambda what, pid: pids.append(pid)
                )

            nursery.start_soon(run)
            while not pids:  # noqa: ASYNC110 - bounded by the move_on_after
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught
    assert await wait_gone(pids, 5) == []


def test_bench_to_a_missing_server_fails_within_seconds() -> None:
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "trionats", "bench", "--quick", "--url", "nats://u:pw@127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - t0 < 10
    assert done.returncode == 1, done.stderr
    assert "no NATS server answers at nats://***@127.0.0.1:9" in done.stderr
    assert "pw" not in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG: Linux")
@pytest.mark.parametrize("args", [["server"], ["server", "--cluster", "2"]])
async def test_server_command_killed_leaves_no_server(args: list[str]) -> None:
    process, output = await _start(args, b"Ctrl-C to stop")
    pids = [int(pid) for pid in re.findall(rb"\(pid (\d+)\)", output)]
    try:
        assert len(pids) == (2 if "--cluster" in args else 1), output
        assert not any(process_gone(pid) for pid in pids)
        process.kill()
        await _finish(process, output, 15)
        left = await wait_gone(pids, 5)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        assert process.stdout is not None
        await process.stdout.aclose()
        for pid in pids:
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert left == []
