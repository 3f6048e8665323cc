"""``trionats bench``: trionats against raw nats-py on plain asyncio, in one run.

Every scenario runs the same workload twice per repetition: once with trionats (in this
process, on Trio) and once with raw nats-py on plain asyncio in a child process (importing
trio_asyncio changes asyncio's loop policy for the whole process, which would slow the raw
side down). Same server, same payloads; warm-up is excluded on both sides; repetitions
are interleaved and the median and the spread (min..max) are reported.

The child processes run under ``trio.run_process``: a cancel (Ctrl-C or SIGTERM in the
CLI) stops them at once. Each child's stdin is a pipe whose other end only this process
holds, and the child exits when it reads end-of-file there: so even a parent killed with
SIGKILL leaves no benchmark child behind (the embedded server has its own guard, see
``trionats._server``). A child that fails raises :class:`BenchError` with its own stderr.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ._errors import TrionatsError

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from ._jetstream import JsMsg
    from ._msg import Msg

__all__ = ["ALL_SCENARIOS", "JS_SCENARIOS", "SCENARIOS", "BenchConfig", "BenchError", "run_bench"]


class BenchError(TrionatsError):
    """The benchmark could not run: no server at the URL, or a child process failed.

    The message carries the child's own stderr (its last lines).
    """


SCENARIOS = ("publish", "pubsub", "request", "pool", "subscriber", "subscriber_1ms")
#: Opt-in (``--scenario js_publish`` ...), not in the default run: they need a server with
#: JetStream and file storage, and a synchronous JetStream publish is slow.
JS_SCENARIOS = ("js_publish", "js_publish_async", "js_consume")
ALL_SCENARIOS = SCENARIOS + JS_SCENARIOS
WARMUP = 1000
JS_WARMUP = 100
JS_BATCH = 256


@dataclass(frozen=True)
class BenchConfig:
    """What to run: message count, payload size, concurrency, repetitions.

    ``count`` is the number of messages for publish, pubsub and subscriber; request and
    pool run ``count // 5`` (at least ``concurrency``), subscriber_1ms ``count // 20``
    (between 100 and 5,000), js_publish ``count // 10`` (at least 100), js_publish_async
    and js_consume ``count // 4`` (at least 256): see :meth:`count_for`.
    """

    count: int = 100_000
    size: int = 128
    concurrency: int = 100
    reps: int = 3

    def __post_init__(self) -> None:
        for name in ("count", "concurrency", "reps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.size, int) or self.size < 0:
            raise ValueError(f"size must be an int >= 0, got {self.size!r}")

    def count_for(self, scenario: str) -> int:
        """The number of messages (or requests) one run of ``scenario`` handles."""
        if scenario in ("request", "pool"):
            return max(self.concurrency, self.count // 5)
        if scenario == "subscriber_1ms":
            return max(100, min(self.count // 20, 5000))
        if scenario == "js_publish":
            return max(100, self.count // 10)
        if scenario in ("js_publish_async", "js_consume"):
            return max(JS_BATCH, self.count // 4)
        return self.count


def _js_stream_name(scenario: str, side: str) -> str:
    """A fresh stream per run: its name is unique to this process and this moment."""
    return f"BENCH_{scenario}_{side}_{os.getpid()}_{time.monotonic_ns()}".upper()


def _latency_figures(rate: float, latencies: list[float]) -> dict[str, float]:
    latencies.sort()
    return {
        "rate": rate,
        "mean_ms": 1000 * statistics.fmean(latencies),
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }


# --------------------------------------------------------------- raw nats-py (child) --
def raw_scenario(
    scenario: str, url: str, count: int, size: int, concurrency: int
) -> dict[str, Any]:
    """The raw nats-py side: what a user of nats-py on plain asyncio would write."""
    import asyncio

    import nats

    payload = b"x" * size

    async def subscribed(subc: Any, pub: Any) -> None:
        """Wait until the server has the subscriptions just made on ``subc``.

        ``await subc.flush()`` is not enough: nats-py writes its PING ahead of the SUB still
        in the outgoing buffer, so the PONG can come first and early messages are lost. A
        probe subscribed last is routed only after the earlier SUBs were processed.
        """
        probed = asyncio.Event()

        async def probe(msg: Any) -> None:
            probed.set()

        subject = f"bench.probe.{id(probed)}"
        await subc.subscribe(subject, cb=probe)
        for _ in range(1000):
            await pub.publish(subject, b"")
            await pub.flush()
            try:
                await asyncio.wait_for(probed.wait(), 0.05)
                return
            except TimeoutError:
                continue
        raise RuntimeError("the subscription never became active")

    async def publish() -> dict[str, Any]:
        nc = await nats.connect(url)
        for _ in range(WARMUP):
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
        subc = await nats.connect(url)
        done, warm = asyncio.Event(), asyncio.Event()
        received = 0
        target = count + WARMUP

        async def cb(msg: Any) -> None:
            nonlocal received
            received += 1
            if received == WARMUP:
                warm.set()
            if received == target:
                done.set()

        await subc.subscribe(
            "bench.ps", cb=cb, pending_msgs_limit=2 * target, pending_bytes_limit=1 << 30
        )
        await subscribed(subc, pub)
        for _ in range(WARMUP):
            await pub.publish("bench.ps", payload)
        await pub.flush()
        await asyncio.wait_for(warm.wait(), 60)
        t0 = time.perf_counter()
        for _ in range(count):
            await pub.publish("bench.ps", payload)
        await pub.flush()
        await asyncio.wait_for(done.wait(), 120)
        dt = time.perf_counter() - t0
        # end-to-end latency, one message at a time
        latencies: list[float] = []
        got = asyncio.Event()

        async def ping(msg: Any) -> None:
            got.set()

        await subc.subscribe("bench.lat", cb=ping)
        await subscribed(subc, pub)
        for _ in range(200):
            got.clear()
            t = time.perf_counter()
            await pub.publish("bench.lat", payload)
            await pub.flush()
            await asyncio.wait_for(got.wait(), 60)
            latencies.append(time.perf_counter() - t)
        await pub.close()
        await subc.close()
        figures = _latency_figures(count / dt, latencies)
        return figures

    async def request() -> dict[str, Any]:
        responder = await nats.connect(url)
        nc = await nats.connect(url)

        async def respond(msg: Any) -> None:
            await msg.respond(msg.data)

        await responder.subscribe("bench.req", cb=respond)
        await subscribed(responder, nc)
        for _ in range(200):
            await nc.request("bench.req", payload, timeout=5)
        latencies: list[float] = []
        per_task = count // concurrency

        async def requester() -> None:
            for _ in range(per_task):
                t = time.perf_counter()
                await nc.request("bench.req", payload, timeout=10)
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(requester() for _ in range(concurrency)))
        dt = time.perf_counter() - t0
        await nc.close()
        await responder.close()
        return _latency_figures(len(latencies) / dt, latencies)

    async def shared_connection() -> dict[str, Any]:
        # No pool in nats-py: concurrent tasks share one connection.
        nc = await nats.connect(url)
        per_task = count // concurrency

        async def worker() -> None:
            for _ in range(per_task):
                await nc.publish("bench.pool", payload)

        await worker()  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await nc.flush()
        dt = time.perf_counter() - t0
        await nc.close()
        return {"rate": per_task * concurrency / dt}

    async def callback_subscriber(sleep: float) -> dict[str, Any]:
        # nats-py runs one callback at a time per subscription.
        pub = await nats.connect(url)
        subc = await nats.connect(url)
        done = asyncio.Event()
        handled = 0

        async def handler(msg: Any) -> None:
            nonlocal handled
            if sleep:
                await asyncio.sleep(sleep)
            handled += 1
            if handled == count:
                done.set()

        await subc.subscribe(
            "bench.sub", cb=handler, pending_msgs_limit=2 * count, pending_bytes_limit=1 << 30
        )
        await subscribed(subc, pub)
        t0, cpu0 = time.perf_counter(), time.thread_time()
        for _ in range(count):
            await pub.publish("bench.sub", payload)
        await pub.flush()
        await asyncio.wait_for(done.wait(), 300)
        dt, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
        await pub.close()
        await subc.close()
        # cpu_us: CPU time of publisher and subscriber together per message (both run in
        # this thread), steadier than the rate on a busy machine
        return {"rate": count / dt, "cpu_us": cpu / count * 1e6}

    async def js_publish(batched: bool) -> dict[str, Any]:
        # sync: await each PubAck; batched: publish_async, gathered every JS_BATCH
        nc = await nats.connect(url)
        js = nc.jetstream()
        stream = _js_stream_name(scenario, "raw")
        subject = f"{stream.lower()}.x"
        await js.add_stream(name=stream, subjects=[subject])
        for _ in range(JS_WARMUP):
            await js.publish(subject, payload)
        t0 = time.perf_counter()
        if batched:
            futures: list[Any] = []
            for _ in range(count):
                futures.append(await js.publish_async(subject, payload))
                if len(futures) == JS_BATCH:
                    await asyncio.gather(*futures)
                    futures.clear()
            await asyncio.gather(*futures)
        else:
            for _ in range(count):
                await js.publish(subject, payload)
        dt = time.perf_counter() - t0
        await js.delete_stream(stream)
        await nc.close()
        return {"rate": count / dt}

    async def js_consume() -> dict[str, Any]:
        # pull_subscribe_bind + fetch(JS_BATCH) + manual ack, on a filled stream
        from nats.js.api import AckPolicy

        nc = await nats.connect(url)
        js = nc.jetstream()
        stream = _js_stream_name(scenario, "raw")
        subject = f"{stream.lower()}.x"
        await js.add_stream(name=stream, subjects=[subject])
        futures = [await js.publish_async(subject, payload) for _ in range(count)]
        await asyncio.gather(*futures)
        await js.add_consumer(
            stream, durable_name="bench", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1000
        )
        psub = await js.pull_subscribe_bind("bench", stream)
        handled = 0
        t0 = time.perf_counter()
        while handled < count:
            msgs = await psub.fetch(min(JS_BATCH, count - handled), timeout=30)
            for m in msgs:
                await m.ack()
                handled += 1
        await nc.flush()
        dt = time.perf_counter() - t0
        await js.delete_stream(stream)
        await nc.close()
        return {"rate": count / dt}

    runs: dict[str, Callable[[], Coroutine[Any, Any, dict[str, Any]]]] = {
        "js_publish": functools.partial(js_publish, False),
        "js_publish_async": functools.partial(js_publish, True),
        "js_consume": js_consume,
        "publish": publish,
        "pubsub": pubsub,
        "request": request,
        "pool": shared_connection,
        "subscriber": functools.partial(callback_subscriber, 0.0),
        "subscriber_1ms": functools.partial(callback_subscriber, 0.001),
    }
    return asyncio.run(runs[scenario]())


# ---------------------------------------------------------------------- trionats --
async def trionats_scenario(
    scenario: str, url: str, count: int, size: int, concurrency: int
) -> dict[str, Any]:
    """The same workload written the natural Trio way with trionats."""
    import trio

    from ._connect import open_connection

    payload = b"x" * size

    if scenario == "publish":
        async with open_connection(url) as nc:
            for _ in range(WARMUP):
                await nc.publish("bench.warm", payload)
            await nc.flush()
            t0 = time.perf_counter()
            for _ in range(count):
                await nc.publish("bench.pub", payload)
            await nc.flush()
            return {"rate": count / (time.perf_counter() - t0)}

    if scenario == "pubsub":
        target = count + WARMUP
        async with (
            open_connection(url) as pub,
            open_connection(url) as subc,
            subc.subscribe("bench.ps", max_pending_msgs=2 * target) as sub,
            subc.subscribe("bench.lat") as lat,
        ):
            done, warm = trio.Event(), trio.Event()

            async def consume() -> None:
                received = 0
                async for _msg in sub:
                    received += 1
                    if received == WARMUP:
                        warm.set()
                    if received == target:
                        done.set()
                        return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                for _ in range(WARMUP):
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
            latencies: list[float] = []
            for _ in range(200):
                t = time.perf_counter()
                await pub.publish("bench.lat", payload)
                await pub.flush()
                await lat.next_msg()
                latencies.append(time.perf_counter() - t)
            figures: dict[str, Any] = _latency_figures(count / dt, latencies)
            figures["dropped"] = sub.dropped
            return figures

    if scenario == "pool":
        return await _trionats_pool(url, count, payload, concurrency)
    if scenario in ("js_publish", "js_publish_async"):
        return await _trionats_js_publish(url, count, payload, scenario)
    if scenario == "js_consume":
        return await _trionats_js_consume(url, count, payload)
    if scenario in ("subscriber", "subscriber_1ms"):
        return await _trionats_subscriber(
            url, count, payload, 0.001 if scenario == "subscriber_1ms" else 0.0
        )
    if scenario != "request":
        raise ValueError(f"unknown scenario {scenario!r}")
    async with (
        open_connection(url) as responder,
        open_connection(url) as nc,
        responder.subscribe("bench.req") as sub,
        trio.open_nursery() as nursery,
    ):

        async def respond() -> None:
            async for msg in sub:
                await msg.respond(msg.data)

        nursery.start_soon(respond)
        for _ in range(200):
            await nc.request("bench.req", payload, timeout=5)
        latencies = []
        per_task = count // concurrency

        async def requester() -> None:
            for _ in range(per_task):
                t = time.perf_counter()
                await nc.request("bench.req", payload, timeout=10)
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        async with trio.open_nursery() as inner:
            for _ in range(concurrency):
                inner.start_soon(requester)
        dt = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
        return _latency_figures(len(latencies) / dt, latencies)


async def _trionats_pool(url: str, count: int, payload: bytes, concurrency: int) -> dict[str, Any]:
    """``concurrency`` tasks doing borrow + publish + return, on a pool capped at 32
    connections (its idle size): borrowers beyond that queue FIFO instead of dialing
    connections that would be closed again on return."""
    import trio

    from ._config import PoolConfig
    from ._pool import open_pool

    per_task = count // concurrency
    waits: list[float] = []
    async with open_pool(PoolConfig(servers=[url], max_per_server=32)) as pool:

        async def worker(record: bool) -> None:
            for _ in range(per_task):
                t = time.perf_counter()
                async with pool.borrow(timeout=10) as nc:
                    if record:
                        waits.append(time.perf_counter() - t)
                    await nc.publish("bench.pool", payload)

        await worker(False)  # warm-up
        before = pool.stats()
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker, True)
        dt = time.perf_counter() - t0
        after = pool.stats()
    waits.sort()
    created = after.created - before.created
    reused = after.reused - before.reused
    return {
        "rate": per_task * concurrency / dt,
        "reuse_rate": reused / max(1, created + reused),
        "borrow_p99_ms": 1000 * waits[min(len(waits) - 1, int(len(waits) * 0.99))],
    }


async def _trionats_subscriber(
    url: str, count: int, payload: bytes, sleep: float
) -> dict[str, Any]:
    """``open_subscriber`` with max_workers 64 and a no-op (or 1 ms) handler."""
    import trio

    from ._connect import open_connection
    from ._subscriber import SubscriberConfig, open_subscriber

    done = trio.Event()
    handled = 0

    async def handler(msg: Msg) -> None:
        nonlocal handled
        if sleep:
            await trio.sleep(sleep)
        handled += 1
        if handled == count:
            done.set()

    config = SubscriberConfig(max_workers=64, pending_msgs=2 * count)
    async with (
        open_connection(url) as pub,
        open_connection(url) as subc,
        open_subscriber(subc, config) as subscriber,
    ):
        await subscriber.start("bench.sub", handler)
        t0, cpu0 = time.perf_counter(), time.thread_time()
        for _ in range(count):
            await pub.publish("bench.sub", payload)
        await pub.flush()
        with trio.fail_after(300):
            await done.wait()
        dt, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
        return {
            "rate": count / dt,
            "cpu_us": cpu / count * 1e6,  # as on the raw side
            "dropped": subscriber.stats().dropped,
        }


async def _trionats_js_publish(
    url: str, count: int, payload: bytes, scenario: str
) -> dict[str, Any]:
    """``await js.publish`` per message (js_publish), or ``js.publisher(max_pending=256)``
    (js_publish_async), on a fresh file stream; the block's exit (every PubAck) is timed."""
    from ._connect import open_connection

    stream = _js_stream_name(scenario, "trionats")
    subject = f"{stream.lower()}.x"
    async with open_connection(url) as nc:
        js = nc.jetstream()
        await js.add_stream(stream, [subject])
        try:
            for _ in range(JS_WARMUP):
                await js.publish(subject, payload)
            t0 = time.perf_counter()
            if scenario == "js_publish_async":
                async with js.publisher(max_pending=JS_BATCH) as pub:
                    for _ in range(count):
                        await pub.publish(subject, payload)
            else:
                for _ in range(count):
                    await js.publish(subject, payload)
            dt = time.perf_counter() - t0
        finally:
            await js.delete_stream(stream)
    return {"rate": count / dt}


async def _trionats_js_consume(url: str, count: int, payload: bytes) -> dict[str, Any]:
    """``open_subscriber(max_workers=256)`` + ``start_jetstream`` with a no-op handler on a
    filled file stream; timed until the last handler ran and the acks were flushed.

    ``start_jetstream`` runs with its defaults, so ``confirm_acks=True``: each worker slot
    waits for the server to confirm its ack, more work than the raw side's ``m.ack()``
    (which confirms nothing).
    """
    import trio

    from ._connect import open_connection
    from ._subscriber import SubscriberConfig, open_subscriber

    stream = _js_stream_name("js_consume", "trionats")
    subject = f"{stream.lower()}.x"
    done = trio.Event()
    handled = 0

    async def handler(msg: JsMsg) -> None:
        nonlocal handled
        handled += 1
        if handled == count:
            done.set()

    async with open_connection(url) as nc:
        js = nc.jetstream()
        await js.add_stream(stream, [subject])
        try:
            async with js.publisher(max_pending=JS_BATCH) as pub:
                for _ in range(count):
                    await pub.publish(subject, payload)
            await js.add_consumer(stream, "bench", max_ack_pending=1000)
            async with open_subscriber(nc, SubscriberConfig(max_workers=JS_BATCH)) as subscriber:
                t0 = time.perf_counter()
                await subscriber.start_jetstream(stream, "bench", handler)
                with trio.fail_after(300):
                    await done.wait()
                await nc.flush()
                dt = time.perf_counter() - t0
        finally:
            await js.delete_stream(stream)
    return {"rate": count / dt}


async def check_jetstream(url: str, timeout: float = 5.0) -> None:
    """Fail with one clear line when the server at ``url`` has no JetStream.

    Raises:
        BenchError: no answer to ``$JS.API.INFO`` (JetStream is off) or an error reply.
    """
    from ._connect import open_connection
    from ._errors import NoRespondersError
    from ._errors import TimeoutError as NatsTimeoutError
    from ._validate import parse_server_url

    display = parse_server_url(url, "url").display
    off = (
        f"the server at {display} has no JetStream: the js_* scenarios need one started "
        "with -js (trionats server --jetstream)"
    )
    async with open_connection(url) as nc:
        try:
            reply = await nc.request("$JS.API.INFO", b"", timeout=timeout)
        except (NoRespondersError, NatsTimeoutError):
            raise BenchError(off) from None
    try:
        info = json.loads(reply.data)
    except ValueError:
        raise BenchError(off) from None
    if not isinstance(info, dict) or "error" in info:
        error = info.get("error", {}) if isinstance(info, dict) else {}
        raise BenchError(f"{off} ({error.get('description', 'no account info')})")


# ------------------------------------------------------------ C client (ceiling) --
C_SCENARIOS = ("publish", "pubsub")
_C_SOURCE = r"""
#include <nats/nats.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static volatile int64_t received = 0;

static void on_msg(natsConnection *nc, natsSubscription *sub, natsMsg *msg, void *closure) {
    received++;
    natsMsg_Destroy(msg);
}

int main(int argc, char **argv) {
    const char *scenario = argv[1], *url = argv[2];
    int64_t count = atoll(argv[3]);
    int size = atoi(argv[4]);
    char *payload = malloc(size + 1);
    memset(payload, 'x', size);
    natsConnection *pub = NULL, *subc = NULL;
    natsSubscription *sub = NULL;
    if (natsConnection_ConnectTo(&pub, url) != NATS_OK) return 2;
    if (strcmp(scenario, "pubsub") == 0) {
        if (natsConnection_ConnectTo(&subc, url) != NATS_OK) return 2;
        natsConnection_Subscribe(&sub, subc, "bench.ps", on_msg, NULL);
        natsSubscription_SetPendingLimits(sub, -1, -1);
        natsConnection_Flush(subc);
    }
    const char *subject = sub ? "bench.ps" : "bench.pub";
    for (int i = 0; i < 1000; i++) natsConnection_Publish(pub, subject, payload, size);
    natsConnection_Flush(pub);
    while (sub && received < 1000) nats_Sleep(1);
    int64_t start = nats_NowInNanoSeconds();
    for (int64_t i = 0; i < count; i++) natsConnection_Publish(pub, subject, payload, size);
    natsConnection_Flush(pub);
    while (sub && received < count + 1000) nats_Sleep(0);
    double dt = (nats_NowInNanoSeconds() - start) / 1e9;
    printf("{\"rate\": %f}\n", count / dt);
    return 0;
}
"""


def _c_source(workdir: str) -> tuple[str, str, str] | None:
    """Write the C program; (compiler, source, binary), or None with the reason printed."""
    import shutil

    compiler = shutil.which("cc") or shutil.which("gcc")
    header = any(
        os.path.exists(p) for p in ("/usr/include/nats/nats.h", "/usr/local/include/nats/nats.h")
    )
    if compiler is None or not header:
        print(
            "C client skipped: needs a C compiler and libnats (Debian: apt-get install "
            "libnats-dev)",
            file=sys.stderr,
        )
        return None
    source = os.path.join(workdir, "cbench.c")
    binary = os.path.join(workdir, "cbench")
    with open(source, "w") as f:
        f.write(_C_SOURCE)
    return compiler, source, binary


async def build_c_client(workdir: str) -> str | None:
    """Build the libnats benchmark program; None (with the reason printed) when not possible."""
    import trio

    found = _c_source(workdir)
    if found is None:
        return None
    compiler, source, binary = found
    result = await trio.run_process(
        [compiler, "-O2", "-o", binary, source, "-lnats"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace")[-1000:]
        print(f"C client skipped: build failed:\n{stderr}", file=sys.stderr)
        return None
    return binary


# ------------------------------------------------------------------------ driver --
_PARENT_PIPE_FLAG = "--exit-when-stdin-closes"


def _redact(text: str) -> str:
    from ._validate import redact

    return redact(text)


async def _run_child(
    command: list[str], what: str, started: Callable[[str, int], None] | None = None
) -> Any:
    """Run one benchmark child under ``trio.run_process``; its last stdout line is JSON.

    The child's stdin is the read end of a pipe whose write end only this process holds:
    a child run with ``--exit-when-stdin-closes`` exits when this process dies, however
    it dies. ``started(what, pid)`` is called once the child runs.

    Raises:
        BenchError: the child failed (its exit status and its own stderr) or printed no
            result.
    """
    import trio

    from ._errors import reraise_unwrapped

    read_end, write_end = os.pipe()  # not inheritable: no other child gets write_end
    done: Any = None

    async def run(task_status: trio.TaskStatus[trio.Process]) -> None:
        nonlocal done
        done = await trio.run_process(
            command,
            stdin=read_end,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            task_status=task_status,
        )

    try:
        async with trio.open_nursery() as nursery:
            process = await nursery.start(run)
            os.close(read_end)  # the child has its copy
            read_end = -1
            if started is not None:
                started(what, process.pid)
    except BaseExceptionGroup as group:  # the one level our nursery added
        reraise_unwrapped(group, 1)
    finally:
        if read_end != -1:
            os.close(read_end)
        os.close(write_end)
    stdout = done.stdout.decode(errors="replace")
    stderr = done.stderr.decode(errors="replace")
    if done.returncode != 0:
        how = (
            f"was killed by signal {-done.returncode}"
            if done.returncode < 0
            else f"exited with status {done.returncode}"
        )
        raise BenchError(_redact(f"{what} {how}:\n{stderr[-3000:].rstrip() or '(no stderr)'}"))
    lines = stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        raise BenchError(
            _redact(f"{what} printed no result:\n{stdout[-1000:]}\n{stderr[-2000:]}")
        ) from None


def _raw_command(scenario: str, url: str, count: int, size: int, concurrency: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trionats._bench",
        scenario,
        url,
        str(count),
        str(size),
        str(concurrency),
        _PARENT_PIPE_FLAG,
    ]


async def check_server(url: str, timeout: float = 5.0) -> None:
    """Fail fast when nothing answers at ``url``: a TCP connect, then the server's INFO.

    Without it, the raw nats-py child would retry its first connect for about two
    minutes (nats-py's defaults) before it reports the failure.

    Raises:
        ValueError: ``url`` is not a valid server URL.
        BenchError: no connection, or no INFO line within ``timeout``.
    """
    import trio

    from ._validate import parse_server_url

    parsed = parse_server_url(url, "url")
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(parsed.host, parsed.port)
            async with stream:
                if parsed.scheme in ("nats", "tls"):  # a websocket says nothing first
                    data = await stream.receive_some(4096)
                    if not data.startswith(b"INFO"):
                        raise BenchError(
                            f"{parsed.display} is not a NATS server (it sent {data[:40]!r})"
                        )
    except OSError as exc:
        raise BenchError(f"no NATS server answers at {parsed.display}: {exc}") from None
    except trio.TooSlowError:
        raise BenchError(
            f"no NATS server answers at {parsed.display}: no INFO within {timeout} s"
        ) from None


def machine_facts() -> dict[str, Any]:
    """CPU count, platform and versions, for the JSON report."""
    from importlib.metadata import version

    facts: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for package in ("trionats", "trio", "trio-asyncio", "nats-py"):
        try:
            facts[package] = version(package)
        except Exception:  # pragma: no cover - not installed as a distribution
            facts[package] = "unknown"
    return facts


def summarize(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """Median and spread of each scenario's figures, and the trionats/raw ratio."""
    summary: dict[str, dict[str, Any]] = {}
    for scenario, sides in results.items():
        row: dict[str, Any] = {}
        for side, runs in sides.items():
            for key in runs[0]:
                values = [run[key] for run in runs]
                row[f"{side}_{key}"] = statistics.median(values)
                row[f"{side}_{key}_min"] = min(values)
                row[f"{side}_{key}_max"] = max(values)
        ratios = [
            ours["rate"] / raw["rate"]
            for ours, raw in zip(sides["trionats"], sides["raw"], strict=True)
        ]
        row["ratio"] = row["trionats_rate"] / row["raw_rate"]
        row["ratio_min"], row["ratio_max"] = min(ratios), max(ratios)
        summary[scenario] = row
    return summary


async def run_bench(
    url: str,
    scenarios: tuple[str, ...] | list[str],
    config: BenchConfig,
    progress: Callable[[str, int, str], None] | None = None,
    c_binary: str | None = None,
    duration: float | None = None,
    started: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Run the scenarios against ``url``; returns raw figures, the summary and machine facts.

    ``progress(scenario, rep, side)`` is called after each single run, ``started(what,
    pid)`` when a child process starts.

    Raises:
        ValueError: an unknown scenario or a bad URL.
        BenchError: nothing answers at ``url``, or a child failed (with its stderr).
    """
    for scenario in scenarios:
        if scenario not in ALL_SCENARIOS:
            raise ValueError(
                f"unknown scenario {scenario!r}; choose from {', '.join(ALL_SCENARIOS)}"
            )
    await check_server(url)
    if any(scenario in JS_SCENARIOS for scenario in scenarios):
        await check_jetstream(url)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {"trionats": [], "raw": []} for s in scenarios
    }
    c_results: dict[str, list[dict[str, Any]]] = {}
    counts = {scenario: config.count_for(scenario) for scenario in scenarios}
    if duration is not None:
        # Size each workload so one trionats run takes about ``duration`` seconds, from a
        # small calibration run (not counted).
        probe = BenchConfig(count=2000, size=config.size, concurrency=config.concurrency)
        for scenario in scenarios:
            n = probe.count_for(scenario)
            rate = (await trionats_scenario(scenario, url, n, config.size, config.concurrency))[
                "rate"
            ]
            counts[scenario] = max(
                n, int(rate * duration) // config.concurrency * config.concurrency
            )
    for rep in range(config.reps):
        for scenario in scenarios:
            n = counts[scenario]
            raw = await _run_child(
                _raw_command(scenario, url, n, config.size, config.concurrency),
                f"raw nats-py child ({scenario}, rep {rep + 1})",
                started,
            )
            results[scenario]["raw"].append(raw)
            if progress:
                progress(scenario, rep, "raw")
            ours = await trionats_scenario(scenario, url, n, config.size, config.concurrency)
            results[scenario]["trionats"].append(ours)
            if progress:
                progress(scenario, rep, "trionats")
            if c_binary is not None and scenario in C_SCENARIOS:
                c = await _run_child(
                    [c_binary, scenario, url, str(n), str(config.size)],
                    f"C client ({scenario}, rep {rep + 1})",
                    started,
                )
                c_results.setdefault(scenario, []).append(c)
    summary = summarize(results)
    for scenario, runs in c_results.items():
        summary[scenario]["c_rate"] = statistics.median(run["rate"] for run in runs)
    return {
        "config": asdict(config),
        "counts": counts,
        "machine": machine_facts(),
        "results": results,
        "c_client": c_results,
        "summary": summary,
    }


def _exit_when_stdin_closes() -> None:
    """In the child: exit at once when the parent's end of our stdin pipe closes.

    Only the parent holds that end, so end-of-file means the parent is gone (however it
    died): nothing is left running for it.
    """

    def watch() -> None:
        while os.read(0, 4096):
            pass
        os._exit(75)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":  # the raw nats-py child process
    if _PARENT_PIPE_FLAG in sys.argv:
        sys.argv.remove(_PARENT_PIPE_FLAG)
        _exit_when_stdin_closes()
    _scenario, _url, _count, _size, _conc = sys.argv[1:6]
    print(json.dumps(raw_scenario(_scenario, _url, int(_count), int(_size), int(_conc))))
