"""Pool benchmark: borrow+return cost on an idle hit, reuse under 100 borrowers, and the
same with shared leases (``borrow(shared=True)``).

Runs against an embedded nats-server on 127.0.0.1::

    python benchmarks/bench_pool.py [--ops 50000] [--borrowers 100] [--rounds 50]

Targets: < 20 µs per borrow+return on an idle hit; reuse rate >= 90 %.
"""

from __future__ import annotations

import argparse
import time

import trio

from trionats._config import PoolConfig
from trionats._pool import open_pool
from trionats._server import open_nats_server


async def main(ops: int, borrowers: int, rounds: int) -> None:
    async with open_nats_server() as server:
        # 1. idle hit: one task, borrow + return, nothing else
        config = PoolConfig(servers=[server.url], idle_per_server=32)
        async with open_pool(config) as pool:
            async with pool.borrow():
                pass
            for _ in range(1000):  # warm-up
                async with pool.borrow():
                    pass
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(ops):
                    async with pool.borrow():
                        pass
                best = min(best, (time.perf_counter() - start) / ops)
            stats = pool.stats()
            print(f"idle hit borrow+return: {best * 1e6:.2f} µs/op (best of 5 x {ops} ops)")
            print(f"  created={stats.created} reused={stats.reused}")

            # for scale: a bare trio.Lock acquire/release and a checkpoint
            lock = trio.Lock()
            start = time.perf_counter()
            for _ in range(ops):
                async with lock:
                    pass
            lock_us = (time.perf_counter() - start) / ops * 1e6
            print(f"  (trio.Lock acquire+release for scale: {lock_us:.2f} µs/op)")

        # 2. 100 concurrent borrowers, each publishing in a loop
        config = PoolConfig(servers=[server.url], idle_per_server=32)
        async with open_pool(config) as pool:

            async def borrower() -> None:
                for _ in range(rounds):
                    async with pool.borrow(timeout=10) as nc:
                        await nc.publish("bench.pool", b"x" * 16)
                        await trio.lowlevel.checkpoint()

            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(borrowers):
                    nursery.start_soon(borrower)
            elapsed = time.perf_counter() - start
            s = pool.stats()
            total = borrowers * rounds
            print(
                f"{borrowers} concurrent borrowers x {rounds}: reuse_rate={s.reuse_rate:.1%} "
                f"created={s.created} reused={s.reused} idle={s.idle} "
                f"closed(overflow)={s.closed.overflow} "
                f"{total / elapsed:,.0f} borrow+publish/s"
            )

        # 3. the same with shared leases: every borrower multiplexed onto one connection
        async with open_pool(PoolConfig(servers=[server.url])) as pool:

            async def shared_borrower() -> None:
                for _ in range(rounds):
                    async with pool.borrow(timeout=10, shared=True) as nc:
                        await nc.publish("bench.pool", b"x" * 16)
                        await trio.lowlevel.checkpoint()

            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(borrowers):
                    nursery.start_soon(shared_borrower)
            elapsed = time.perf_counter() - start
            s = pool.stats()
            print(
                f"{borrowers} concurrent shared borrowers x {rounds}: created={s.created} "
                f"shared_borrows={s.shared_borrows} {total / elapsed:,.0f} borrow+publish/s"
            )

            # 4. shared borrow+return cost on the hot path (another shared lease open)
            async with pool.borrow(shared=True):
                best = float("inf")
                for _ in range(5):
                    start = time.perf_counter()
                    for _ in range(ops):
                        async with pool.borrow(shared=True):
                            pass
                    best = min(best, (time.perf_counter() - start) / ops)
            print(f"shared borrow+return (hot path): {best * 1e6:.2f} µs/op (best of 5)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=50_000)
    parser.add_argument("--borrowers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    trio.run(main, args.ops, args.borrowers, args.rounds)
