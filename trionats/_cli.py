"""The ``trionats`` command line (also ``python -m trionats``).

* ``trionats demo``: start an embedded nats-server, connect, subscribe, publish, request,
  print what happened, stop everything in order and show nothing was left behind.
* ``trionats bench``: trionats against raw nats-py, side by side.
* ``trionats server``: run the embedded server (or a local cluster) until Ctrl-C.
* ``trionats top``: every process publishing resource snapshots, live.

Ctrl-C (SIGINT) or SIGTERM at any moment stops cleanly: the signal cancels the command,
every ``async with`` unwinds in order, and child processes (a benchmark's raw nats-py
child, the embedded server) are stopped on the way out; the exit status is then 130 or
143. A second Ctrl-C while stopping raises ``KeyboardInterrupt`` at once, and a second
SIGTERM kills the process: even then nothing is left behind (the server and the benchmark
children each watch for their parent's death).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import trio

from ._bench import ALL_SCENARIOS
from ._errors import reraise_unwrapped
from ._server import monitor_json, open_nats_cluster, open_nats_server

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from ._msg import Msg

__all__ = ["main"]


def _say(text: str) -> None:
    print(text, flush=True)


async def demo(messages: int = 1000, requests: int = 100) -> dict[str, Any]:
    """The guided run behind ``trionats demo``; returns the figures it printed.

    Embedded server -> pool -> subscriber with a handler -> publishes and requests through
    pool borrows -> live stats -> a health summary -> everything stopped in order, and a
    check that nothing was left behind.
    """
    import logging

    from ._config import PoolConfig
    from ._pool import open_pool
    from ._subscriber import SubscriberConfig, open_subscriber

    # The demo's failing handler is on purpose; keep its log records out of the story.
    logging.getLogger("trionats.subscriber").setLevel(logging.CRITICAL)
    t_start = time.perf_counter()
    tasks_before = trio.lowlevel.current_statistics().tasks_living
    handled = 0
    all_handled = trio.Event()

    async def handle_order(msg: Msg) -> bytes | None:
        nonlocal handled
        try:
            await trio.sleep(0.0005)  # some work
            number = int(msg.data.rsplit(b" ", 1)[1])
            if msg.subject.startswith("demo.orders.") and number % 100 == 99:
                raise ValueError(f"order {number} is invalid")  # counted, isolated
            return b"confirmed " + msg.data if msg.reply else None
        finally:
            handled += 1
            if handled == messages + requests:
                all_handled.set()

    def line(subscriber: Any, pool: Any) -> str:
        s, p = subscriber.stats(), pool.stats()
        return (
            f"      received {s.received}, processed {s.processed}, failed {s.failed}, "
            f"dropped {s.dropped}, in flight {s.in_flight} | pool: {p.created} connections "
            f"created, {p.reused} reused, reuse rate {p.reuse_rate:.1%}"
        )

    async with open_nats_server(monitor=True) as server:
        _say(f"[1/6] embedded nats-server running at {server.url} (pid {server.pid})")
        config = PoolConfig(servers=[server.url], idle_per_server=4, max_per_server=8, name="demo")
        async with open_pool(config) as pool:
            _say("[2/6] pool open: idle_per_server=4, max_per_server=8 (borrowers queue FIFO)")
            async with open_subscriber(pool, SubscriberConfig(max_workers=16)) as subscriber:
                handle = await subscriber.start("demo.orders.*", handle_order, queue="workers")
                ask = await subscriber.start("demo.ask", handle_order, queue="workers")
                _say("[3/6] subscriber started: demo.orders.* and demo.ask, max_workers=16")

                t0 = time.perf_counter()
                for i in range(messages):
                    async with pool.borrow(timeout=5) as nc:
                        await nc.publish(f"demo.orders.{i % 4}", b"order %d" % i)
                    if i % max(1, messages // 4) == 0 and i:
                        _say(line(subscriber, pool))
                pub_dt = time.perf_counter() - t0
                _say(
                    f"[4/6] published {messages} orders through {messages} pool borrows "
                    f"({messages / pub_dt:,.0f}/s)"
                )

                replies: list[bytes] = []

                async def request(i: int) -> None:
                    async with pool.borrow(timeout=5) as nc:
                        reply = await nc.request("demo.ask", b"question %d" % i, timeout=5)
                    replies.append(reply.data)

                t0 = time.perf_counter()
                async with trio.open_nursery() as askers:
                    for i in range(requests):
                        askers.start_soon(request, i)
                req_dt = time.perf_counter() - t0
                with trio.fail_after(30):
                    await all_handled.wait()
                _say(
                    f"[5/6] {len(replies)} concurrent requests answered through the pool "
                    f"({requests / req_dt:,.0f} req/s), e.g. {replies[0]!r}"
                )
                # Stopping lets the last handlers finish; the counts are final after it.
                await handle.stop(timeout=5)
                await ask.stop(timeout=5)
                _say(line(subscriber, pool))
                sub_stats = subscriber.stats()
            pool_stats = pool.stats()
            healthy = sub_stats.received == sub_stats.processed + sub_stats.failed
            _say(
                "      health: "
                + ("OK" if healthy else "DEGRADED")
                + f" - every message handled ({sub_stats.failed} handler errors counted and "
                f"isolated, {sub_stats.dropped} dropped), {pool_stats.leaks_detected} leaks, "
                f"{pool_stats.timeouts} borrow timeouts, {pool_stats.dial_failures} dial "
                "failures"
            )
        # The server sees the closes a moment later: wait (bounded) for it to count zero.
        with trio.move_on_after(5):
            while (connections := await _server_connections(server)) > 0:  # noqa: ASYNC110
                await trio.sleep(0.01)
        pid = server.pid
    alive = _pid_alive(pid)
    tasks_after = trio.lowlevel.current_statistics().tasks_living
    _say(
        f"[6/6] stopped in order: subscriptions, subscriber, pool ({connections} connections "
        f"left on the server), nats-server (pid {pid}: {'STILL RUNNING' if alive else 'gone'}); "
        f"Trio tasks {tasks_before} before, {tasks_after} after. "
        f"Total {time.perf_counter() - t_start:.2f} s"
    )
    return {
        "published": messages,
        "received": sub_stats.received,
        "processed": sub_stats.processed,
        "failed": sub_stats.failed,
        "dropped": sub_stats.dropped,
        "requests": requests,
        "replies": len(replies),
        "reuse_rate": pool_stats.reuse_rate,
        "connections_left": connections,
        "tasks_left": tasks_after - tasks_before,
        "server_left_running": alive,
    }


async def _server_connections(server: Any) -> int:
    return int((await monitor_json(server, "/connz"))["num_connections"])


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


def _bench_config(args: argparse.Namespace) -> Any:
    """The ``BenchConfig`` of ``trionats bench``'s arguments (``--quick``: 2000, 1 rep)."""
    from ._bench import BenchConfig

    if args.quick:
        return BenchConfig(count=2000, size=args.size, concurrency=args.concurrency, reps=1)
    return BenchConfig(
        count=args.count, size=args.size, concurrency=args.concurrency, reps=args.reps
    )


def _prepare_bench(args: argparse.Namespace) -> None:
    """Before anything runs: settle uvloop and the scenarios, read and check ``--compare``.

    Sets ``args.uvloop`` (True/False), ``args.scenario`` (the list to run: with
    ``--compare`` and no ``--scenario``, the old report's) and ``args.old_report``.

    Raises:
        BenchError: ``--uvloop`` without uvloop installed, or a ``--compare`` file that
            is missing, not a report, or measured another workload (one line each).
    """
    from ._bench import (
        ALL_SCENARIOS,
        SCENARIOS,
        BenchError,
        check_comparable,
        load_report,
        uvloop_available,
    )

    if args.uvloop is None:
        args.uvloop = uvloop_available()
    elif args.uvloop and not uvloop_available():
        raise BenchError(
            "--uvloop: uvloop is not installed (pip install uvloop; it is in trionats[test])"
        )
    args.old_report = None
    args.compare_warnings = []
    if args.compare is not None:
        old = load_report(args.compare)
        if not args.scenario:
            args.scenario = [s for s in old["results"] if s in ALL_SCENARIOS]
            if not args.scenario:
                raise BenchError(
                    f"--compare {args.compare} has no scenario this trionats knows "
                    f"({', '.join(old['results'])})"
                )
        args.compare_warnings = check_comparable(old, _bench_config(args), args.scenario)
        args.old_report = old
    args.scenario = args.scenario or list(SCENARIOS)


def _rate(stats: dict[str, float] | None) -> str:
    """A rate with its spread: ``27,229/s ±4%``, ± being half the min..max range."""
    if stats is None:
        return "-"
    median = stats["median"]
    if stats["n"] < 2:  # one repetition: no spread to show
        return f"{median:,.0f}/s"
    half = 100 * (stats["max"] - stats["min"]) / 2 / median if median else 0.0
    return f"{median:,.0f}/s ±{half:.0f}%"


def _ratio(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "-"
    if stats["n"] < 2:
        return f"{stats['median']:.2f}x"
    return f"{stats['median']:.2f}x ({stats['min']:.2f}-{stats['max']:.2f})"


#: Scenarios explained by the table's caption (marked "(*)").
_CAPTIONED = {"pool", "pool_shared"}


def _print_bench_table(report: dict[str, Any], reps: int, with_c: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    uvloop = any("raw_uvloop" in sides for sides in report["results"].values())
    table = Table(
        title=f"trionats vs raw nats-py ({report['machine']['cpu_count']} CPUs; median of "
        f"{reps}; ±: half the min..max range, in % of the median; ratio: median of the "
        "per-repetition ratios (min-max); latency trionats / raw)"
    )
    columns = ["scenario", "raw nats-py", "trionats", "ratio"]
    if uvloop:
        columns[2:2] = ["raw uvloop"]
        columns.append("vs uvloop")
    columns += ["p50 ms", "p99 ms"]
    if with_c:
        columns.append("C libnats")
    for column in columns:
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for scenario, row in report["summary"].items():
        stats = report["stats"][scenario]
        sides, ratios = stats["sides"], stats["ratios"]
        p50 = p99 = ""
        if "raw_p99_ms" in row and "trionats_p99_ms" in row:  # trionats / raw
            p50 = f"{row['trionats_p50_ms']:.2f} / {row['raw_p50_ms']:.2f}"
            p99 = f"{row['trionats_p99_ms']:.2f} / {row['raw_p99_ms']:.2f}"
        ratio, ratio_uvloop = _ratio(ratios.get("ratio")), _ratio(ratios.get("ratio_uvloop"))
        name = scenario
        if scenario in _CAPTIONED:
            name = f"{scenario} (*)"
        cells = [name, _rate(sides["raw"].get("rate")), _rate(sides["trionats"].get("rate")), ratio]
        if uvloop:
            cells[2:2] = [_rate(sides.get("raw_uvloop", {}).get("rate"))]
            cells.append(ratio_uvloop)
        cells += [p50, p99]
        if with_c:
            cells.append(f"{row['c_rate']:,.0f}/s" if "c_rate" in row else "-")
        table.add_row(*cells)
    if _CAPTIONED & set(report["summary"]):
        table.caption = _POOL_CAPTION
    out = Console()
    out.width = max(out.width, 160 if uvloop else 130)
    out.print(table)


def _figure_text(figure: str, value: float) -> str:
    if figure.startswith("ratio"):
        return f"{value:.2f}x"
    if figure == "rate":
        return f"{value:,.0f}/s"
    if figure.endswith("_ms"):
        return f"{value:.2f} ms"
    return f"{value:.3g}"


def _print_comparison(
    old: dict[str, Any], report: dict[str, Any], path: str, warnings: list[str]
) -> None:
    """``--compare``: each figure's change since the old report, regressions flagged."""
    from rich.console import Console
    from rich.table import Table

    from ._bench import Change, compare_reports

    changes = compare_reports(old, report)
    when = old.get("date", "date not recorded")
    table = Table(
        title=f"change since {path} ({when}); band: half of each run's min..max range, "
        "added (at least 2%); read the ratios first"
    )
    for column in ("scenario", "figure", "old", "new", "change", "band", "verdict"):
        table.add_column(
            column, justify="left" if column in ("scenario", "figure", "verdict") else "right"
        )
    names = {"ratio": "ratio vs raw", "ratio_uvloop": "ratio vs uvloop"}
    for c in changes:
        figure = names.get(c.what) or f"{c.what.replace('_', ' ')} {c.figure}"
        if c.verdict == "noise":
            verdict = "within noise"
        elif c.verdict == "unmeasured":
            verdict = "no spread (1 rep)"
        elif c.ours:
            verdict = "REGRESSION" if c.regression else "improved"
        else:  # a reference side: the machine or its load moved, not trionats
            verdict = f"reference {c.verdict}"
        table.add_row(
            c.scenario,
            figure,
            _figure_text(c.figure, c.old),
            _figure_text(c.figure, c.new),
            "n/a" if c.change_pct is None else f"{c.change_pct:+.1f}%",
            "n/a" if c.band_pct is None else f"{c.band_pct:.1f}%",
            verdict,
        )
    out = Console()
    out.width = max(out.width, 110)
    out.print(table)
    for warning in warnings:
        _say(f"note: {warning}")
    regressions = [c for c in changes if c.regression]
    # an absolute trionats figure whose raw reference got worse too: the machine moved
    reference_worse = {
        (c.scenario, c.figure) for c in changes if c.what == "raw" and c.verdict == "worse"
    }

    def name(c: Change) -> str:
        text = f"{c.scenario} {names.get(c.what) or c.what + ' ' + c.figure}"
        if c.change_pct is not None:
            text += f" {c.change_pct:+.1f}%"
        if c.what == "trionats" and (c.scenario, c.figure) in reference_worse:
            text += " (raw worse too)"
        return text

    if regressions:
        listed = ", ".join(name(c) for c in regressions)
        _say(f"{len(regressions)} regression(s) beyond the noise band: {listed}")
    elif all(c.verdict == "unmeasured" for c in changes):
        _say("no verdicts: neither run repeated its figures, so there is no noise band")
    else:
        _say(f"no regression beyond the noise band ({len(changes)} figures compared)")


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """``trionats bench``: run, show a progress bar, print a table, compare, write JSON."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ._bench import build_c_client, check_server, has_uvloop_side, run_bench

    if not hasattr(args, "old_report"):  # called directly, not through main()
        _prepare_bench(args)
    scenarios = args.scenario
    config = _bench_config(args)
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        runs = sum(2 + (args.uvloop and has_uvloop_side(s)) for s in scenarios)
        task = progress.add_task("benchmarking", total=config.reps * runs)

        def advance(scenario: str, rep: int, side: str) -> None:
            progress.update(task, advance=1, description=f"{scenario} rep {rep + 1} {side}")

        def started(what: str, pid: int) -> None:
            if args.verbose:
                progress.console.print(f"started {what}, pid {pid}", markup=False)

        async with AsyncExitStack() as stack:
            url = args.url
            if url is not None:
                await check_server(url)  # before building anything: fail within seconds
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="trionats-bench-"))
            c_binary = await build_c_client(workdir) if args.with_c else None
            if url is None:
                server = await stack.enter_async_context(open_nats_server(jetstream=True))
                url = server.url
                started(f"embedded nats-server at {url}", server.pid or 0)
            report = await run_bench(
                url, scenarios, config, advance, c_binary, args.duration, started, args.uvloop
            )
    _print_bench_table(report, config.reps, args.with_c)
    if args.old_report is not None:
        _print_comparison(args.old_report, report, args.compare, args.compare_warnings)
    if args.json:
        with open(args.json, "w") as f:  # noqa: ASYNC230 - once, at the end
            json.dump(report, f, indent=2)
        _say(f"wrote {args.json}")
    return report


_POOL_CAPTION = (
    "(*) concurrent tasks doing borrow + publish + return. pool: exclusive leases on a "
    "pool of 32 connections; raw: 32 nats-py connections, each used by one task at a "
    "time (nats-py has no pool). pool_shared: borrow(shared=True), every task "
    "multiplexed onto one connection; raw: the tasks share one nats-py connection."
)


def _check_writable(path: str) -> None:
    """Fail before a long run when ``path`` cannot be written (``--json``).

    Opens it for appending (which creates nothing but the file itself) and removes it
    again if it did not exist; raises ``OSError`` with the system's reason.
    """
    existed = os.path.lexists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise OSError(
            f"cannot write --json {path}: {exc.strerror or exc} (pick a file in a directory "
            "that exists and that you can write to)"
        ) from None
    if not existed:
        os.unlink(path)


async def serve(port: int | None, jetstream: bool, cluster: int) -> None:
    """Run the embedded server (or an N-node cluster) until cancelled (Ctrl-C).

    ``port`` None or 0: a free port, picked for the server; the printed URL is the real one.
    """
    port = port or None
    if cluster > 1:
        async with open_nats_cluster(cluster, jetstream=jetstream) as servers:
            for server in servers:
                _say(f"nats-server node at {server.url} (pid {server.pid})")
            _say("Ctrl-C to stop")
            await trio.sleep_forever()
    async with open_nats_server(port=port, jetstream=jetstream) as server:
        _say(f"nats-server at {server.url} (pid {server.pid}); Ctrl-C to stop")
        await trio.sleep_forever()


async def _top(args: argparse.Namespace) -> None:
    """``trionats top``: see :mod:`trionats._top`."""
    from ._top import top

    await top(args.url, duration=args.duration, once=args.once, subject=args.subject)


class _HELP(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the text already names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default: " in text:
            return text
        return super()._get_help_string(action)


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``trionats`` parser and its subcommands' parsers, by name."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="trionats", description="Trio-native NATS client", formatter_class=_HELP
    )
    parser.add_argument("--version", action="version", version=f"trionats {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_demo = commands.add_parser(
        "demo", help="a guided run against an embedded nats-server", formatter_class=_HELP
    )
    p_demo.add_argument("--messages", type=int, default=1000, help="orders to publish")
    p_demo.add_argument("--requests", type=int, default=100, help="concurrent requests")
    p_bench = commands.add_parser(
        "bench", help="trionats vs raw nats-py, side by side", formatter_class=_HELP
    )
    p_bench.add_argument(
        "--scenario",
        action="append",
        choices=ALL_SCENARIOS,
        help="repeat to pick several (default: all but the JetStream ones, js_publish, "
        "js_publish_async and js_consume, which are opt-in and need a server with "
        "JetStream, and batch_publish, opt-in)",
    )
    size_group = p_bench.add_mutually_exclusive_group()
    size_group.add_argument("--count", type=int, default=100_000, help="messages per run")
    size_group.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds per run (calibrated), instead of --count (default: off)",
    )
    p_bench.add_argument(
        "--reps",
        type=int,
        default=5,
        help="repetitions: each figure shows the median and the spread over them",
    )
    size_group.add_argument(
        "--quick", action="store_true", help="2000 messages, 1 repetition (no spread)"
    )
    p_bench.add_argument("--size", type=int, default=128, help="payload bytes")
    p_bench.add_argument("--concurrency", type=int, default=100, help="concurrent requesters")
    p_bench.add_argument(
        "--url", default=None, help="use the server at this URL (default: an embedded one)"
    )
    p_bench.add_argument(
        "--json",
        default=None,
        metavar="FILE",
        help="write every figure and the machine facts to FILE, checked before the run "
        "(default: none)",
    )
    p_bench.add_argument(
        "--compare",
        default=None,
        metavar="OLD_JSON",
        help="after the run, show each figure's change since OLD_JSON (written by --json) "
        "and flag regressions beyond the noise band of both runs' repetitions; runs "
        "OLD_JSON's scenarios unless --scenario is given; checked before the run "
        "(default: none)",
    )
    p_bench.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run raw nats-py on uvloop, a reference column (all scenarios but "
        "subscriber_1ms and the JetStream ones) (default: on when uvloop is importable)",
    )
    p_bench.add_argument(
        "--with-c", action="store_true", help="add the C client libnats as the ceiling"
    )
    p_bench.add_argument(
        "--verbose", action="store_true", help="name each child process (and its pid) it starts"
    )
    p_server = commands.add_parser(
        "server", help="run the embedded nats-server until Ctrl-C", formatter_class=_HELP
    )
    p_server.add_argument(
        "--port",
        type=int,
        default=0,
        help="client port; 0: a free port, picked for you (the URL printed is the real one)",
    )
    p_server.add_argument("--jetstream", action="store_true", help="enable JetStream")
    p_server.add_argument(
        "--cluster", type=int, default=1, metavar="N", help="run an N-node local cluster"
    )
    p_top = commands.add_parser(
        "top",
        help="every process publishing resource snapshots (open_resource_manager(publish_on=)), "
        "live",
        formatter_class=_HELP,
    )
    p_top.add_argument("--url", default="nats://127.0.0.1:4222", help="the NATS server")
    p_top.add_argument(
        "--duration", type=float, default=None, help="stop after S seconds (default: Ctrl-C)"
    )
    p_top.add_argument(
        "--once",
        action="store_true",
        help="show the processes heard within one interval of the first snapshot, then exit",
    )
    p_top.add_argument(
        "--subject", default="trionats.stats", help="the subject prefix snapshots are published on"
    )
    return parser, {"demo": p_demo, "bench": p_bench, "server": p_server, "top": p_top}


def _parser() -> argparse.ArgumentParser:
    """The ``trionats`` argument parser."""
    return _parsers()[0]


def _check_args(args: argparse.Namespace, command: argparse.ArgumentParser) -> None:
    """Values argparse cannot check by type: a usage error (exit 2) with the command's usage."""
    duration = getattr(args, "duration", None)
    if duration is not None and not duration > 0:
        command.error(f"--duration must be > 0, got {duration}")
    for name in ("messages", "requests", "cluster", "count", "reps", "concurrency"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            command.error(f"--{name} must be >= 1, got {value}")
    size = getattr(args, "size", None)
    if size is not None and size < 0:
        command.error(f"--size must be >= 0, got {size}")
    port = getattr(args, "port", None)
    if port is not None and not 0 <= port <= 65535:
        command.error(f"--port must be in 0..65535 (0: a free port), got {port}")
    if getattr(args, "url", None) is not None:
        from ._validate import parse_server_url

        try:
            parse_server_url(args.url, "--url")
        except ValueError as exc:
            command.error(str(exc))


def _hint(exc: BaseException) -> str:
    """What to do about an expected error, or ''."""
    from ._errors import ServerNotFoundError

    if isinstance(exc, ServerNotFoundError):
        if "TRIONATS_NATS_SERVER" in str(exc):
            return (
                " (point TRIONATS_NATS_SERVER at a nats-server binary, or unset it to use "
                "the one installed with trionats[server])"
            )
        return ""  # its message already says how to install one
    if isinstance(exc, ValueError):
        return " (see --help)"
    return ""


def _expected_errors(exc: BaseException) -> list[Exception] | None:
    """The leaves of ``exc`` when every one is an expected error, else None.

    Expected: ``TrionatsError`` (a missing nats-server, a benchmark that could not run...),
    ``ValueError`` and ``OSError``. Anything else is a bug and keeps its traceback.
    """
    from ._errors import TrionatsError

    if isinstance(exc, BaseExceptionGroup):
        leaves: list[Exception] = []
        for member in exc.exceptions:
            found = _expected_errors(member)
            if found is None:
                return None
            leaves.extend(found)
        return leaves
    if isinstance(exc, TrionatsError | ValueError | OSError):
        return [exc]
    return None


def _one_line(exc: Exception) -> str:
    """The error's message on one line: its first line and, when there are more (a
    server's log), the last one, which says why. A benchmark child's error is kept whole:
    it is that child's own stderr."""
    from ._bench import BenchError

    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, BenchError):
        return text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trionats`` command line; returns the exit status.

    0 on success, 1 for an expected error (one line on stderr: what went wrong and what to
    do, never a traceback), 2 for a usage error (raised as ``SystemExit`` by argparse, with
    the subcommand's usage), 130 or 143 when stopped by Ctrl-C or SIGTERM.
    """
    parser, commands = _parsers()
    args = parser.parse_args(argv)
    command = commands[args.command]
    _check_args(args, command)
    prefix = f"trionats {args.command}"
    try:
        if args.command == "bench":
            _prepare_bench(args)
            if args.json:
                _check_writable(args.json)
        if args.command == "demo":
            stopped_by = _run_until_signal(demo, args.messages, args.requests)
        elif args.command == "bench":
            stopped_by = _run_until_signal(bench, args)
        elif args.command == "top":
            stopped_by = _run_until_signal(_top, args)
        else:
            stopped_by = _run_until_signal(serve, args.port, args.jetstream, args.cluster)
    except KeyboardInterrupt:  # a Ctrl-C outside the signal watch (start-up, a second one)
        stopped_by = signal.SIGINT
    except BaseException as exc:
        errors = _expected_errors(exc)
        if errors is None:
            raise
        for error in errors:
            print(f"{prefix}: {_one_line(error)}{_hint(error)}", file=sys.stderr, flush=True)
        return 1
    if stopped_by is None:
        return 0
    if stopped_by == signal.SIGTERM:
        _say("terminated: stopped cleanly")
        return 128 + signal.SIGTERM
    _say("interrupted: stopped cleanly")
    return 128 + signal.SIGINT


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _run_until_signal(
    command: Callable[..., Awaitable[object]], *args: object
) -> signal.Signals | None:
    """``trio.run(command, *args)``, with Ctrl-C and SIGTERM turned into a cancel.

    Returns the signal that stopped the command, or None when it finished by itself. A
    signal the process ignores (``SIG_IGN``, as a shell's background job ignores SIGINT)
    stays ignored. After the first signal the previous handlers are back, so a second
    Ctrl-C or SIGTERM acts at once. An error raised while stopping after a signal is
    reported on stderr, not raised: the signal is why the command ended.
    """
    received: list[signal.Signals] = []

    async def watch(
        scope: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        signals = [
            signum
            for signum in _STOP_SIGNALS
            if threading.current_thread() is threading.main_thread()
            and signal.getsignal(signum) is not signal.SIG_IGN
        ]
        if not signals:
            task_status.started()
            return
        with trio.open_signal_receiver(*signals) as receiver:
            task_status.started()
            async for signum in receiver:
                received.append(signal.Signals(signum))
                scope.cancel()
                return

    async def main() -> None:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(watch, nursery.cancel_scope)
                await command(*args)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the one level our nursery added
            try:
                reraise_unwrapped(group, 1)
            except Exception as exc:
                if not received:
                    raise
                print(f"while stopping: {exc!r}", file=sys.stderr, flush=True)
        except Exception as exc:
            if not received:
                raise
            print(f"while stopping: {exc!r}", file=sys.stderr, flush=True)

    trio.run(main)
    return received[0] if received else None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
