"""trionats vs raw nats-py (plain asyncio) on the same server, in one run.

Workloads (same payloads on both sides, warm-up excluded, repetitions interleaved,
median and spread shown):

* publish: N messages of SIZE bytes in a loop, then flush;
* pubsub: publish -> subscriber delivery on a second connection (time until the
  subscriber has all N);
* request: 100 concurrent requesters, N requests in all, responder in the same process
  (an asyncio callback responder for raw nats-py, a Trio ``async for`` responder for
  trionats).

Raw nats-py runs in a child process: importing trio_asyncio changes asyncio's loop policy
for the whole process, which would slow the raw side down (see BRIDGE_FINDINGS.md).

Usage: python benchmarks/bench_bridge.py [--count N] [--reps R] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

SIZE = 128
CONCURRENCY = 100


# ---------------------------------------------------------------- raw nats-py (child) --
def raw_main(url: str, workload: str, count: int) -> dict[str, Any]:
    import asyncio

    import nats

    payload = b"x" * SIZE

    async def publish() -> dict[str, Any]:
        nc = await nats.connect(url)
        for _ in range(1000):  # warm-up
            await nc.publish("bench.warm", payload)
        await nc.flush()
        t0 = time.perf_counter()
        for _ in range(count):
            await nc.publish("bench.pub", payload)
        await nc.flush()
        dt = time.perf_counter() - t0
        await nc.close()
        return {"rate": count / dt}

    async def pubsub() -> dict[str, Any]:
        pub = await nats.connect(url)
        subc = await nats.connect(url, pending_size=64 * 1024 * 1024)
        done = asyncio.Event()
        warm = asyncio.Event()
        received = 0
        target = count + 1000

        async def cb(msg: Any) -> None:
            nonlocal received
            received += 1
            if received == 1000:
                warm.set()
            if received == target:
                done.set()

        await subc.subscribe(
            "bench.ps", cb=cb, pending_msgs_limit=10 * target, pending_bytes_limit=1 << 30
        )
        await subc.flush()
        for _ in range(1000):  # warm-up
            await pub.publish("bench.ps", payload)
        await pub.flush()
        await warm.wait()
        t0 = time.perf_counter()
        for _ in range(count):
            await pub.publish("bench.ps", payload)
        await pub.flush()
        await asyncio.wait_for(done.wait(), 120)
        dt = time.perf_counter() - t0
        await pub.close()
        await subc.close()
        return {"rate": count / dt}

    async def request() -> dict[str, Any]:
        responder = await nats.connect(url)
        nc = await nats.connect(url)

        async def respond(msg: Any) -> None:
            await msg.respond(msg.data)

        await responder.subscribe("bench.req", cb=respond)
        await responder.flush()
        for _ in range(200):  # warm-up
            await nc.request("bench.req", payload, timeout=5)
        latencies: list[float] = []
        per_task = count // CONCURRENCY

        async def requester() -> None:
            for _ in range(per_task):
                t = time.perf_counter()
                await nc.request("bench.req", payload, timeout=10)
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(requester() for _ in range(CONCURRENCY)))
        dt = time.perf_counter() - t0
        await nc.close()
        await responder.close()
        return _latency_figures(len(latencies) / dt, latencies)

    return asyncio.run({"publish": publish, "pubsub": pubsub, "request": request}[workload]())


def _latency_figures(rate: float, latencies: list[float]) -> dict[str, Any]:
    latencies.sort()
    return {
        "rate": rate,
        "mean_ms": 1000 * statistics.fmean(latencies),
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
    }


# ----------------------------------------------------------------------- trionats --
async def trionats_run(url: str, workload: str, count: int) -> dict[str, Any]:
    import trio

    import trionats

    payload = b"x" * SIZE

    if workload == "publish":
        async with trionats.open_connection(url) as nc:
            for _ in range(1000):
                await nc.publish("bench.warm", payload)
            await nc.flush()
            t0 = time.perf_counter()
            for _ in range(count):
                await nc.publish("bench.pub", payload)
            await nc.flush()
            return {"rate": count / (time.perf_counter() - t0)}

    if workload == "pubsub":
        async with (
            trionats.open_connection(url) as pub,
            trionats.open_connection(url, pending_size=64 * 1024 * 1024) as subc,
            subc.subscribe("bench.ps", max_pending_msgs=10 * count) as sub,
        ):
            target = count + 1000
            done = trio.Event()
            warm = trio.Event()

            async def consume() -> None:
                received = 0
                async for _msg in sub:
                    received += 1
                    if received == 1000:
                        warm.set()
                    if received == target:
                        done.set()
                        return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                for _ in range(1000):
                    await pub.publish("bench.ps", payload)
                await pub.flush()
                await warm.wait()
                t0 = time.perf_counter()
                for _ in range(count):
                    await pub.publish("bench.ps", payload)
                await pub.flush()
                with trio.fail_after(120):
                    await done.wait()
                dt = time.perf_counter() - t0
            return {"rate": count / dt, "dropped": sub.dropped}

    assert workload == "request"
    async with (
        trionats.open_connection(url) as responder,
        trionats.open_connection(url) as nc,
        responder.subscribe("bench.req") as sub,
        trio.open_nursery() as nursery,
    ):

        async def respond() -> None:
            async for msg in sub:
                await msg.respond(msg.data)

        nursery.start_soon(respond)
        for _ in range(200):
            await nc.request("bench.req", payload, timeout=5)
        latencies: list[float] = []
        per_task = count // CONCURRENCY

        async def requester() -> None:
            for _ in range(per_task):
                t = time.perf_counter()
                await nc.request("bench.req", payload, timeout=10)
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        async with trio.open_nursery() as inner:
            for _ in range(CONCURRENCY):
                inner.start_soon(requester)
        dt = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
        return _latency_figures(len(latencies) / dt, latencies)


# ------------------------------------------------------------------------- driver --
def run_raw_child(url: str, workload: str, count: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", url, workload, str(count)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workload", action="append", choices=["publish", "pubsub", "request"])
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, workload, count = args.child
        print(json.dumps(raw_main(url, workload, int(count))))
        return

    import trio

    import trionats

    workloads = args.workload or ["publish", "pubsub", "request"]
    counts = {"publish": 2 * args.count, "pubsub": args.count, "request": args.count // 5}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        w: {"trionats": [], "raw": []} for w in workloads
    }

    async def run_all() -> None:
        async with trionats.open_nats_server() as server:
            for rep in range(args.reps):
                for w in workloads:
                    raw = await trio.to_thread.run_sync(run_raw_child, server.url, w, counts[w])
                    ours = await trionats_run(server.url, w, counts[w])
                    results[w]["raw"].append(raw)
                    results[w]["trionats"].append(ours)
                    print(
                        f"rep {rep + 1} {w:8s} raw {raw['rate']:10.0f}/s  "
                        f"trionats {ours['rate']:10.0f}/s  x{ours['rate'] / raw['rate']:.2f}",
                        file=sys.stderr,
                    )

    trio.run(run_all)
    summary: dict[str, Any] = {}
    print(f"\n{'workload':10s} {'raw nats-py':>14s} {'trionats':>14s} {'ratio':>7s}  spread")
    for w in workloads:
        raw_rates = [r["rate"] for r in results[w]["raw"]]
        our_rates = [r["rate"] for r in results[w]["trionats"]]
        ratios = [o / r for o, r in zip(our_rates, raw_rates, strict=True)]
        med_raw, med_ours = statistics.median(raw_rates), statistics.median(our_rates)
        line = (
            f"{w:10s} {med_raw:12.0f}/s {med_ours:12.0f}/s {med_ours / med_raw:6.2f}x  "
            f"ratios {min(ratios):.2f}..{max(ratios):.2f}"
        )
        if w == "request":
            for side in ("raw", "trionats"):
                p99 = statistics.median(r["p99_ms"] for r in results[w][side])
                mean = statistics.median(r["mean_ms"] for r in results[w][side])
                line += f"  {side}: mean {mean:.2f} ms p99 {p99:.2f} ms"
        print(line)
        summary[w] = {"raw": results[w]["raw"], "trionats": results[w]["trionats"]}
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
