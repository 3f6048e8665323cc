"""Subscriber benchmark: handler overhead per message, and throughput per max_workers.

Run: ``python benchmarks/bench_subscriber.py [--quick]``. Starts its own nats-server on
127.0.0.1; the publisher is a second connection in the same process, so both sides share
the CPU (as in the README's benchmarks). Each figure is the median of 3 runs.

1. overhead: N messages through a no-op handler (``open_subscriber``, max_workers=64)
   against a bare ``async for msg in sub`` loop and a ``receive_batch`` loop on the same
   connection; the difference / N is the subscriber's cost per message.
2. throughput: handlers that ``await trio.sleep(0.001)``, max_workers 1 / 8 / 64; the ideal
   is max_workers x 1000 msg/s until the CPU saturates.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable

import trio

import trionats
from trionats._subscriber import SubscriberConfig, open_subscriber

PAYLOAD = b"x" * 128


async def _publish(pub: trionats.Connection, subject: str, n: int) -> None:
    for _ in range(n):
        await pub.publish(subject, PAYLOAD)
    await pub.flush()


async def _timed(
    url: str, n: int, consume: Callable[[trionats.Connection, trio.Event], Awaitable[None]]
) -> float:
    """Seconds from the first publish until ``consume`` has seen ``n`` messages."""
    async with trionats.open_connection(url) as nc, trionats.open_connection(url) as pub:
        ready = trio.Event()
        done = trio.Event()
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                await consume(nc, ready)
                done.set()

            nursery.start_soon(run)
            await ready.wait()
            start = time.perf_counter()
            await _publish(pub, "bench", n)
            await done.wait()
            return time.perf_counter() - start


def _bare_loop(n: int) -> Callable[[trionats.Connection, trio.Event], Awaitable[None]]:
    async def consume(nc: trionats.Connection, ready: trio.Event) -> None:
        async with nc.subscribe("bench", max_pending_msgs=n + 1) as sub:
            ready.set()
            seen = 0
            async for _msg in sub:
                seen += 1
                if seen == n:
                    return

    return consume


def _batch_loop(n: int) -> Callable[[trionats.Connection, trio.Event], Awaitable[None]]:
    async def consume(nc: trionats.Connection, ready: trio.Event) -> None:
        async with nc.subscribe("bench", max_pending_msgs=n + 1) as sub:
            ready.set()
            seen = 0
            while seen < n:
                seen += len(await sub.receive_batch())

    return consume


def _subscriber(
    n: int, max_workers: int, handler: Callable[[trionats.Msg], Awaitable[None]]
) -> Callable[[trionats.Connection, trio.Event], Awaitable[None]]:
    async def consume(nc: trionats.Connection, ready: trio.Event) -> None:
        finished = trio.Event()
        count = 0

        async def counting(msg: trionats.Msg) -> None:
            nonlocal count
            await handler(msg)
            count += 1
            if count == n:
                finished.set()

        config = SubscriberConfig(max_workers=max_workers, pending_msgs=n + 1)
        async with open_subscriber(nc, config) as subscriber:
            handle = await subscriber.start("bench", counting)
            ready.set()
            await finished.wait()
            stats = handle.stats()
            assert stats.dropped == 0, stats

    return consume


async def _noop(msg: trionats.Msg) -> None:
    pass


async def _sleep_1ms(msg: trionats.Msg) -> None:
    await trio.sleep(0.001)


async def _median(url: str, n: int, make: Callable[[], Callable[..., Awaitable[None]]]) -> float:
    return statistics.median([await _timed(url, n, make()) for _ in range(3)])


async def main(quick: bool) -> None:
    n = 20_000 if quick else 100_000
    async with trionats.open_nats_server() as server:
        url = server.url
        print(f"overhead, {n} messages of {len(PAYLOAD)} B (median of 3):")
        bare = await _median(url, n, lambda: _bare_loop(n))
        batch = await _median(url, n, lambda: _batch_loop(n))
        rows = [("async for msg in sub", bare), ("receive_batch loop", batch)]
        for mw in (1, 64):
            t = await _median(url, n, lambda mw=mw: _subscriber(n, mw, _noop))
            rows.append((f"subscriber no-op, max_workers={mw}", t))
        for label, t in rows:
            extra = f"{(t - bare) / n * 1e6:+7.2f} µs/msg vs bare" if t is not bare else ""
            print(f"  {label:38s} {n / t:>10,.0f} msg/s  {extra}")

        print("throughput, handler sleeps 1 ms (median of 3):")
        for mw in (1, 8, 64):
            m = max(300, min(mw * 1000, 20_000)) if not quick else max(200, mw * 100)
            t = await _median(url, m, lambda mw=mw, m=m: _subscriber(m, mw, _sleep_1ms))
            print(
                f"  max_workers={mw:<3d} {m:>6d} msgs  {m / t:>9,.0f} msg/s  "
                f"(ideal {mw * 1000:,} msg/s, {m / t / (mw * 1000):.0%})"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages")
    trio.run(main, parser.parse_args().quick)
