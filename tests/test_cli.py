"""The command line: `trionats demo` for real, and Ctrl-C leaving no server behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import trio

from trionats._cli import _pid_alive, main


def test_demo_runs_for_real(capsys: object) -> None:
    assert main(["demo", "--messages", "200", "--requests", "20"]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "subscriber received 200" in out
    assert "20 concurrent requests answered" in out
    assert ": gone;" in out


def _default_sigint() -> None:
    # A shell running us in the background without job control starts children with
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler: undo that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_ctrl_c_stops_the_server_and_leaves_no_process() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trionats", "server"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        preexec_fn=_default_sigint,
    )
    assert process.stdout is not None
    output = b""
    try:
        with trio.fail_after(20):
            while b"Ctrl-C" not in output:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, output
                output += chunk
        match = re.search(rb"\(pid (\d+)\)", output)
        assert match, output
        server_pid = int(match.group(1))
        assert _pid_alive(server_pid)
        process.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            while chunk := await process.stdout.receive_some(4096):
                output += chunk
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.stdout.aclose()
    assert process.returncode == 130, output
    assert b"stopped cleanly" in output
    assert not _pid_alive(server_pid)
