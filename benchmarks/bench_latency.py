"""Single-operation latency: trionats against raw nats-py, finely interleaved.

Run: ``python benchmarks/bench_latency.py [--rounds 20] [--block 250] [--against DIR]``.
Starts its own nats-server on 127.0.0.1 (or ``--url``).

On a shared machine the load changes from one second to the next, and a latency figure
measured a minute apart from its comparison point says more about the load than about
the code. So each side runs in its own long-lived child process (connections open,
warmed up) and they take turns: ``--block`` operations each, round after round. Every
figure is then taken over the same stretches of time:

* ``latency_request``: one requester, sequential requests (a responder on a second
  connection in the same process);
* ``latency_pubsub``: publish, flush, wait for the subscriber (a second connection)
  before the next;
* ``request100``: 100 concurrent requesters (each block: 100 x block/100 requests).

Sides: ``raw`` (nats-py on plain asyncio), ``trionats`` (this source tree) and, for each
``--against DIR``, trionats from that source tree (e.g. an older commit extracted with
``git archive``), named after the directory. Prints, per side, p10/p50/p99/mean over all
samples (on a loaded machine p10 shows the cost of an undisturbed round trip), the
process CPU time per operation (both connections and the responder: what the hops
cost) and the per-round ratio to raw (median, min..max over rounds).

``--profile``: trionats only, in this process: counts per round trip the Trio task steps
(per task), the bridge loop's asyncio callbacks (per callback) and the main-loop
iterations: the hops a round trip pays.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import trio

SCENARIOS = ("latency_request", "latency_pubsub", "request100")
WARMUP = 300


# ------------------------------------------------------------------ children --
def _child_raw(scenario: str, url: str, size: int) -> None:
    import asyncio

    import nats

    payload = b"x" * size

    async def main() -> None:
        first = await nats.connect(url)
        nc = await nats.connect(url)
        got = asyncio.Event()

        async def respond(msg: Any) -> None:
            await msg.respond(msg.data)

        async def on_msg(msg: Any) -> None:
            got.set()

        if scenario == "latency_pubsub":
            await first.subscribe("lat.ps", cb=on_msg)
            await first.flush()
            while not got.is_set():
                await nc.publish("lat.ps", payload)
                await nc.flush()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(got.wait(), 0.05)
            await asyncio.sleep(0.1)
        else:
            await first.subscribe("lat.req", cb=respond)
            await first.flush()
            while True:
                try:
                    await nc.request("lat.req", payload, timeout=0.5)
                    break
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    await asyncio.sleep(0.01)

        perf = time.perf_counter

        async def one_request(out: list[float]) -> None:
            t = perf()
            await nc.request("lat.req", payload, timeout=10)
            out.append(perf() - t)

        async def block(n: int) -> list[float]:
            out: list[float] = []
            if scenario == "latency_request":
                for _ in range(n):
                    await one_request(out)
            elif scenario == "request100":

                async def worker() -> None:
                    for _ in range(max(1, n // 100)):
                        await one_request(out)

                await asyncio.gather(*(worker() for _ in range(100)))
            else:
                for _ in range(n):
                    got.clear()
                    t = perf()
                    await nc.publish("lat.ps", payload)
                    await nc.flush()
                    await got.wait()
                    out.append(perf() - t)
            return out

        await block(WARMUP)
        loop = asyncio.get_running_loop()
        print("ready", flush=True)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line.strip() or line.strip() == "quit":
                break
            cpu = time.process_time()
            out = await block(int(line))
            print(json.dumps([time.process_time() - cpu, out]), flush=True)
        await nc.close()
        await first.close()

    asyncio.run(main())


def _child_trionats(scenario: str, url: str, size: int) -> None:
    import trionats

    payload = b"x" * size

    async def main() -> None:
        subject = "lat.ps" if scenario == "latency_pubsub" else "lat.req"
        async with (
            trionats.open_connection(url) as first,
            trionats.open_connection(url) as nc,
            first.subscribe(subject) as sub,
            trio.open_nursery() as nursery,
        ):
            if scenario != "latency_pubsub":

                async def respond() -> None:
                    async for msg in sub:
                        await msg.respond(msg.data)

                nursery.start_soon(respond)
            perf = time.perf_counter

            async def one_request(out: list[float]) -> None:
                t = perf()
                await nc.request("lat.req", payload, timeout=10)
                out.append(perf() - t)

            async def block(n: int) -> list[float]:
                out: list[float] = []
                if scenario == "latency_request":
                    for _ in range(n):
                        await one_request(out)
                elif scenario == "request100":

                    async def worker() -> None:
                        for _ in range(max(1, n // 100)):
                            await one_request(out)

                    async with trio.open_nursery() as inner:
                        for _ in range(100):
                            inner.start_soon(worker)
                else:
                    for _ in range(n):
                        t = perf()
                        await nc.publish("lat.ps", payload)
                        await nc.flush()
                        await sub.next_msg()
                        out.append(perf() - t)
                return out

            await block(WARMUP)
            print("ready", flush=True)
            while True:
                line = await trio.to_thread.run_sync(sys.stdin.readline)
                if not line.strip() or line.strip() == "quit":
                    break
                cpu = time.process_time()
                out = await block(int(line))
                print(json.dumps([time.process_time() - cpu, out]), flush=True)
            nursery.cancel_scope.cancel()

    trio.run(main)


# ------------------------------------------------------------------ harness --
def _spawn(side: str, tree: str | None, scenario: str, url: str, size: int) -> Any:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = tree
    kind = "raw" if side == "raw" else "trionats"
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--child", kind, scenario, url, str(size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"{side} child for {scenario} failed: {line!r}")
    return child


def _ask(child: Any, n: int) -> tuple[float, list[float]]:
    """One block: (CPU seconds the child used, the latencies)."""
    child.stdin.write(f"{n}\n")
    child.stdin.flush()
    cpu, latencies = json.loads(child.stdout.readline())
    return cpu, latencies


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def interleaved(
    url: str, scenarios: list[str], rounds: int, block: int, size: int, against: list[str]
) -> dict[str, Any]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sides: dict[str, str | None] = {"raw": None, "trionats": here}
    for tree in against:
        sides[os.path.basename(os.path.abspath(tree))] = os.path.abspath(tree)
    report: dict[str, Any] = {}
    for scenario in scenarios:
        children = {side: _spawn(side, tree, scenario, url, size) for side, tree in sides.items()}
        samples: dict[str, list[list[float]]] = {side: [] for side in sides}
        cpu: dict[str, float] = dict.fromkeys(sides, 0.0)
        try:
            for r in range(rounds):
                order = list(sides) if r % 2 == 0 else list(reversed(sides))
                for side in order:
                    used, latencies = _ask(children[side], block)
                    cpu[side] += used
                    samples[side].append(latencies)
        finally:
            for child in children.values():
                child.stdin.write("quit\n")
                child.stdin.flush()
                child.wait(30)
        print(f"{scenario}: {rounds} rounds x {block} ops per side, interleaved")
        report[scenario] = {}
        for side in sides:
            every = [x for blk in samples[side] for x in blk]
            row = {
                "p10_ms": 1e3 * _pct(every, 0.1),
                "p50_ms": 1e3 * _pct(every, 0.5),
                "p99_ms": 1e3 * _pct(every, 0.99),
                "mean_ms": 1e3 * statistics.fmean(every),
                "cpu_us_per_op": 1e6 * cpu[side] / len(every),
            }
            line = (
                f"  {side:10} p10 {row['p10_ms']:.3f}  p50 {row['p50_ms']:.3f}  "
                f"p99 {row['p99_ms']:.3f}  mean {row['mean_ms']:.3f} ms  "
                f"cpu {row['cpu_us_per_op']:.0f} us/op"
            )
            if side != "raw":
                for q, name in ((0.1, "p10"), (0.5, "p50"), (0.99, "p99")):
                    ratios = [
                        _pct(ours, q) / _pct(raw, q)
                        for ours, raw in zip(samples[side], samples["raw"], strict=True)
                    ]
                    row[f"{name}_ratio"] = statistics.median(ratios)
                    row[f"{name}_ratio_min"] = min(ratios)
                    row[f"{name}_ratio_max"] = max(ratios)
                    line += (
                        f"  {name}/raw {statistics.median(ratios):.2f} "
                        f"({min(ratios):.2f}..{max(ratios):.2f})"
                    )
            report[scenario][side] = row
            print(line, flush=True)
    return report


# ------------------------------------------------------------------ profile --
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


async def _with_server(args: argparse.Namespace) -> None:
    from trionats import open_nats_server

    async with open_nats_server() as server:
        url = args.url or server.url
        if args.profile:
            await profile(url, args.count)
            return
        report = await trio.to_thread.run_sync(
            interleaved,
            url,
            args.scenario or list(SCENARIOS),
            args.rounds,
            args.block,
            args.size,
            args.against or [],
        )
        if args.json:
            with open(args.json, "w") as f:  # noqa: ASYNC230 - once, at the end
                json.dump(report, f, indent=2)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, scenario, url, size = sys.argv[2:6]
        (_child_raw if kind == "raw" else _child_trionats)(scenario, url, int(size))
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", help="use this server (default: an embedded one)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds (default: 20)")
    parser.add_argument("--block", type=int, default=250, help="ops per turn (default: 250)")
    parser.add_argument("--size", type=int, default=128, help="payload bytes (default: 128)")
    parser.add_argument(
        "--against",
        action="append",
        help="another trionats source tree to compare (repeat for several; the column "
        "is named after its directory)",
    )
    parser.add_argument(
        "--scenario", action="append", choices=SCENARIOS, help="repeat (default: all)"
    )
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--profile", action="store_true", help="count hops per round trip")
    parser.add_argument("--count", type=int, default=2000, help="--profile: round trips")
    trio.run(_with_server, parser.parse_args())


if __name__ == "__main__":
    main()
