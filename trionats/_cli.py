"""The ``trionats`` command line (also ``python -m trionats``).

* ``trionats demo``: start an embedded nats-server, connect, subscribe, publish, request,
  print what happened, stop everything in order and show nothing was left behind.
* ``trionats server``: run the embedded server (or a local cluster) until Ctrl-C.

Ctrl-C at any moment stops cleanly: Trio turns it into a cancel of the main task, every
``async with`` unwinds in order, and the server child process is stopped on the way out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import trio

from ._connection import open_connection
from ._server import open_nats_cluster, open_nats_server

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]


def _say(text: str) -> None:
    print(text, flush=True)


async def demo(messages: int = 1000, requests: int = 100) -> dict[str, object]:
    """The guided run behind ``trionats demo``; returns the figures it printed."""
    t_start = time.perf_counter()
    async with open_nats_server() as server:
        _say(f"[1/5] embedded nats-server running at {server.url} (pid {server.pid})")
        async with (
            open_connection(server.url, name="demo-publisher") as pub,
            open_connection(server.url, name="demo-subscriber") as subc,
        ):
            _say("[2/5] two connections open: demo-publisher, demo-subscriber")
            received = 0
            all_received = trio.Event()
            async with (
                subc.subscribe("demo.events.*") as events,
                subc.subscribe("demo.echo") as echo,
                trio.open_nursery() as nursery,
            ):

                async def count_events() -> None:
                    nonlocal received
                    async for _msg in events:
                        received += 1
                        if received == messages:
                            all_received.set()

                async def responder() -> None:
                    async for msg in echo:
                        await msg.respond(b"echo: " + msg.data)

                nursery.start_soon(count_events)
                nursery.start_soon(responder)

                t0 = time.perf_counter()
                for i in range(messages):
                    await pub.publish(f"demo.events.{i % 4}", b"event %d" % i)
                await pub.flush()
                with trio.fail_after(10):
                    await all_received.wait()
                pub_dt = time.perf_counter() - t0
                _say(
                    f"[3/5] published {messages} messages, subscriber received {received} "
                    f"({messages / pub_dt:,.0f} msg/s end to end)"
                )

                t0 = time.perf_counter()
                replies: list[bytes] = []

                async def ask(i: int) -> None:
                    reply = await pub.request("demo.echo", b"question %d" % i, timeout=5)
                    replies.append(reply.data)

                async with trio.open_nursery() as askers:
                    for i in range(requests):
                        askers.start_soon(ask, i)
                req_dt = time.perf_counter() - t0
                _say(
                    f"[4/5] {len(replies)} concurrent requests answered "
                    f"({requests / req_dt:,.0f} req/s), e.g. {replies[0]!r}"
                )
                nursery.cancel_scope.cancel()
            stats = pub.stats()
            sub_stats = subc.stats()
        _say(
            f"[5/5] closed both connections: published {stats.out_msgs}, "
            f"received {sub_stats.in_msgs}, dropped {sub_stats.dropped}"
        )
        pid = server.pid
    alive = _pid_alive(pid)
    _say(
        f"stopped nats-server (pid {pid}): {'STILL RUNNING' if alive else 'gone'}; "
        f"no connection or task left behind. Total {time.perf_counter() - t_start:.2f} s"
    )
    return {
        "published": messages,
        "received": received,
        "requests": requests,
        "replies": len(replies),
        "server_left_running": alive,
    }


def _pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """``trionats bench``: run, show a progress bar, print a table, write JSON."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from ._bench import SCENARIOS, BenchConfig, build_c_client, run_bench

    scenarios = args.scenario or list(SCENARIOS)
    config = (
        BenchConfig(count=2000, size=args.size, concurrency=args.concurrency, reps=1)
        if args.quick
        else BenchConfig(
            count=args.count, size=args.size, concurrency=args.concurrency, reps=args.reps
        )
    )
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("benchmarking", total=2 * config.reps * len(scenarios))

        def advance(scenario: str, rep: int, side: str) -> None:
            progress.update(task, advance=1, description=f"{scenario} rep {rep + 1} {side}")

        async with AsyncExitStack() as stack:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="trionats-bench-"))
            c_binary = build_c_client(workdir) if args.with_c else None
            url = args.url
            if url is None:
                server = await stack.enter_async_context(open_nats_server())
                url = server.url
            report = await run_bench(url, scenarios, config, advance, c_binary)
    table = Table(
        title=f"trionats vs raw nats-py ({report['machine']['cpu_count']} CPUs; "
        f"median of {config.reps}, latency trionats / raw)"
    )
    columns = ["scenario", "raw nats-py", "trionats", "ratio", "spread", "p50 ms", "p99 ms"]
    if args.with_c:
        columns.append("C libnats")
    for column in columns:
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for scenario, row in report["summary"].items():
        p50 = p99 = ""
        if "raw_p99_ms" in row:  # trionats / raw
            p50 = f"{row['trionats_p50_ms']:.2f} / {row['raw_p50_ms']:.2f}"
            p99 = f"{row['trionats_p99_ms']:.2f} / {row['raw_p99_ms']:.2f}"
        cells = [
            scenario,
            f"{row['raw_rate']:,.0f}/s",
            f"{row['trionats_rate']:,.0f}/s",
            f"{row['ratio']:.2f}x",
            f"{row['ratio_min']:.2f}..{row['ratio_max']:.2f}",
            p50,
            p99,
        ]
        if args.with_c:
            cells.append(f"{row['c_rate']:,.0f}/s" if "c_rate" in row else "-")
        table.add_row(*cells)
    out = Console()
    out.width = max(out.width, 110)
    out.print(table)
    if args.json:
        with open(args.json, "w") as f:  # noqa: ASYNC230 - once, at the end
            json.dump(report, f, indent=2)
        _say(f"wrote {args.json}")
    return report


async def serve(port: int | None, jetstream: bool, cluster: int) -> None:
    """Run the embedded server (or an N-node cluster) until cancelled (Ctrl-C)."""
    if cluster > 1:
        async with open_nats_cluster(cluster, jetstream=jetstream) as servers:
            for server in servers:
                _say(f"nats-server node at {server.url} (pid {server.pid})")
            _say("Ctrl-C to stop")
            await trio.sleep_forever()
    async with open_nats_server(port=port, jetstream=jetstream) as server:
        _say(f"nats-server at {server.url} (pid {server.pid}); Ctrl-C to stop")
        await trio.sleep_forever()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trionats", description="Trio-native NATS client")
    commands = parser.add_subparsers(dest="command", required=True)
    p_demo = commands.add_parser("demo", help="a guided run against an embedded nats-server")
    p_demo.add_argument("--messages", type=int, default=1000)
    p_demo.add_argument("--requests", type=int, default=100)
    p_bench = commands.add_parser("bench", help="trionats vs raw nats-py, side by side")
    p_bench.add_argument("--scenario", action="append", choices=["publish", "pubsub", "request"])
    p_bench.add_argument("--count", type=int, default=100_000)
    p_bench.add_argument("--reps", type=int, default=3)
    p_bench.add_argument("--quick", action="store_true", help="2000 messages, 1 repetition")
    p_bench.add_argument("--size", type=int, default=128, help="payload bytes")
    p_bench.add_argument("--concurrency", type=int, default=100, help="concurrent requesters")
    p_bench.add_argument("--url", default=None, help="use this server, not an embedded one")
    p_bench.add_argument("--json", default=None, metavar="FILE")
    p_bench.add_argument(
        "--with-c", action="store_true", help="add the C client libnats as the ceiling"
    )
    p_server = commands.add_parser("server", help="run the embedded nats-server until Ctrl-C")
    p_server.add_argument("--port", type=int, default=None)
    p_server.add_argument("--jetstream", action="store_true")
    p_server.add_argument("--cluster", type=int, default=1, metavar="N")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("messages", "requests", "cluster", "count", "reps", "concurrency"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            _parser().error(f"--{name} must be >= 1, got {value}")
    try:
        if args.command == "demo":
            trio.run(demo, args.messages, args.requests)
        elif args.command == "bench":
            trio.run(bench, args)
        else:
            trio.run(serve, args.port, args.jetstream, args.cluster)
    except KeyboardInterrupt:
        _say("interrupted: stopped cleanly")
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
