"""A nats-server started by trionats never outlives the process that started it.

Linux only: these tests rely on ``PR_SET_PDEATHSIG`` (elsewhere a server is stopped on
every orderly exit, but a SIGKILLed parent leaves it running; see ``trionats._server``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import trio

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only"
)


def process_gone(pid: int) -> bool:
    """The process has exited: no such pid, or a zombie waiting for its reaper.

    A server whose parent was killed is re-parented (to init or a subreaper) and reaped
    there, not by us: a zombie is dead, whoever reaps it and whenever.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


async def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Poll (bounded) until every pid is gone; returns those still alive at the deadline."""
    with trio.move_on_after(timeout):
        while not all(process_gone(pid) for pid in pids):  # noqa: ASYNC110 - bounded poll
            await trio.sleep(0.01)
    return [pid for pid in pids if not process_gone(pid)]


def kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        if not process_gone(pid):
            os.kill(pid, signal.SIGKILL)


async def read_until(stream: trio.abc.ReceiveStream, marker: bytes, timeout: float) -> bytes:
    output = b""
    with trio.fail_after(timeout):
        while marker not in output:
            chunk = await stream.receive_some(4096)
            assert chunk, output
            output += chunk
    return output


_OWNER = """
import trio, trionats

async def main():
    async with trionats.open_nats_cluster({size}) as servers:
        print(" ".join(str(s.pid) for s in servers), "READY", flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


@pytest.mark.parametrize("size", [1, 2])
async def test_server_dies_with_its_parent_killed_by_sigkill(size: int) -> None:
    owner = await trio.lowlevel.open_process(
        [sys.executable, "-c", _OWNER.format(size=size)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert owner.stdout is not None
    server_pids: list[int] = []
    try:
        output = await read_until(owner.stdout, b"READY", 20)
        server_pids = [int(pid) for pid in output.split(b"READY")[0].split()]
        assert len(server_pids) == size
        assert not any(process_gone(pid) for pid in server_pids)
        owner.kill()  # SIGKILL: no unwinding, no finally, no atexit in the owner
        await owner.wait()
        assert owner.returncode == -signal.SIGKILL
        assert await wait_gone(server_pids, 10) == []
    finally:
        if owner.returncode is None:
            owner.kill()
            await owner.wait()
        await owner.stdout.aclose()
        kill_leftovers(server_pids)


_RETIRED_THREADS = """
import json, os, subprocess, sys, threading
import trio
import trio._core._thread_cache as thread_cache
import trionats
from trionats._server import _pdeathsig_preexec, find_nats_server, free_port

thread_cache.IDLE_TIMEOUT = 0  # an idle worker thread retires at once (default: 10 s)


async def workers_retired() -> None:
    # Until every thread but this one is gone, from Python and from the kernel.
    with trio.fail_after(10):
        while True:
            others = [t for t in threading.enumerate() if t is not threading.main_thread()]
            tids = [t.native_id for t in others]
            if not others and not any(os.path.exists(f"/proc/self/task/{t}") for t in tids):
                return
            await trio.sleep(0.01)


async def main() -> None:
    result = {}
    # The pitfall: trio.lowlevel.open_process forks in a worker thread, so a child armed
    # with PR_SET_PDEATHSIG there dies as soon as that thread retires.
    control = await trio.lowlevel.open_process(
        [find_nats_server(), "-a", "127.0.0.1", "-p", str(free_port())],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_pdeathsig_preexec(),
    )
    with trio.move_on_after(10):
        await control.wait()
    if control.returncode is None:
        control.kill()
        await control.wait()
        result["control"] = "survived"
    else:
        result["control"] = control.returncode
    # open_nats_server forks on the Trio thread: its server lives on.
    async with trionats.open_nats_server() as server:
        await workers_retired()
        async with trionats.open_connection(server.url) as nc:
            await nc.flush(timeout=5)
        result["server_running"] = server.is_running
    print(json.dumps(result), flush=True)


trio.run(main)
"""


async def test_server_outlives_the_retirement_of_trio_worker_threads() -> None:
    """Trio's worker threads retire when idle; a server spawned from one would die."""
    done = await trio.run_process(
        [sys.executable, "-c", _RETIRED_THREADS],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert result["control"] == -signal.SIGKILL  # the pitfall is real...
    assert result["server_running"] is True  # ...and avoided


async def test_child_of_a_dead_parent_exits_before_exec() -> None:
    """A parent that died between the fork and the prctl: the child must not run on.

    Such a child has been re-parented already, so its parent pid is no longer the one the
    preexec function recorded. Simulated: the recorder forks a child (parent matches:
    carries on), which forks a grandchild running the same function (parent differs).
    """
    code = (
        "import os\n"
        "from trionats._server import _pdeathsig_preexec\n"
        "arm = _pdeathsig_preexec()\n"
        "assert arm is not None\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    arm()  # parent is the recorder: returns\n"
        "    grandchild = os.fork()\n"
        "    if grandchild == 0:\n"
        "        arm()  # parent is not the recorder: exits 70 at once\n"
        "        os._exit(0)\n"
        "    _, status = os.waitpid(grandchild, 0)\n"
        "    os._exit(os.waitstatus_to_exitcode(status))\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status))\n"
    )
    done = await trio.run_process(
        [sys.executable, "-c", code], capture_stdout=True, capture_stderr=True, check=False
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().split() == ["70"]
