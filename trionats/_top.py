"""``trionats top``: every process publishing resource snapshots, live.

Resource managers opened with ``publish_on=nc`` publish their :class:`SystemStats` as JSON
on ``trionats.stats.<id>`` at each interval (schema ``io.trionats.resource_stats.v1``, see
``docs/production.md``). ``trionats top`` subscribes to ``trionats.stats.>`` and shows the
latest snapshot of each process: a ``rich`` live table on a terminal, plain text lines
(one block per snapshot received) otherwise.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import trio

from ._errors import TimeoutError as TrionatsTimeoutError
from ._validate import check_publish_subject

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["format_plain", "render_table", "top"]

STALE_INTERVALS = 3
"""A process not heard from for this many of its intervals is shown as stale."""


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _health_of(snap: dict[str, Any], name: str) -> str:
    for kind in ("pools", "subscribers", "connections"):
        for c in snap.get(kind, ()):
            if c.get("name") == name:
                return str(c.get("health", "?"))
    return "?"


def _process_line(snap: dict[str, Any]) -> str:
    p = snap.get("process", {})
    return (
        f"process {snap.get('name')} (id {snap.get('id')}, pid {p.get('pid')} on "
        f"{snap.get('host')}): {snap.get('health')}; rss {_mb(p.get('rss_bytes', 0))}, "
        f"fds {p.get('open_fds')}, cpu {p.get('cpu_percent', 0):.0f}%, "
        f"trio tasks {p.get('trio_tasks')}, asyncio tasks {p.get('asyncio_tasks')}"
    )


def _pool_text(p: dict[str, Any]) -> str:
    return (
        f"borrowed {p['borrowed']}, idle {p['idle']}, open {p['open']}, waiting {p['waiting']}; "
        f"reuse {p['reuse_rate_total']:.0%}, waits {p['waits']}, timeouts {p['timeouts']}, "
        f"wait p99 {_ms(p['wait_time']['p99'])}"
    )


def _subscriber_text(s: dict[str, Any]) -> str:
    return (
        f"{s['throughput']:,.1f} msg/s, in flight {s['in_flight']}/{s['max_workers']}, "
        f"pending {s['pending']}, dropped {s['dropped_total']}, failed "
        f"{s['failed_total'] + s['timed_out_total']}, p99 {_ms(s['handler_duration']['p99'])}"
    )


def _connection_text(c: dict[str, Any]) -> str:
    state = "closed" if c["closed"] else "connected" if c["connected"] else "disconnected"
    return (
        f"{state}, in {c['in_rate']:,.1f} msg/s, out {c['out_rate']:,.1f} msg/s, "
        f"dropped {c['dropped_total']}, reconnects {c['reconnects_total']}"
    )


def format_plain(snap: dict[str, Any]) -> str:
    """One published snapshot as plain text lines (what ``top`` prints off a terminal)."""
    lines = [_process_line(snap)]
    for p in snap.get("pools", ()):
        lines.append(f"  pool {p['name']} [{p.get('health', '?')}]: {_pool_text(p)}")
    for s in snap.get("subscribers", ()):
        lines.append(f"  subscriber {s['name']} [{s.get('health', '?')}]: {_subscriber_text(s)}")
    for c in snap.get("connections", ()):
        lines.append(f"  connection {c['name']} [{c.get('health', '?')}]: {_connection_text(c)}")
    alerts = snap.get("alerts", ())
    if not alerts:
        lines.append("  alerts: none")
    for a in alerts:
        lines.append(f"  alert: {a.get('message')}")
    return "\n".join(lines)


def render_table(processes: dict[str, dict[str, Any]], stale: set[str]) -> RenderableType:
    """The live view: one row per process and per component, then the active alerts."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    colours = {"healthy": "green", "degraded": "yellow", "unhealthy": "red"}
    table = Table(title=f"trionats top: {len(processes)} processes", expand=True)
    for column in ("process", "component", "health", "state", "rate", "drops", "failed", "p99"):
        table.add_column(
            column, justify="right" if column in ("rate", "drops", "failed") else "left"
        )
    alert_lines: list[str] = []

    def health(value: str) -> Text:
        return Text(value, style=colours.get(value, ""))

    for key, snap in sorted(processes.items(), key=lambda kv: str(kv[1].get("name"))):
        p = snap.get("process", {})
        who = f"{snap.get('name')} {p.get('pid')}@{snap.get('host')}"
        if key in stale:
            who += " (stale)"
        table.add_row(
            who,
            "process",
            health(str(snap.get("health"))),
            f"rss {_mb(p.get('rss_bytes', 0))}, fds {p.get('open_fds')}, "
            f"cpu {p.get('cpu_percent', 0):.0f}%, tasks {p.get('trio_tasks')}/"
            f"{p.get('asyncio_tasks')}",
            "",
            "",
            "",
            "",
        )
        for pool in snap.get("pools", ()):
            rate = pool["borrows"] / pool["window"] if pool["window"] else 0.0
            table.add_row(
                "",
                f"pool {pool['name']}",
                health(str(pool.get("health"))),
                f"{pool['borrowed']} borrowed / {pool['open']} open, {pool['waiting']} waiting, "
                f"reuse {pool['reuse_rate_total']:.0%}",
                f"{rate:,.1f} borrows/s",
                f"{pool['timeouts']} timeouts",
                "",
                f"wait {_ms(pool['wait_time']['p99'])}",
            )
        for s in snap.get("subscribers", ()):
            table.add_row(
                "",
                f"subscriber {s['name']}",
                health(str(s.get("health"))),
                f"{s['in_flight']}/{s['max_workers']} busy, {s['pending']} pending",
                f"{s['throughput']:,.1f} msg/s",
                f"{s['dropped_total']:,}",
                f"{s['failed_total'] + s['timed_out_total']:,}",
                _ms(s["handler_duration"]["p99"]),
            )
        for c in snap.get("connections", ()):
            table.add_row(
                "",
                f"connection {c['name']}",
                health(str(c.get("health"))),
                "closed" if c["closed"] else "connected" if c["connected"] else "disconnected",
                f"{c['in_rate']:,.1f} in, {c['out_rate']:,.1f} out",
                f"{c['dropped_total']:,}",
                "",
                "",
            )
        for a in snap.get("alerts", ()):
            alert_lines.append(f"{snap.get('name')} {p.get('pid')}: {a.get('message')}")
    alerts = Text("\n".join(alert_lines) if alert_lines else "no active alerts")
    return Group(table, Text("alerts:", style="bold"), alerts)


def _decode(data: bytes) -> dict[str, Any] | None:
    from ._resources import SCHEMA

    try:
        snap = json.loads(data)
    except ValueError:
        return None
    if not isinstance(snap, dict) or snap.get("type") != SCHEMA or "id" not in snap:
        return None
    interval = snap.get("interval", 10.0)
    if isinstance(interval, bool) or not isinstance(interval, int | float):
        return None
    if not 0 < interval < float("inf"):
        return None
    try:  # a snapshot that would break the views is ignored, not a crash of top
        format_plain(snap)
        render_table({"": snap}, set())
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        return None
    return snap


async def top(
    url: str,
    *,
    duration: float | None = None,
    once: bool = False,
    subject: str = "trionats.stats",
    plain: bool | None = None,
) -> int:
    """Run ``trionats top`` against the server at ``url``; returns how many snapshots it read.

    Args:
        url: the NATS server.
        duration: stop after this many seconds (None: until cancelled).
        once: show every process heard within one publishing interval (at most 10 s)
            of the first snapshot, then stop.
        subject: the subject prefix the resource managers publish on.
        plain: plain text lines instead of a live table (None: when stdout is not a
            terminal).

    Raises:
        trionats.TimeoutError: ``once`` with ``duration`` and no snapshot in that time.
    """
    from rich.console import Console
    from rich.live import Live

    from ._connect import open_connection

    check_publish_subject(subject, "--subject")
    if plain is None:
        plain = not sys.stdout.isatty()
    processes: dict[str, dict[str, Any]] = {}
    heard: dict[str, float] = {}
    received = 0
    pattern = f"{subject}.>"
    console = Console()

    def stale() -> set[str]:
        now = trio.current_time()
        return {
            key
            for key, at in heard.items()
            if now - at > STALE_INTERVALS * float(processes[key].get("interval", 10.0))
        }

    async with open_connection(url, name="trionats top") as nc, nc.subscribe(pattern) as sub:
        if plain:
            print(f"trionats top: listening on {pattern} at {nc.connected_url}", flush=True)
        with trio.move_on_after(duration if duration is not None else float("inf")) as scope:
            live = None if plain or once else Live(render_table(processes, set()), console=console)
            if live is not None:
                live.start()
            try:
                window_end = float("inf")  # once: when to stop listening
                while True:
                    with trio.move_on_at(window_end):
                        msg = await sub.next_msg()
                    if trio.current_time() >= window_end:
                        break
                    snap = _decode(msg.data)
                    if snap is None:
                        continue
                    received += 1
                    key = str(snap["id"])
                    processes[key] = snap
                    heard[key] = trio.current_time()
                    if once:
                        if window_end == float("inf"):
                            interval = float(snap.get("interval", 1.0))
                            window_end = trio.current_time() + min(interval, 10.0)
                    elif plain:
                        print(format_plain(snap), flush=True)
                    elif live is not None:
                        live.update(render_table(processes, stale()))
            finally:
                if live is not None:
                    live.stop()
        if once:
            if not processes:
                raise TrionatsTimeoutError(
                    f"no snapshot on {pattern} within {duration:g} s: is a resource manager "
                    "publishing there (open_resource_manager(publish_on=nc))?"
                )
            if plain:
                for snap in processes.values():
                    print(format_plain(snap), flush=True)
            else:
                console.print(render_table(processes, stale()))
        elif scope.cancelled_caught and plain:
            print(f"trionats top: {received} snapshots from {len(processes)} processes", flush=True)
    return received
