"""200 tasks share a pool of at most 8 connections; borrowers wait in FIFO order.

Run ``trionats server --port 4222`` first (or set ``NATS_URL``), then
``python examples/pool_concurrency.py``.
"""

import os

import trio

import trionats

NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")


async def main() -> None:
    config = trionats.PoolConfig(servers=[NATS_URL], idle_per_server=8, max_per_server=8)
    published = timed_out = 0
    async with trionats.open_pool(config) as pool:

        async def worker(i: int, patience: float) -> None:
            nonlocal published, timed_out
            try:
                async with pool.borrow(timeout=patience) as nc:
                    await nc.publish("work.done", b"%d" % i)
                    await trio.sleep(0.005)  # hold the connection a little: others queue
                    published += 1
            except trionats.PoolTimeoutError:  # also a builtin TimeoutError
                timed_out += 1

        async with trio.open_nursery() as nursery:
            for i in range(200):
                # A few impatient borrowers give up: 8 connections serve 200 tasks in turn.
                nursery.start_soon(worker, i, 0.001 if i % 50 == 49 else 10.0)

        stats = pool.stats()
        print(
            f"published {published}, borrow timeouts {timed_out}; "
            f"{stats.created} connections created, {stats.reused} borrows reused one "
            f"(reuse rate {stats.reuse_rate:.0%}), {stats.waits} borrows queued"
        )
        assert published + timed_out == 200
        assert stats.created <= 8


if __name__ == "__main__":
    trio.run(main)
