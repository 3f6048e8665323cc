"""Single-operation latency: trionats against raw nats-py, and where the time goes.

Run: ``python benchmarks/bench_latency.py [--reps 7] [--count 2000] [--profile]``.
Starts its own nats-server on 127.0.0.1 (or ``--url``).

1. latency (default): the ``latency_request`` (one requester, sequential requests),
   ``latency_pubsub`` (publish, flush, wait for the subscriber before the next) and the
   100-concurrent ``request`` scenarios of ``trionats bench``, raw nats-py (a child
   process, plain asyncio) and trionats interleaved, repetition by repetition. Prints per
   figure the median over the repetitions and the spread (min..max), and the median of the
   per-repetition ratios trionats / raw (lower is better for latency).
2. ``--profile``: trionats only, in this process. Counts per round trip the Trio task steps
   (per task), the bridge loop's asyncio callbacks (per callback) and the main-loop
   iterations: the hops a round trip pays.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from typing import Any

import trio

from trionats import open_nats_server
from trionats._bench import BenchConfig, run_bench

FIGURES = ("p50_ms", "p99_ms", "mean_ms")


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}..{max(values):.3f})"


async def latency(url: str, scenarios: list[str], count: int, reps: int) -> None:
    config = BenchConfig(count=count * 20, reps=reps, concurrency=100)
    report = await run_bench(url, scenarios, config)
    for scenario in scenarios:
        runs = report["results"][scenario]
        print(f"{scenario} ({report['counts'][scenario]} ops x {reps} reps)")
        for figure in FIGURES:
            raw = [run[figure] for run in runs["raw"]]
            ours = [run[figure] for run in runs["trionats"]]
            ratios = [o / r for o, r in zip(ours, raw, strict=True)]
            print(
                f"  {figure:8} raw {_fmt(raw)}  trionats {_fmt(ours)}  "
                f"ratio {statistics.median(ratios):.2f} ({min(ratios):.2f}..{max(ratios):.2f})"
            )


class _Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps: collections.Counter[str] = collections.Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name.rsplit(".", 1)[-1]] += 1


async def profile(url: str, count: int) -> None:
    """Hops per round trip: Trio task steps and asyncio callbacks."""
    import asyncio.events

    from trionats import _bridge, open_connection

    callbacks: collections.Counter[str] = collections.Counter()
    original_run = asyncio.events.Handle._run

    def counting_run(self: Any) -> None:
        callback = getattr(self, "_callback", None)
        name = getattr(callback, "__qualname__", None) or type(callback).__name__
        callbacks[name] += 1
        original_run(self)

    loop_iterations = 0

    steps = _Steps()
    async with (
        open_connection(url) as responder,
        open_connection(url) as nc,
        responder.subscribe("bench.prof.req") as req_sub,
        responder.subscribe("bench.prof.ps") as ps_sub,
        trio.open_nursery() as nursery,
    ):

        async def respond() -> None:
            async for msg in req_sub:
                await msg.respond(msg.data)

        nursery.start_soon(respond)
        for _ in range(200):
            await nc.request("bench.prof.req", b"x", timeout=5)

        async def measure(what: str, once: Any) -> None:
            nonlocal loop_iterations
            for _ in range(100):
                await once()
            callbacks.clear()
            steps.steps.clear()
            loop_iterations = 0
            asyncio.events.Handle._run = counting_run  # type: ignore[method-assign]
            loop = _bridge.current_loop()
            original_one = loop._main_loop_one

            async def counting_one(no_wait: bool = False) -> None:
                nonlocal loop_iterations
                loop_iterations += 1
                await original_one(no_wait)

            loop._main_loop_one = counting_one
            trio.lowlevel.add_instrument(steps)
            t0 = time.perf_counter()
            try:
                for _ in range(count):
                    await once()
            finally:
                dt = time.perf_counter() - t0
                trio.lowlevel.remove_instrument(steps)
                asyncio.events.Handle._run = original_run  # type: ignore[method-assign]
                loop._main_loop_one = original_one
            print(f"{what}: {1e3 * dt / count:.3f} ms per round trip (instrumented)")
            print(f"  trio task steps: {sum(steps.steps.values()) / count:.2f}")
            for name, n in steps.steps.most_common():
                print(f"    {n / count:6.2f}  {name}")
            print(f"  bridge loop iterations: {loop_iterations / count:.2f}")
            print(f"  asyncio callbacks: {sum(callbacks.values()) / count:.2f}")
            for name, n in callbacks.most_common():
                print(f"    {n / count:6.2f}  {name}")

        async def request_once() -> None:
            await nc.request("bench.prof.req", b"x", timeout=5)

        async def pubsub_once() -> None:
            await nc.publish("bench.prof.ps", b"x")
            await nc.flush()
            await ps_sub.next_msg()

        await measure("request", request_once)
        await measure("publish -> flush -> delivered", pubsub_once)
        nursery.cancel_scope.cancel()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="use this server (default: an embedded one)")
    parser.add_argument("--count", type=int, default=2000, help="operations per run")
    parser.add_argument("--reps", type=int, default=7, help="repetitions (default: 7)")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=["latency_request", "latency_pubsub", "request"],
        help="repeat to pick several (default: all three)",
    )
    parser.add_argument("--profile", action="store_true", help="count hops per round trip")
    args = parser.parse_args()
    scenarios = args.scenario or ["latency_request", "latency_pubsub", "request"]
    async with open_nats_server() as server:
        url = args.url or server.url
        if args.profile:
            await profile(url, args.count)
        else:
            await latency(url, scenarios, args.count, args.reps)


if __name__ == "__main__":
    trio.run(main)
