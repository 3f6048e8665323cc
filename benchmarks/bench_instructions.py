"""CPU instructions per operation, counted by valgrind: steadier than time on a busy machine.

Each workload runs twice in a child under ``valgrind --tool=cachegrind`` (with 0
operations, then with ``--ops``), against an embedded nats-server on 127.0.0.1; the
difference divided by the operations is the cost of one operation, start-up excluded.
100 tasks share one connection, as in ``trionats bench --scenario pool_shared``::

    python benchmarks/bench_instructions.py [--ops 20000] [--workload NAME ...]

Workloads: ``raw_publish`` (nats-py on asyncio, the reference), ``publish``,
``borrow`` (a shared borrow + return, nothing in the block), ``borrow_publish`` (the
pool_shared scenario), ``empty_cm`` (a do-nothing ``async with``: the floor of any
borrow), ``cancel_check`` (``trio.lowlevel.checkpoint_if_cancelled``). Needs valgrind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import trio

from trionats import open_connection
from trionats._config import PoolConfig
from trionats._pool import open_pool
from trionats._server import open_nats_server

TASKS = 100
PAYLOAD = b"y" * 128
WORKLOADS = ("raw_publish", "publish", "borrow", "borrow_publish", "empty_cm", "cancel_check")


class _Done:
    def __await__(self) -> Generator[None, None, None]:
        return
        yield  # pragma: no cover


_DONE = _Done()


class _EmptyCM:
    __slots__ = ()

    async def __aenter__(self) -> _EmptyCM:
        return self

    def __aexit__(self, *exc: object) -> _Done:
        return _DONE


async def _trionats_child(workload: str, url: str, ops: int) -> None:
    per_task = ops // TASKS
    async with open_pool(PoolConfig(servers=[url])) as pool, open_connection(url) as nc:
        async with pool.borrow(shared=True):  # keeps the shared connection in service

            async def borrow_publish() -> None:
                for _ in range(per_task):
                    async with pool.borrow(timeout=10, shared=True) as conn:
                        await conn.publish("bench.instr", PAYLOAD)

            async def borrow() -> None:
                for _ in range(per_task):
                    async with pool.borrow(timeout=10, shared=True):
                        pass

            async def publish() -> None:
                for _ in range(per_task):
                    await nc.publish("bench.instr", PAYLOAD)

            async def empty_cm() -> None:
                for _ in range(per_task):
                    async with _EmptyCM():
                        pass

            async def cancel_check() -> None:
                for _ in range(per_task):
                    await trio.lowlevel.checkpoint_if_cancelled()

            bodies: dict[str, Callable[[], Awaitable[None]]] = {
                "borrow_publish": borrow_publish,
                "borrow": borrow,
                "publish": publish,
                "empty_cm": empty_cm,
                "cancel_check": cancel_check,
            }
            async with trio.open_nursery() as nursery:
                for _ in range(TASKS):
                    nursery.start_soon(bodies[workload])
        await nc.flush()


async def _raw_child(url: str, ops: int) -> None:
    import nats

    nc = await nats.connect(url)
    per_task = ops // TASKS

    async def worker() -> None:
        for _ in range(per_task):
            await nc.publish("bench.instr", PAYLOAD)

    await asyncio.gather(*(worker() for _ in range(TASKS)))
    await nc.flush()
    await nc.close()


def _count(workload: str, url: str, ops: int) -> int:
    command = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        workload,
        str(ops),
    ]
    done = subprocess.run(
        command,
        env={**os.environ, "BENCH_URL": url},
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{workload} failed:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


async def main(ops: int, workloads: list[str]) -> None:
    async with open_nats_server() as server:
        for workload in workloads:
            base = await trio.to_thread.run_sync(_count, workload, server.url, 0)
            total = await trio.to_thread.run_sync(_count, workload, server.url, ops)
            print(f"{workload:15} {(total - base) / ops:10,.0f} instructions per operation")


def _child(workload: str, ops: int) -> None:
    url = os.environ["BENCH_URL"]
    if workload == "raw_publish":
        asyncio.run(_raw_child(url, ops))
    else:
        runner: Any = _trionats_child
        trio.run(runner, workload, url, ops)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2], int(sys.argv[3]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=20000)
    parser.add_argument("--workload", action="append", choices=WORKLOADS)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt install valgrind)")
    trio.run(main, args.ops, args.workload or list(WORKLOADS))
