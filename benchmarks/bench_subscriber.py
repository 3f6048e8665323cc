"""Subscriber benchmark: handler overhead per message, and throughput per max_workers.

Run: ``python benchmarks/bench_subscriber.py [--quick] [--reps N]``. Starts its own
nats-server on 127.0.0.1. Every figure is the median of ``--reps`` runs (5 by default), the
runs of all the variants interleaved so that a noisy neighbour hits them alike; the spread
(min..max) is shown next to it. Each run reports wall-clock time and the process's CPU time
(``time.process_time``): on a busy machine the CPU time per message is the steadier figure.

1. overhead, end to end: N messages published by a second connection in the same process
   (both sides share the CPU, as in ``trionats bench``), consumed by a bare
   ``async for msg in sub`` loop, a ``receive_batch`` loop, and ``open_subscriber`` with a
   no-op handler at max_workers 1 and 64, with the handler-duration histogram on (the
   default) and off. ``(t_subscriber - t_async_for) / N`` is the subscriber's cost per
   message; the target for max_workers=1 is at most 1 µs.
2. overhead, consumer only: the same consumers fed straight into the subscription's buffer
   (64 messages per scheduler tick, no network, no publisher): what is left is the
   consumer's own cost per message.
3. throughput: handlers that ``await trio.sleep(0.001)``, max_workers 1 / 8 / 64; the ideal
   is max_workers x 1000 msg/s until the CPU saturates.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable

import trio

import trionats
from trionats._msg import Msg
from trionats._subscriber import SubscriberConfig, open_subscriber
from trionats._subscription import Subscription

PAYLOAD = b"x" * 128
CHUNK = 64
"""Messages the consumer-only runs put in the buffer per scheduler tick."""

# A consumer: given the connection, a "ready" event to set once it listens, and (for the
# consumer-only runs) a slot to hand its subscription back in; returns once it has seen
# all the messages.
Consume = Callable[[trionats.Connection, trio.Event, list[Subscription]], Awaitable[None]]


async def _publish(pub: trionats.Connection, subject: str, n: int) -> None:
    for _ in range(n):
        await pub.publish(subject, PAYLOAD)
    await pub.flush()


async def _feed(nc: trionats.Connection, sub: Subscription, n: int) -> None:
    """Put ``n`` messages in ``sub``'s buffer, ``CHUNK`` per scheduler tick."""
    msgs = [Msg(nc, "bench", "", PAYLOAD, None) for _ in range(CHUNK)]
    sent = 0
    while sent < n:
        k = min(CHUNK, n - sent)
        for i in range(k):
            sub.put_nowait(msgs[i])
        sent += k
        await trio.lowlevel.checkpoint()


async def _timed(url: str, n: int, consume: Consume, direct: bool) -> tuple[float, float]:
    """(wall, CPU) seconds from the first message until ``consume`` has seen ``n``.

    ``direct``: feed the subscription's buffer instead of publishing over the network.
    """
    async with trionats.open_connection(url) as nc, trionats.open_connection(url) as pub:
        ready = trio.Event()
        done = trio.Event()
        subs: list[Subscription] = []
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                await consume(nc, ready, subs)
                done.set()

            nursery.start_soon(run)
            await ready.wait()
            wall, cpu = time.perf_counter(), time.process_time()
            if direct:
                await _feed(nc, subs[0], n)
            else:
                await _publish(pub, "bench", n)
            await done.wait()
            return time.perf_counter() - wall, time.process_time() - cpu


def _bare_loop(n: int) -> Consume:
    async def consume(nc: trionats.Connection, ready: trio.Event, subs: list[Subscription]) -> None:
        async with nc.subscribe("bench", max_pending_msgs=n + 1) as sub:
            subs.append(sub)
            ready.set()
            seen = 0
            async for _msg in sub:
                seen += 1
                if seen == n:
                    return

    return consume


def _batch_loop(n: int) -> Consume:
    async def consume(nc: trionats.Connection, ready: trio.Event, subs: list[Subscription]) -> None:
        async with nc.subscribe("bench", max_pending_msgs=n + 1) as sub:
            subs.append(sub)
            ready.set()
            seen = 0
            while seen < n:
                seen += len(await sub.receive_batch())

    return consume


def _subscriber(
    n: int,
    max_workers: int,
    handler: Callable[[trionats.Msg], Awaitable[None]],
    metrics: bool = True,
) -> Consume:
    async def consume(nc: trionats.Connection, ready: trio.Event, subs: list[Subscription]) -> None:
        finished = trio.Event()
        count = 0

        async def counting(msg: trionats.Msg) -> None:
            nonlocal count
            await handler(msg)
            count += 1
            if count == n:
                finished.set()

        config = SubscriberConfig(max_workers=max_workers, pending_msgs=n + 1, metrics=metrics)
        async with open_subscriber(nc, config) as subscriber:
            handle = await subscriber.start("bench", counting)
            assert handle._sub is not None
            subs.append(handle._sub)
            ready.set()
            await finished.wait()
            stats = handle.stats()
            assert stats.dropped == 0, stats
            assert stats.handler_duration.count == (n if metrics else 0), stats

    return consume


async def _noop(msg: trionats.Msg) -> None:
    pass


async def _sleep_1ms(msg: trionats.Msg) -> None:
    await trio.sleep(0.001)


def _fmt_spread(values: list[float]) -> str:
    return f"[{min(values):.2f}..{max(values):.2f}]"


async def _overhead(url: str, n: int, reps: int, direct: bool) -> None:
    variants: list[tuple[str, Callable[[], Consume]]] = [
        ("async for msg in sub", lambda: _bare_loop(n)),
        ("receive_batch loop", lambda: _batch_loop(n)),
    ]
    for mw in (1, 64):
        for metrics in (True, False):
            label = f"subscriber no-op, max_workers={mw:<2d} metrics={'on' if metrics else 'off'}"
            variants.append(
                (label, lambda mw=mw, metrics=metrics: _subscriber(n, mw, _noop, metrics))
            )
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in variants}
    await _timed(url, n // 10, _bare_loop(n // 10), direct)  # warm-up
    for _ in range(reps):
        for label, make in variants:
            runs[label].append(await _timed(url, n, make(), direct))
    bare_wall = statistics.median(w for w, _ in runs["async for msg in sub"])
    bare_cpu = statistics.median(c for _, c in runs["async for msg in sub"])
    header = f"{'msg/s':>9s}  {'wall µs/msg':>20s}  {'CPU µs/msg':>20s}  vs bare (wall / CPU)"
    print(f"  {'':48s} {header}")
    for label, values in runs.items():
        wall = [w / n * 1e6 for w, _ in values]
        cpu = [c / n * 1e6 for _, c in values]
        mw, mc = statistics.median(wall), statistics.median(cpu)
        extra = ""
        if label != "async for msg in sub":
            extra = f"{mw - bare_wall / n * 1e6:+6.2f} / {mc - bare_cpu / n * 1e6:+6.2f} µs/msg"
        print(
            f"  {label:48s} {1e6 / mw:>9,.0f}  {mw:6.2f} {_fmt_spread(wall):>13s}  "
            f"{mc:6.2f} {_fmt_spread(cpu):>13s}  {extra}"
        )


async def main(quick: bool, reps: int) -> None:
    n = 20_000 if quick else 100_000
    async with trionats.open_nats_server() as server:
        url = server.url
        print(f"overhead, end to end, {n} messages of {len(PAYLOAD)} B (median of {reps}):")
        await _overhead(url, n, reps, direct=False)
        print(f"overhead, consumer only (fed {CHUNK} per tick, no network; median of {reps}):")
        await _overhead(url, n, reps, direct=True)

        print(f"throughput, handler sleeps 1 ms (median of {reps}):")
        for mw in (1, 8, 64):
            m = max(300, min(mw * 1000, 20_000)) if not quick else max(200, mw * 100)
            times = [
                (await _timed(url, m, _subscriber(m, mw, _sleep_1ms), direct=False))[0]
                for _ in range(reps)
            ]
            t = statistics.median(times)
            print(
                f"  max_workers={mw:<3d} {m:>6d} msgs  {m / t:>9,.0f} msg/s  "
                f"(ideal {mw * 1000:,} msg/s, {m / t / (mw * 1000):.0%})"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages")
    parser.add_argument("--reps", type=int, default=5, help="runs per figure (the median)")
    args = parser.parse_args()
    trio.run(main, args.quick, args.reps)
