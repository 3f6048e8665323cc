"""The command line: `trionats demo` for real, and Ctrl-C leaving no server behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from trionats._cli import _pid_alive, main


def test_demo_runs_for_real(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--messages", "200", "--requests", "20"]) == 0
    out = capsys.readouterr().out
    assert "published 200 orders through 200 pool borrows" in out
    assert "20 concurrent requests answered through the pool" in out
    assert "received 220, processed 218, failed 2, dropped 0" in out
    assert "health: OK" in out
    assert "(0 connections left on the server)" in out
    assert ": gone);" in out
    tasks = re.search(r"Trio tasks (\d+) before, (\d+) after", out)
    assert tasks is not None
    assert tasks.group(1) == tasks.group(2)


def _default_sigint() -> None:
    # A shell running us in the background without job control starts children with
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler: undo that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("args", [["server"], ["server", "--cluster", "2"]])
async def test_ctrl_c_stops_the_server_and_leaves_no_process(args: list[str]) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trionats", *args],
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
        server_pids = [int(pid) for pid in re.findall(rb"\(pid (\d+)\)", output)]
        assert len(server_pids) == (2 if "--cluster" in args else 1), output
        assert all(_pid_alive(pid) for pid in server_pids)
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
    assert not any(_pid_alive(pid) for pid in server_pids)


def test_bench_quick_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["format"] == "trionats-bench"
    assert report["format_version"] == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", report["date"])
    assert report["machine"]["cpu_count"] >= 1
    assert report["machine"]["nats-server"].count(".") == 2
    assert report["config"]["reps"] == 1
    assert report["config"]["uvloop"] is True  # uvloop is in the test extra
    assert report["figures"]["p99_ms"]["better"] == "lower"
    for scenario, sides in report["results"].items():
        assert len(sides["trionats"]) == len(sides["raw"]) == 1, scenario
        assert len(sides.get("raw_uvloop", [])) == (scenario != "subscriber_1ms"), scenario
        assert report["stats"][scenario]["sides"]["trionats"]["rate"]["n"] == 1
    assert report["summary"]["request"]["raw_uvloop_rate"] > 0
    assert report["summary"]["request"]["ratio_uvloop"] > 0
    assert set(report["summary"]) == {
        "publish",
        "pubsub",
        "request",
        "pool",
        "pool_shared",
        "subscriber",
        "subscriber_1ms",
        "latency_request",
        "latency_pubsub",
    }
    for scenario, row in report["summary"].items():
        assert row["raw_rate"] > 0, scenario
        assert row["trionats_rate"] > 0, scenario
        assert 0 < row["ratio"] < 100, scenario
        assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
    assert report["summary"]["request"]["trionats_p99_ms"] > 0
    for latency in ("latency_request", "latency_pubsub"):  # p50/p99 on both sides
        assert report["summary"][latency]["raw_p99_ms"] > 0
        assert report["summary"][latency]["trionats_p50_ms"] > 0
    assert report["summary"]["pubsub"]["trionats_dropped"] == 0
    assert 0.5 <= report["summary"]["pool"]["trionats_reuse_rate"] <= 1
    assert report["summary"]["pool"]["trionats_borrow_p99_ms"] > 0
    assert report["summary"]["subscriber"]["trionats_dropped"] == 0


def test_bench_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--count", "0"])
    assert "--count must be >= 1" in capsys.readouterr().err


def test_bench_rejects_a_bad_url_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--url", "nats://user:secret@127.0.0.1:notaport"])
    err = capsys.readouterr().err
    assert "--url: malformed host or port" in err
    assert "secret" not in err


def test_bench_duration_calibrates_the_count(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "--duration", "0.2", "--reps", "1", "--scenario", "publish"]
    assert main([*args, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["counts"]["publish"] >= 2000  # at least the calibration size
    assert report["summary"]["publish"]["trionats_rate"] > 0


def test_bench_duration_and_count_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--duration", "0"])
    assert "--duration must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--duration", "1", "--count", "5"])
    assert "not allowed with" in capsys.readouterr().err


def test_demo_and_bench_do_not_need_pytest() -> None:
    """The README's first command installs only trionats[server]: no pytest there."""
    code = (
        "import sys\n"
        "sys.modules['pytest'] = None  # any import of pytest now fails\n"
        "from trionats._cli import main\n"
        "assert main(['demo', '--messages', '20', '--requests', '2']) == 0\n"
        "import trionats._bench\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "health: OK" in out.stdout


def _old_report(path: Path, **config: int) -> None:
    """A hand-written --json report: publish, 2 repetitions, an impossible trionats rate."""
    runs = {"trionats": [{"rate": 1e12}, {"rate": 1e12}], "raw": [{"rate": 1.0}, {"rate": 1.0}]}
    report = {
        "format": "trionats-bench",
        "format_version": 2,
        "date": "2026-01-01T00:00:00+00:00",
        "config": {"count": 2000, "size": 128, "concurrency": 100, "reps": 2, **config},
        "counts": {"publish": 2000},
        "results": {"publish": runs},
    }
    path.write_text(json.dumps(report))


def test_bench_compare_flags_a_regression(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    _old_report(old)
    # no --scenario: the old report's scenarios (publish only)
    assert main(["bench", "--quick", "--compare", str(old), "--json", str(new)]) == 0
    out = capsys.readouterr().out
    assert f"change since {old}" in out
    rows = {line.split("│")[2].strip(): line for line in out.splitlines() if "│ publish" in line}
    assert "REGRESSION" in rows["trionats rate"]
    assert "reference better" in rows["raw rate"]
    assert "REGRESSION" in rows["ratio vs raw"]
    assert "raw uvloop rate" not in rows  # not in the old report
    assert "regression(s) beyond the noise band: publish trionats rate -100.0%" in out
    assert "note: this run has 1 repetition per figure" in out
    assert set(json.loads(new.read_text())["results"]) == {"publish"}


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "cannot read --compare .*: No such file or directory"),
        (lambda p: p.write_text("[1, 2"), "is not JSON"),
        (lambda p: p.write_text('{"results": {}, "format_version": 99}'), "newer trionats"),
        (lambda p: _old_report(p, size=64), "ran with --size 64, this run with --size 128"),
    ],
)
def test_bench_compare_refuses_a_bad_old_report_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: Any, message: str
) -> None:
    old = tmp_path / "old.json"
    setup(old)
    assert main(["bench", "--compare", str(old)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing ran: no table
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("trionats bench: ")
    assert re.search(message, lines[0]), lines[0]


def test_bench_uvloop_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "--quick", "--scenario", "request", "--json", str(out)]
    assert main([*args, "--no-uvloop"]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]["request"]) == {"trionats", "raw"}
    assert "ratio_uvloop" not in report["summary"]["request"]
    assert "raw uvloop" not in capsys.readouterr().out
    monkeypatch.setattr("trionats._bench.uvloop_available", lambda: False)
    assert main([*args, "--uvloop"]) == 1
    err = capsys.readouterr().err
    assert "trionats bench: --uvloop: uvloop is not installed" in err


def test_bench_help_names_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "spread over them (default: 5)" in text
    assert "--compare OLD_JSON" in text
    assert "(default: on when uvloop is importable)" in text
    assert "--no-uvloop" in text
