"""``trionats bench`` JetStream rows: js_publish, js_publish_async, js_consume.

Each runs trionats in-process and raw nats-py in a child process against the same real
nats-server (JetStream on, file storage), each side on a fresh stream it deletes again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio

import trionats
from trionats._bench import (
    ALL_SCENARIOS,
    JS_SCENARIOS,
    SCENARIOS,
    BenchConfig,
    BenchError,
    run_bench,
)
from trionats._cli import _parsers
from trionats.testing import open_nats_server


async def _account_streams(url: str) -> int:
    async with trionats.open_connection(url) as nc:
        reply = await nc.request("$JS.API.INFO", b"", timeout=5)
    streams: int = json.loads(reply.data)["streams"]
    return streams


async def _cli(*args: str) -> trio.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "trionats", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_js_scenarios_quick_through_the_cli(nats_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    picks = [arg for scenario in JS_SCENARIOS for arg in ("--scenario", scenario)]
    with trio.fail_after(120):
        done = await _cli("bench", "--quick", "--url", nats_url, "--json", str(out), *picks)
    stdout = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads(out.read_text())
    assert set(report["summary"]) == set(JS_SCENARIOS)
    for scenario, row in report["summary"].items():
        assert len(report["results"][scenario]["raw"]) == 1, scenario
        assert len(report["results"][scenario]["trionats"]) == 1, scenario
        assert row["raw_rate"] > 0, scenario
        assert row["trionats_rate"] > 0, scenario
        assert row["ratio"] == pytest.approx(row["trionats_rate"] / row["raw_rate"])
        assert 0 < row["ratio"] < 100, scenario
        # the table shows the row, both sides and the ratio
        line = next(line for line in stdout.splitlines() if f" {scenario} " in line)
        assert line.count("/s") == 2, line
        assert f"{row['ratio']:.2f}x" in line, line
    assert report["counts"] == {
        scenario: BenchConfig(count=2000).count_for(scenario) for scenario in JS_SCENARIOS
    }
    with trio.fail_after(10):
        assert await _account_streams(nats_url) == 0  # every fresh stream deleted again


async def test_run_bench_js_rows_have_both_sides(nats_url: str) -> None:
    with trio.fail_after(120):
        report = await run_bench(nats_url, list(JS_SCENARIOS), BenchConfig(count=1200, reps=2))
    for scenario in JS_SCENARIOS:
        sides = report["results"][scenario]
        assert len(sides["raw"]) == len(sides["trionats"]) == 2
        row = report["summary"][scenario]
        assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
        assert row["ratio_min"] > 0


async def test_a_server_without_jetstream_fails_with_one_line() -> None:
    with trio.fail_after(60):
        async with open_nats_server() as server:  # JetStream off
            done = await _cli("bench", "--quick", "--url", server.url, "--scenario", "js_consume")
            with pytest.raises(BenchError, match="has no JetStream"):
                await run_bench(server.url, ["js_publish"], BenchConfig(count=100, reps=1))
    assert done.returncode == 1
    # the error is one line (next to the progress bar's own line)
    lines = [line for line in done.stderr.decode().splitlines() if "trionats bench:" in line]
    assert len(lines) == 1, done.stderr
    assert "has no JetStream" in lines[0]
    assert "-js" in lines[0]
    assert "Traceback" not in done.stderr.decode()


async def test_js_scenarios_are_opt_in() -> None:
    assert not set(JS_SCENARIOS) & set(SCENARIOS)  # the default run is unchanged
    assert ALL_SCENARIOS[: len(SCENARIOS + JS_SCENARIOS)] == SCENARIOS + JS_SCENARIOS
    _, subparsers = _parsers()
    bench = subparsers["bench"]
    action = next(a for a in bench._actions if a.dest == "scenario")
    assert action.choices is not None
    assert list(action.choices) == list(ALL_SCENARIOS)
    assert "js_publish" in bench.format_help()
    with pytest.raises(ValueError, match="js_nope"):
        await run_bench("nats://127.0.0.1:1", ["js_nope"], BenchConfig(count=1, reps=1))


def test_count_for_js_scenarios() -> None:
    config = BenchConfig(count=100_000)
    assert config.count_for("js_publish") == 10_000
    assert config.count_for("js_publish_async") == 25_000
    assert config.count_for("js_consume") == 25_000
    small = BenchConfig(count=10)
    assert small.count_for("js_publish") == 100
    assert small.count_for("js_consume") == 256
