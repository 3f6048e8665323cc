"""The ``trionats`` command line (also ``python -m trionats``).

* ``trionats demo``: start an embedded nats-server, connect, subscribe, publish, request,
  print what happened, stop everything in order and show nothing was left behind.
* ``trionats bench``: trionats against raw nats-py, side by side.
* ``trionats server``: run the embedded server (or a local cluster) until Ctrl-C.

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


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """``trionats bench``: run, show a progress bar, print a table, write JSON."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from ._bench import SCENARIOS, BenchConfig, build_c_client, check_server, run_bench

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
                url, scenarios, config, advance, c_binary, args.duration, started
            )
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
        ratio = f"{row['ratio']:.2f}x"
        spread = f"{row['ratio_min']:.2f}..{row['ratio_max']:.2f}"
        if scenario == "pool":  # unlike work on each side: no ratio (see the caption)
            scenario, ratio, spread = "pool (*)", "-", "-"
        cells = [
            scenario,
            f"{row['raw_rate']:,.0f}/s",
            f"{row['trionats_rate']:,.0f}/s",
            ratio,
            spread,
            p50,
            p99,
        ]
        if args.with_c:
            cells.append(f"{row['c_rate']:,.0f}/s" if "c_rate" in row else "-")
        table.add_row(*cells)
    if "pool" in report["summary"]:
        table.caption = _POOL_CAPTION
    out = Console()
    out.width = max(out.width, 110)
    out.print(table)
    if args.json:
        with open(args.json, "w") as f:  # noqa: ASYNC230 - once, at the end
            json.dump(report, f, indent=2)
        _say(f"wrote {args.json}")
    return report


_POOL_CAPTION = (
    "(*) pool: not the same work on both sides, so no ratio. trionats: 100 concurrent "
    "borrow + publish + return on a pool (each publish flushed on its own connection); "
    "raw: 100 asyncio tasks sharing one nats-py connection (nats-py has no pool), which "
    "batches thousands of publishes per write. Use a pool for isolation and failover; "
    "keep a hot publish loop on one borrowed connection."
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
        choices=[
            "publish",
            "pubsub",
            "request",
            "pool",
            "subscriber",
            "subscriber_1ms",
            "latency_request",
            "latency_pubsub",
            "js_publish",
            "js_publish_async",
            "js_consume",
        ],
        help="repeat to pick several (default: all but the JetStream ones, js_publish, "
        "js_publish_async and js_consume, which are opt-in and need a server with "
        "JetStream)",
    )
    size_group = p_bench.add_mutually_exclusive_group()
    size_group.add_argument("--count", type=int, default=100_000, help="messages per run")
    size_group.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds per run (calibrated), instead of --count (default: off)",
    )
    p_bench.add_argument("--reps", type=int, default=3, help="repetitions (the median is shown)")
    size_group.add_argument("--quick", action="store_true", help="2000 messages, 1 repetition")
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
    return parser, {"demo": p_demo, "bench": p_bench, "server": p_server}


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
        if args.command == "bench" and args.json:
            _check_writable(args.json)
        if args.command == "demo":
            stopped_by = _run_until_signal(demo, args.messages, args.requests)
        elif args.command == "bench":
            stopped_by = _run_until_signal(bench, args)
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
