"""The latency scenarios' sides take turns (``trionats._bench._run_turns``).

The children here are stand-ins (a few lines of Python speaking the turns protocol), not
benchmark children: the test is about the harness (who runs when, how many operations,
what a failing child reports), which a real latency child would make slow and noisy.
``tests/test_cli.py::test_bench_quick_json`` runs the real children end to end.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from trionats._bench import TURN_BLOCK, BenchError, _run_turns

CHILD = """
import json, sys
side, log = sys.argv[1], sys.argv[2]
print("ready", flush=True)
for line in sys.stdin:
    if not line.strip().isdigit():
        break
    n = int(line)
    with open(log, "a") as f:
        f.write(f"{side} {n}\\n")
    print(json.dumps([0.001] * n), flush=True)
"""

FAILING = """
import sys
print("ready", flush=True)
sys.stdin.readline()
sys.stderr.write("boom: the child failed\\n")
sys.exit(3)
"""


def _command(source: str, *args: str) -> list[str]:
    return [sys.executable, "-c", source, *args]


async def test_sides_alternate_and_each_runs_count_operations(tmp_path: Path) -> None:
    log = tmp_path / "turns.log"
    count = 2 * TURN_BLOCK + TURN_BLOCK // 2
    figures = await _run_turns(
        {side: _command(CHILD, side, str(log)) for side in ("a", "b", "c")},
        count,
        "nats://127.0.0.1:4222",
        "stand-in",
    )
    assert set(figures) == {"a", "b", "c"}
    assert figures["a"]["p50_ms"] == pytest.approx(1.0)
    turns = [line.split() for line in log.read_text().splitlines()]
    # Rounds alternate the order of the sides; the last block is the rest.
    assert [side for side, _ in turns] == list("abc" + "cba" + "abc")
    for side in "abc":
        assert sum(int(n) for s, n in turns if s == side) == count


async def test_a_failing_child_is_reported_with_its_stderr(tmp_path: Path) -> None:
    log = tmp_path / "turns.log"
    with pytest.raises(BenchError, match="b child exited with status 3:\nboom: the child failed"):
        await _run_turns(
            {"a": _command(CHILD, "a", str(log)), "b": _command(FAILING)},
            TURN_BLOCK,
            "nats://127.0.0.1:4222",
            "stand-in",
        )


async def test_cancelling_the_turns_leaves_no_child_running() -> None:
    pids: list[int] = []
    sleeper = 'import time; print("ready", flush=True); time.sleep(600)'
    with trio.move_on_after(2) as scope:  # cancels the wait for the sleeper's turn
        await _run_turns(
            {"a": _command(sleeper)},
            TURN_BLOCK,
            "nats://127.0.0.1:4222",
            "stand-in",
            started=lambda what, pid: pids.append(pid),
        )
    assert scope.cancelled_caught
    assert len(pids) == 1
    assert not await trio.Path(f"/proc/{pids[0]}").exists()  # killed and reaped


async def test_a_child_answering_garbage_is_reported() -> None:
    chatty = 'import sys; print("ready", flush=True); sys.stdin.readline(); print("hello")'
    with pytest.raises(BenchError, match="a child answered 'hello\\\\n', not its latencies"):
        await _run_turns({"a": _command(chatty)}, TURN_BLOCK, "nats://127.0.0.1:4222", "stand-in")
