"""``trionats bench``: trionats against raw nats-py on plain asyncio, in one run.

Every scenario runs the same workload on each side per repetition, each side in a fresh
child process of its own (``python -m trionats._bench``): trionats on Trio, raw nats-py on
plain asyncio (importing trio_asyncio changes asyncio's loop policy for the whole process,
which would slow the raw side down) and, with ``uvloop=True``, raw nats-py on uvloop. No
side shares a process with the progress bar's thread, the embedded server's supervision or
the results gathered so far. Same server, same payloads; warm-up is excluded on every
side; repetitions are interleaved and each figure's median and spread (min, max, median
absolute deviation) are reported.
``compare_reports`` compares two reports figure by figure against a noise band.

The child processes run under ``trio.run_process``: a cancel (Ctrl-C or SIGTERM in the
CLI) stops them at once. Each child's stdin is a pipe whose other end only this process
holds, and the child exits when it reads end-of-file there: so even a parent killed with
SIGKILL leaves no benchmark child behind (the embedded server has its own guard, see
``trionats._server``). A child that fails raises :class:`BenchError` with its own stderr.
"""

from __future__ import annotations

import contextlib
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
    from collections.abc import Awaitable, Callable, Coroutine

    from ._jetstream import JsMsg
    from ._msg import Msg

__all__ = [
    "ALL_SCENARIOS",
    "BATCH_SCENARIOS",
    "JS_SCENARIOS",
    "SCENARIOS",
    "BenchConfig",
    "BenchError",
    "run_bench",
]


class BenchError(TrionatsError):
    """The benchmark could not run: no server at the URL, or a child process failed.

    The message carries the child's own stderr (its last lines).
    """


SCENARIOS = (
    "publish",
    "pubsub",
    "request",
    "pool",
    "pool_shared",
    "subscriber",
    "subscriber_1ms",
    "latency_request",
    "latency_pubsub",
)
#: Connections in the pool scenario, on both sides: trionats' pool is capped at this many,
#: the raw side opens as many nats-py connections and lends each to one task at a time.
POOL_SIZE = 32
#: One operation at a time (no concurrency): the figures that matter are p50 and p99.
LATENCY_SCENARIOS = ("latency_request", "latency_pubsub")
LATENCY_WARMUP = 200
#: Opt-in (``--scenario js_publish`` ...), not in the default run: they need a server with
#: JetStream and file storage, and a synchronous JetStream publish is slow.
JS_SCENARIOS = ("js_publish", "js_publish_async", "js_consume")
#: Opt-in as well: the batch publisher against a publish + flush per message.
BATCH_SCENARIOS = ("batch_publish",)
ALL_SCENARIOS = SCENARIOS + JS_SCENARIOS + BATCH_SCENARIOS
WARMUP = 1000
BATCH_MAX = 1000  # batch_publish: messages per batch (trionats), per flush (raw)


def _flush_each_count(count: int) -> int:
    """batch_publish: messages of the publish + flush per message runs (they are slow)."""
    return max(100, count // 20)


JS_WARMUP = 100
JS_BATCH = 256


@dataclass(frozen=True)
class BenchConfig:
    """What to run: message count, payload size, concurrency, repetitions.

    ``count`` is the number of messages for publish, pubsub and subscriber; request,
    pool and pool_shared run ``count // 5`` (at least ``concurrency``), subscriber_1ms
    ``count // 20`` (between 100 and 5,000), js_publish ``count // 10`` (at least 100),
    js_publish_async and js_consume ``count // 4`` (at least 256), the latency scenarios
    ``count // 20`` (between 100 and 5,000): see :meth:`count_for`.
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
        if scenario in ("request", "pool", "pool_shared"):
            return max(self.concurrency, self.count // 5)
        if scenario in ("subscriber_1ms", *LATENCY_SCENARIOS):
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
    scenario: str,
    url: str,
    count: int,
    size: int,
    concurrency: int,
    loop: str = "asyncio",
    turns: bool = False,
) -> dict[str, Any]:
    """The raw nats-py side: what a user of nats-py on plain asyncio would write.

    ``loop="uvloop"`` runs the same code on uvloop's event loop (``uvloop.run``), what
    asyncio users pick for speed: the "raw uvloop" reference column.
    """
    import asyncio

    import nats

    if scenario in LATENCY_SCENARIOS:
        return _asyncio_run(_raw_latency(scenario, url, count, size, turns), loop)
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

    async def connection_pool() -> dict[str, Any]:
        # No pool in nats-py: the same as trionats' exclusive leases by hand, POOL_SIZE
        # connections in a queue, each used by one task at a time.
        conns = [await nats.connect(url) for _ in range(POOL_SIZE)]
        free: asyncio.Queue[Any] = asyncio.Queue()
        for conn in conns:
            free.put_nowait(conn)
        per_task = count // concurrency

        async def worker() -> None:
            for _ in range(per_task):
                conn = await free.get()
                try:
                    await conn.publish("bench.pool", payload)
                finally:
                    free.put_nowait(conn)

        await worker()  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        for conn in conns:
            await conn.flush()
        dt = time.perf_counter() - t0
        for conn in conns:
            await conn.close()
        return {"rate": per_task * concurrency / dt}

    async def shared_connection() -> dict[str, Any]:
        # What trionats' shared leases are measured against: concurrent tasks share one
        # nats-py connection.
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

    async def batch_publish() -> dict[str, Any]:
        # rate: publish + flush per message (the unbatched habit); batched_rate: what a
        # nats-py user batches by hand, a flush every BATCH_MAX publishes
        nc = await nats.connect(url)
        for _ in range(WARMUP):
            await nc.publish("bench.warm", payload)
        await nc.flush()
        n = _flush_each_count(count)
        t0 = time.perf_counter()
        for _ in range(n):
            await nc.publish("bench.batch", payload)
            await nc.flush()
        rate = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(count):
            await nc.publish("bench.batch", payload)
            if (i + 1) % BATCH_MAX == 0:
                await nc.flush()
        await nc.flush()
        batched = count / (time.perf_counter() - t0)
        await nc.close()
        return {"rate": rate, "batched_rate": batched}

    runs: dict[str, Callable[[], Coroutine[Any, Any, dict[str, Any]]]] = {
        "batch_publish": batch_publish,
        "js_publish": functools.partial(js_publish, False),
        "js_publish_async": functools.partial(js_publish, True),
        "js_consume": js_consume,
        "publish": publish,
        "pubsub": pubsub,
        "request": request,
        "pool": connection_pool,
        "pool_shared": shared_connection,
        "subscriber": functools.partial(callback_subscriber, 0.0),
        "subscriber_1ms": functools.partial(callback_subscriber, 0.001),
    }
    return _asyncio_run(runs[scenario](), loop)


def _asyncio_run(coro: Coroutine[Any, Any, dict[str, Any]], loop: str) -> dict[str, Any]:
    """Run the raw side's coroutine on plain asyncio or, ``loop="uvloop"``, on uvloop."""
    import asyncio

    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    if loop != "asyncio":
        coro.close()
        raise ValueError(f"unknown event loop {loop!r}; choose asyncio or uvloop")
    return asyncio.run(coro)


async def _raw_latency(
    scenario: str, url: str, count: int, size: int, turns: bool = False
) -> dict[str, Any]:
    """Raw nats-py, one operation at a time: sequential requests, or publish + flush +
    wait for the subscriber's callback before the next publish. With ``turns``, the
    operations come in blocks the parent asks for on stdin (see :func:`_turns`)."""
    import asyncio

    import nats
    import nats.errors

    payload = b"x" * size
    perf = time.perf_counter
    async with asyncio.timeout(300):  # connect, route, warm up
        first = await nats.connect(url)
        nc = await nats.connect(url)
        if scenario == "latency_request":

            async def respond(msg: Any) -> None:
                await msg.respond(msg.data)

            await first.subscribe("bench.lreq", cb=respond)
            await first.flush()
            while True:  # until the server routes to the responder
                try:
                    await nc.request("bench.lreq", payload, timeout=0.5)
                    break
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    await asyncio.sleep(0.01)

            async def once() -> float:
                t = perf()
                await nc.request("bench.lreq", payload, timeout=10)
                return perf() - t

        else:
            got = asyncio.Event()

            async def on_msg(msg: Any) -> None:
                got.set()

            await first.subscribe("bench.lps", cb=on_msg)
            await first.flush()
            while not got.is_set():  # until the server routes to the subscriber
                await nc.publish("bench.lps", payload)
                await nc.flush()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(got.wait(), 0.05)
            await asyncio.sleep(0.1)  # let stray probes arrive

            async def once() -> float:
                got.clear()
                t = perf()
                await nc.publish("bench.lps", payload)
                await nc.flush()
                await got.wait()
                return perf() - t

        for _ in range(LATENCY_WARMUP):
            await once()
    latencies: list[float] = []
    if turns:
        loop = asyncio.get_running_loop()
        await _turns(once, lambda: loop.run_in_executor(None, sys.stdin.readline))
    else:
        async with asyncio.timeout(300):
            latencies = [await once() for _ in range(count)]
    await nc.close()
    await first.close()
    return _latency_figures(len(latencies) / sum(latencies), latencies) if latencies else {}


async def _turns(once: Callable[[], Awaitable[float]], readline: Callable[[], Any]) -> None:
    """A latency child taking turns with the other sides (:func:`_run_turns`): says
    ``ready``, then for each line ``N`` on stdin runs ``N`` operations and prints their
    latencies as one JSON line; stops at ``quit`` or end of input."""
    print("ready", flush=True)
    while True:
        line = (await readline()).strip()
        if not line.isdigit():
            return
        print(json.dumps([await once() for _ in range(int(line))]), flush=True)


# ---------------------------------------------------------------------- trionats --
async def trionats_scenario(
    scenario: str, url: str, count: int, size: int, concurrency: int, turns: bool = False
) -> dict[str, Any]:
    """The same workload written the natural Trio way with trionats (``turns``: a latency
    scenario's operations in the blocks the parent asks for, see :func:`_run_turns`)."""
    import trio

    from ._connect import open_connection

    if scenario in LATENCY_SCENARIOS:
        return await _trionats_latency(scenario, url, count, size, turns)
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

    if scenario in ("pool", "pool_shared"):
        return await _trionats_pool(url, count, payload, concurrency, scenario == "pool_shared")
    if scenario == "batch_publish":
        return await _trionats_batch_publish(url, count, payload)
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


async def _trionats_latency(
    scenario: str, url: str, count: int, size: int, turns: bool = False
) -> dict[str, Any]:
    """trionats, one operation at a time (the same workload as :func:`_raw_latency`)."""
    import trio

    from ._connect import open_connection
    from ._errors import NoRespondersError
    from ._errors import TimeoutError as NatsTimeoutError

    payload = b"x" * size
    latencies: list[float] = []
    perf = time.perf_counter
    subject = "bench.lreq" if scenario == "latency_request" else "bench.lps"
    async with (
        open_connection(url) as first,
        open_connection(url) as nc,
        first.subscribe(subject) as sub,
        trio.open_nursery() as nursery,
    ):
        if scenario == "latency_request":

            async def respond() -> None:
                async for msg in sub:
                    await msg.respond(msg.data)

            nursery.start_soon(respond)
            with trio.fail_after(300):
                while True:  # the subscribe block waited for the server: at most a retry
                    try:
                        await nc.request(subject, payload, timeout=0.5)
                        break
                    except (NoRespondersError, NatsTimeoutError):
                        await trio.sleep(0.01)

            async def once() -> float:
                t = perf()
                await nc.request(subject, payload, timeout=10)
                return perf() - t

        else:

            async def once() -> float:
                t = perf()
                await nc.publish(subject, payload)
                await nc.flush()
                await sub.next_msg()
                return perf() - t

        with trio.fail_after(300):
            for _ in range(LATENCY_WARMUP):
                await once()
        if turns:
            await _turns(once, lambda: trio.to_thread.run_sync(sys.stdin.readline))
        else:
            with trio.fail_after(300):
                latencies = [await once() for _ in range(count)]
        nursery.cancel_scope.cancel()
    return _latency_figures(len(latencies) / sum(latencies), latencies) if latencies else {}


async def _trionats_pool(
    url: str, count: int, payload: bytes, concurrency: int, shared: bool
) -> dict[str, Any]:
    """``concurrency`` tasks doing borrow + publish + return.

    Exclusive (pool): on a pool capped at ``POOL_SIZE`` connections (its idle size), so
    borrowers beyond that queue FIFO, as on the raw side. Shared (pool_shared):
    ``borrow(shared=True)`` on a default pool, all borrowers multiplexed onto one
    connection, as on the raw side. Both flush every connection at the end, as the raw
    side does.
    """
    import trio

    from ._config import PoolConfig
    from ._pool import open_pool

    per_task = count // concurrency
    waits: list[float] = []
    async with open_pool(PoolConfig(servers=[url], max_per_server=POOL_SIZE)) as pool:

        async def worker() -> None:
            for _ in range(per_task):
                async with pool.borrow(timeout=10, shared=shared) as nc:
                    await nc.publish("bench.pool", payload)

        async def timed_worker() -> None:
            for _ in range(max(1, per_task // 10)):
                t = time.perf_counter()
                async with pool.borrow(timeout=10, shared=shared) as nc:
                    waits.append(time.perf_counter() - t)
                    await nc.publish("bench.pool", payload)

        async def flush_all() -> None:
            core = pool._core
            for conn in core.idle_connections(0) + [c for c, _, _ in core.shared_connections()]:
                await conn.flush()

        await worker()  # warm-up
        before = pool.stats()
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        await flush_all()
        dt = time.perf_counter() - t0
        after = pool.stats()
        # The borrow wait, in a shorter run of its own: timing every borrow in the rate
        # run would cost the trionats side work the raw side does not do.
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(timed_worker)
        await flush_all()
    waits.sort()
    created = after.created - before.created
    reused = after.reused - before.reused
    return {
        "rate": per_task * concurrency / dt,
        "reuse_rate": reused / max(1, created + reused),
        "borrow_p99_ms": 1000 * waits[min(len(waits) - 1, int(len(waits) * 0.99))],
    }


async def _trionats_batch_publish(url: str, count: int, payload: bytes) -> dict[str, Any]:
    """rate: ``open_batch_publisher(max_batch=BATCH_MAX)``, the block's exit (every batch
    confirmed) timed; unbatched_rate: ``publish`` + ``flush`` per message."""
    from ._batch import open_batch_publisher
    from ._connect import open_connection

    async with open_connection(url) as nc:
        for _ in range(WARMUP):
            await nc.publish("bench.warm", payload)
        await nc.flush()
        t0 = time.perf_counter()
        async with open_batch_publisher(nc, max_batch=BATCH_MAX) as bp:
            for _ in range(count):
                await bp.publish("bench.batch", payload)
        rate = count / (time.perf_counter() - t0)
        n = _flush_each_count(count)
        t0 = time.perf_counter()
        for _ in range(n):
            await nc.publish("bench.batch", payload)
            await nc.flush()
        unbatched = n / (time.perf_counter() - t0)
    return {"rate": rate, "unbatched_rate": unbatched, "batches": bp.stats().batches}


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

    ``start_jetstream`` runs with its defaults, so ``confirm_acks=True``: a slot is freed
    once the server confirmed its ack (confirmed in batches, one round trip per batch),
    more than the raw side's ``m.ack()`` (which confirms nothing).
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
    const char *scenario = argv[1], *url = getenv("TRIONATS_BENCH_URL");
    if (url == NULL || strcmp(argv[2], "-") != 0) url = argv[2];
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
URL_ENV = "TRIONATS_BENCH_URL"
"""The environment variable that carries the server URL to a benchmark child."""
_URL_FROM_ENV = "-"  # the URL argument of a child that reads it from URL_ENV
_PARENT_PIPE_FLAG = "--exit-when-stdin-closes"
_UVLOOP_FLAG = "--uvloop"
_TRIONATS_FLAG = "--trionats"  # the child runs the trionats side (trio.run) instead of raw
_TURNS_FLAG = "--turns"  # a latency child taking turns (see _run_turns) instead of one run
TURN_BLOCK = 100
"""Operations per turn when the sides of a latency scenario take turns."""


def _redact(text: str) -> str:
    from ._validate import redact

    return redact(text)


async def _run_child(
    command: list[str],
    what: str,
    started: Callable[[str, int], None] | None = None,
    url: str | None = None,
) -> Any:
    """Run one benchmark child under ``trio.run_process``; its last stdout line is JSON.

    ``url`` reaches the child in its environment (:data:`URL_ENV`), never in its argv.

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
            env=None if url is None else {**os.environ, URL_ENV: url},
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


class _Child:
    """A latency child taking turns: its process, its stdout by lines, its stderr kept."""

    def __init__(self, what: str, process: Any) -> None:
        self.what = what
        self.process = process
        self.stderr = bytearray()
        self._out = bytearray()

    async def drain_stderr(self) -> None:
        while chunk := await self.process.stderr.receive_some():
            self.stderr += chunk
            del self.stderr[:-4000]

    async def line(self, timeout: float) -> str:
        import trio

        with trio.move_on_after(timeout):
            while b"\n" not in self._out:
                chunk = await self.process.stdout.receive_some()
                if not chunk:
                    break
                self._out += chunk
            else:
                end = self._out.index(b"\n") + 1
                text = self._out[:end].decode(errors="replace")
                del self._out[:end]
                return text
            await self.process.wait()  # it closed its stdout: its stderr says why
            raise BenchError(
                _redact(
                    f"{self.what} exited with status {self.process.returncode}:\n"
                    f"{self.stderr.decode(errors='replace').rstrip() or '(no stderr)'}"
                )
            )
        raise BenchError(f"{self.what} did not answer within {timeout:g} s")


async def _run_turns(
    commands: dict[str, list[str]],
    count: int,
    url: str,
    what: str,
    started: Callable[[str, int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run a latency scenario's sides at the same time, taking turns.

    Each side is a child started with ``turns`` (see :func:`_child_command`): it connects
    and warms up, then runs :data:`TURN_BLOCK` operations each time it is asked, while
    the others wait; the order of the sides alternates from one round to the next.
    Every side thus sees the same machine over the same stretch of time, where one run
    after the other would let a drift of the machine (other work, the server's own
    housekeeping) land on one side only: on a shared machine the median of a 2,000
    round-trip run moved by a third from one run to the next. Returns each side's
    latency figures (as :func:`_latency_figures`), ``count`` operations each.

    Raises:
        BenchError: a child failed (its exit status and its stderr) or did not answer.
    """
    import subprocess

    import trio

    children: dict[str, _Child] = {}
    latencies: dict[str, list[float]] = {side: [] for side in commands}
    try:
        async with trio.open_nursery() as nursery:
            for side, command in commands.items():
                process = await trio.lowlevel.open_process(
                    command,
                    env={**os.environ, URL_ENV: url},
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
                child = children[side] = _Child(f"{what}: {side} child", process)
                nursery.start_soon(child.drain_stderr)
                if started is not None:
                    started(child.what, process.pid)
            for child in children.values():
                if (await child.line(300)).strip() != "ready":
                    raise BenchError(f"{child.what} did not say it was ready")
            order = list(children)
            done = 0
            while done < count:
                n = min(TURN_BLOCK, count - done)
                for side in order:
                    child = children[side]
                    await child.process.stdin.send_all(f"{n}\n".encode())
                    line = await child.line(120)
                    try:
                        latencies[side] += [float(x) for x in json.loads(line)]
                    except (ValueError, TypeError):
                        raise BenchError(
                            _redact(f"{child.what} answered {line[:200]!r}, not its latencies")
                        ) from None
                done += n
                order.reverse()
            for child in children.values():
                await child.process.stdin.send_all(b"quit\n")
            for child in children.values():
                with trio.fail_after(30):
                    await child.process.wait()
    except BaseExceptionGroup as group:  # the one level our nursery added
        from ._errors import reraise_unwrapped

        reraise_unwrapped(group, 1)
    finally:
        with trio.CancelScope(shield=True):
            for child in children.values():
                process = child.process
                if process.returncode is None:
                    process.kill()
                for stream in (process.stdin, process.stdout, process.stderr):
                    await stream.aclose()
                await process.wait()
    return {
        side: _latency_figures(len(values) / sum(values), values)
        for side, values in latencies.items()
    }


def _child_command(
    scenario: str,
    url: str,
    count: int,
    size: int,
    concurrency: int,
    loop: str = "asyncio",
    turns: bool = False,
) -> list[str]:
    # The URL (which may carry credentials) goes to the child in its environment, not in
    # its argv, which any user of the machine can read (ps, /proc/PID/cmdline).
    command = [
        sys.executable,
        "-m",
        "trionats._bench",
        scenario,
        _URL_FROM_ENV,
        str(count),
        str(size),
        str(concurrency),
        # A child taking turns reads its orders on stdin (and ends at its end-of-file).
        _TURNS_FLAG if turns else _PARENT_PIPE_FLAG,
    ]
    if loop == "uvloop":
        command.append(_UVLOOP_FLAG)
    elif loop == "trio":
        command.append(_TRIONATS_FLAG)
    return command


async def check_server(url: str, timeout: float = 5.0) -> str | None:
    """Fail fast when nothing answers at ``url``: a TCP connect, then the server's INFO.

    Returns the server's version from its INFO (None for a websocket URL, or when INFO
    does not say).

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
                    return _server_version(data)
    except OSError as exc:
        raise BenchError(f"no NATS server answers at {parsed.display}: {exc}") from None
    except trio.TooSlowError:
        raise BenchError(
            f"no NATS server answers at {parsed.display}: no INFO within {timeout} s"
        ) from None
    return None


def _server_version(info: bytes) -> str | None:
    """The ``version`` of a server's ``INFO {...}`` line, or None."""
    try:
        fields = json.loads(info[4:].split(b"\r\n", 1)[0])
    except ValueError:
        return None
    version = fields.get("version") if isinstance(fields, dict) else None
    return version if isinstance(version, str) else None


def machine_facts() -> dict[str, Any]:
    """CPU count, platform and versions, for the JSON report."""
    from importlib.metadata import version

    facts: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for package in ("trionats", "trio", "trio-asyncio", "nats-py", "uvloop"):
        try:
            facts[package] = version(package)
        except Exception:  # pragma: no cover - not installed as a distribution
            facts[package] = "unknown"
    return facts


# ---------------------------------------------------- repetitions, spread, report --
#: The JSON report's format: ``format`` names it, ``format_version`` changes whenever a
#: reader would need to (1: the reports written before the version was recorded, which
#: ``--compare`` still reads).
REPORT_FORMAT = "trionats-bench"
REPORT_VERSION = 2
#: The sides of a scenario, as keys of ``results[scenario]``.
SIDES = {
    "trionats": "trionats on Trio (trio.run), in a child process",
    "raw": "raw nats-py on plain asyncio (asyncio.run), in a child process",
    "raw_uvloop": "raw nats-py on uvloop (uvloop.run), in a child process",
}
#: The reference sides each trionats figure is divided by: ratio name -> side.
RATIOS = {"ratio": "raw", "ratio_uvloop": "raw_uvloop"}
#: The smallest noise band ``--compare`` uses, relative to the old median: with a single
#: repetition there is no spread to measure.
MIN_BAND = 0.02


def has_uvloop_side(scenario: str) -> bool:
    """Whether ``scenario`` also runs raw nats-py on uvloop (when uvloop is in use).

    All but the JetStream scenarios (file storage, not the event loop, sets their pace)
    and subscriber_1ms (one 1 ms callback at a time: the event loop is not what it
    measures, and it is the slowest child).
    """
    return scenario not in JS_SCENARIOS and scenario != "subscriber_1ms"


def uvloop_available() -> bool:
    """Whether uvloop can be imported (the raw children use the same interpreter)."""
    import importlib.util

    return importlib.util.find_spec("uvloop") is not None


def figure_better(figure: str) -> str:
    """``"higher"`` or ``"lower"``: which way a figure improves.

    Rates, ratios and reuse rates are better higher; times (``*_ms``, ``*_us``, ``*_s``)
    and counts of lost work (``dropped``, ``failed``, ``errors``...) better lower.
    """
    if figure.endswith(("_ms", "_us", "_s")) or figure in ("dropped", "failed", "errors", "lost"):
        return "lower"
    return "higher"


def spread(values: list[float]) -> dict[str, float]:
    """Median and spread of one figure's repetitions.

    ``n``, ``median``, ``min``, ``max`` and ``mad`` (the median absolute deviation from
    the median: robust to one disturbed repetition).
    """
    median = statistics.median(values)
    return {
        "n": len(values),
        "median": median,
        "min": min(values),
        "max": max(values),
        "mad": statistics.median(abs(v - median) for v in values),
    }


def _numeric_figures(runs: list[dict[str, Any]]) -> list[str]:
    """The figures every run has, as numbers (in the first run's order)."""
    return [
        key
        for key, value in runs[0].items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and all(isinstance(run.get(key), int | float) for run in runs)
    ]


def scenario_stats(sides: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """One scenario's figures, reduced: ``{"sides": {side: {figure: spread}}, "ratios":
    {ratio: spread}}``.

    A ratio is trionats's rate over a reference side's rate, taken per repetition (each
    repetition's trionats run against the reference runs of the same repetition, run just
    before it), then reduced like any figure: its median is the median of those ratios.
    """
    stats: dict[str, Any] = {"sides": {}, "ratios": {}}
    for side, runs in sides.items():
        if runs:
            stats["sides"][side] = {
                key: spread([float(run[key]) for run in runs]) for key in _numeric_figures(runs)
            }
    ours = sides.get("trionats", [])
    for ratio, side in RATIOS.items():
        pairs = list(zip(ours, sides.get(side, []), strict=False))
        values = [
            float(a["rate"]) / float(b["rate"])
            for a, b in pairs
            if isinstance(a.get("rate"), int | float) and isinstance(b.get("rate"), int | float)
            if b["rate"] > 0
        ]
        if values:
            stats["ratios"][ratio] = spread(values)
    return stats


def summarize(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """Median and spread of each scenario's figures, and the trionats/raw ratios, flat.

    Per scenario: ``{side}_{figure}`` (the median), ``{side}_{figure}_min``, ``_max``,
    ``_mad``; ``ratio`` (the median of the per-repetition trionats/raw ratios) with
    ``ratio_min``, ``ratio_max``, ``ratio_mad``, and the same for ``ratio_uvloop`` (against
    raw nats-py on uvloop) when that side ran.
    """
    summary: dict[str, dict[str, Any]] = {}
    for scenario, sides in results.items():
        stats = scenario_stats(sides)
        row: dict[str, Any] = {}
        for side, figures in stats["sides"].items():
            for key, s in figures.items():
                row[f"{side}_{key}"] = s["median"]
                for part in ("min", "max", "mad"):
                    row[f"{side}_{key}_{part}"] = s[part]
        for ratio, s in stats["ratios"].items():
            row[ratio] = s["median"]
            for part in ("min", "max", "mad"):
                row[f"{ratio}_{part}"] = s[part]
        summary[scenario] = row
    return summary


def _figure_notes(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """What each figure in ``results`` is: which way it improves, and its unit."""
    units = {"rate": "per second", "reuse_rate": "fraction", "dropped": "messages"}
    notes: dict[str, Any] = {}
    for sides in results.values():
        for runs in sides.values():
            for key in _numeric_figures(runs) if runs else []:
                unit = units.get(key) or (
                    "milliseconds"
                    if key.endswith("_ms")
                    else "microseconds"
                    if key.endswith("_us")
                    else "seconds"
                    if key.endswith("_s")
                    else ""
                )
                notes[key] = {"better": figure_better(key), "unit": unit}
    notes.update(
        {
            ratio: {"better": "higher", "unit": f"trionats rate / {side} rate"}
            for ratio, side in RATIOS.items()
        }
    )
    return notes


async def run_bench(
    url: str,
    scenarios: tuple[str, ...] | list[str],
    config: BenchConfig,
    progress: Callable[[str, int, str], None] | None = None,
    c_binary: str | None = None,
    duration: float | None = None,
    started: Callable[[str, int], None] | None = None,
    uvloop: bool = False,
) -> dict[str, Any]:
    """Run the scenarios against ``url``; returns the report (see ``--json``).

    Each repetition runs every scenario in turn: raw nats-py on asyncio, then (``uvloop``
    and :func:`has_uvloop_side`) raw nats-py on uvloop, then trionats, then the C client.
    ``progress(scenario, rep, side)`` is called after each single run, ``started(what,
    pid)`` when a child process starts.

    Raises:
        ValueError: an unknown scenario or a bad URL.
        BenchError: nothing answers at ``url``, uvloop was asked for and cannot be
            imported, or a child failed (with its stderr).
    """
    import datetime

    for scenario in scenarios:
        if scenario not in ALL_SCENARIOS:
            raise ValueError(
                f"unknown scenario {scenario!r}; choose from {', '.join(ALL_SCENARIOS)}"
            )
    if uvloop and not uvloop_available():
        raise BenchError("uvloop is not installed (pip install uvloop; it is in trionats[test])")
    server_version = await check_server(url)
    if any(scenario in JS_SCENARIOS for scenario in scenarios):
        await check_jetstream(url)
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for scenario in scenarios:
        results[scenario] = {"trionats": [], "raw": []}
        if uvloop and has_uvloop_side(scenario):
            results[scenario]["raw_uvloop"] = []
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
            if scenario in LATENCY_SCENARIOS:
                loops = {"raw": "asyncio", "raw_uvloop": "uvloop", "trionats": "trio"}
                turns = await _run_turns(
                    {
                        side: _child_command(
                            scenario, url, n, config.size, config.concurrency, loop, turns=True
                        )
                        for side, loop in loops.items()
                        if side in results[scenario]
                    },
                    n,
                    url,
                    f"{scenario}, rep {rep + 1}",
                    started,
                )
                for side, figures in turns.items():
                    results[scenario][side].append(figures)
                    if progress:
                        progress(scenario, rep, side)
                continue
            for side, loop in (("raw", "asyncio"), ("raw_uvloop", "uvloop")):
                if side not in results[scenario]:
                    continue
                raw = await _run_child(
                    _child_command(scenario, url, n, config.size, config.concurrency, loop),
                    f"raw nats-py child{' on uvloop' if side == 'raw_uvloop' else ''} "
                    f"({scenario}, rep {rep + 1})",
                    started,
                    url,
                )
                results[scenario][side].append(raw)
                if progress:
                    progress(scenario, rep, side)
            # In a fresh child as well, like the raw sides: not in this process, whose
            # progress-bar thread, server supervision and heap would weigh on it alone.
            ours = await _run_child(
                _child_command(scenario, url, n, config.size, config.concurrency, "trio"),
                f"trionats child ({scenario}, rep {rep + 1})",
                started,
                url,
            )
            results[scenario]["trionats"].append(ours)
            if progress:
                progress(scenario, rep, "trionats")
            if c_binary is not None and scenario in C_SCENARIOS:
                c = await _run_child(
                    [c_binary, scenario, _URL_FROM_ENV, str(n), str(config.size)],
                    f"C client ({scenario}, rep {rep + 1})",
                    started,
                    url,
                )
                c_results.setdefault(scenario, []).append(c)
    summary = summarize(results)
    for scenario, runs in c_results.items():
        c_stats = spread([float(run["rate"]) for run in runs])
        summary[scenario]["c_rate"] = c_stats["median"]
        summary[scenario]["c_rate_min"] = c_stats["min"]
        summary[scenario]["c_rate_max"] = c_stats["max"]
    machine = machine_facts()
    machine["nats-server"] = server_version or "unknown"
    return {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "date": date,
        "machine": machine,
        "config": {**asdict(config), "uvloop": uvloop, "duration": duration},
        "counts": counts,
        "sides": {side: text for side, text in SIDES.items() if side != "raw_uvloop" or uvloop},
        "figures": _figure_notes(results),
        "results": results,
        "c_client": c_results,
        "stats": {scenario: scenario_stats(sides) for scenario, sides in results.items()},
        "summary": summary,
    }


# --------------------------------------------------------------------- --compare --
def load_report(path: str) -> dict[str, Any]:
    """Read and check a report written by ``--json``, for ``--compare``.

    Raises:
        BenchError: the file cannot be read, is not JSON, is not a bench report, or was
            written in a format this version cannot read; one line saying which.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise BenchError(f"cannot read --compare {path}: {why}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BenchError(f"--compare {path} is not JSON: {exc}") from None
    try:
        return check_report(data)
    except ValueError as exc:
        raise BenchError(f"--compare {path}: {exc}") from None


def check_report(data: Any) -> dict[str, Any]:
    """``data`` if it is a bench report this version can compare; else ValueError (why).

    A report has ``results``: ``{scenario: {side: [{figure: number}, ...]}}``, each run a
    repetition. ``format_version`` 1 (no ``format`` key: the reports written before it
    was recorded) and 2 are read.
    """
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError('not a trionats bench report (no "results" object; write one with --json)')
    fmt = data.get("format", REPORT_FORMAT)
    if fmt != REPORT_FORMAT:
        raise ValueError(f"not a trionats bench report (format {fmt!r})")
    version = data.get("format_version", 1)
    if not isinstance(version, int) or not 1 <= version <= REPORT_VERSION:
        raise ValueError(
            f"format_version {version!r} is not one this trionats reads (1..{REPORT_VERSION}): "
            "written by a newer trionats?"
        )
    for scenario, sides in data["results"].items():
        if not isinstance(sides, dict):
            raise ValueError(f"results[{scenario!r}] is not an object of sides")
        for side, runs in sides.items():
            if not isinstance(runs, list) or not all(isinstance(run, dict) for run in runs):
                raise ValueError(f"results[{scenario!r}][{side!r}] is not a list of runs")
    if not any(runs for sides in data["results"].values() for runs in sides.values()):
        raise ValueError("it holds no results")
    return data


def _object(report: dict[str, Any], key: str) -> dict[str, Any]:
    value = report.get(key)
    return value if isinstance(value, dict) else {}


def check_comparable(old: dict[str, Any], config: BenchConfig, scenarios: list[str]) -> list[str]:
    """Before the run: that ``old`` measured the same workload as this run will.

    Returns warnings (differences that make figures move without being errors: message
    counts, the machine).

    Raises:
        BenchError: another payload size or concurrency, or no scenario in common.
    """
    old_config = _object(old, "config")
    for name in ("size", "concurrency"):
        value = old_config.get(name)
        if value is not None and value != getattr(config, name):
            raise BenchError(
                f"the --compare report ran with --{name} {value}, this run with "
                f"--{name} {getattr(config, name)}: compare like with like"
            )
    common = [s for s in scenarios if s in old["results"]]
    if not common:
        raise BenchError(
            f"the --compare report has none of the scenarios to run ({', '.join(scenarios)}); "
            f"it has {', '.join(old['results']) or 'none'}"
        )
    warnings = []
    old_counts = _object(old, "counts")
    if old_config.get("reps", 2) < 2:
        warnings.append("the old report has 1 repetition per figure: its spread is not measured")
    if config.reps < 2:
        warnings.append("this run has 1 repetition per figure: its spread is not measured")
    changed = [
        s for s in common if old_counts.get(s) is not None and old_counts[s] != config.count_for(s)
    ]
    if changed and old_config.get("duration") is None:
        warnings.append(
            f"other message counts than the old report ({', '.join(changed)}): figures may "
            "move with the count"
        )
    machine = _object(old, "machine")
    if machine.get("cpu_count") not in (None, os.cpu_count()):
        warnings.append(
            f"the old report ran on {machine['cpu_count']} CPUs, this machine has {os.cpu_count()}"
        )
    return warnings


@dataclass(frozen=True)
class Change:
    """One figure of one scenario, old run against new run (see :func:`compare_reports`).

    ``what`` is a side (``trionats``, ``raw``, ``raw_uvloop``) or a ratio (``ratio``,
    ``ratio_uvloop``); ``ours`` is False for the reference sides, whose changes say the
    machine or the load moved, not trionats. ``change_pct`` is None when the old median
    is 0, ``band_pct`` too, or when there is no band. ``verdict``: ``"worse"`` or
    ``"better"`` when the change is beyond the noise band, ``"noise"`` within it,
    ``"unmeasured"`` when neither run had two repetitions.
    """

    scenario: str
    what: str
    figure: str
    old: float
    new: float
    change_pct: float | None
    band_pct: float | None
    verdict: str
    ours: bool

    @property
    def regression(self) -> bool:
        """A trionats figure or a ratio got worse beyond the noise band."""
        return self.ours and self.verdict == "worse"


def _change(
    scenario: str, what: str, figure: str, old: dict[str, float], new: dict[str, float]
) -> Change:
    """One figure's verdict under the noise rule (see :func:`compare_reports`)."""
    delta = new["median"] - old["median"]
    base = abs(old["median"])
    halves = [(s["max"] - s["min"]) / 2 if s["n"] >= 2 else None for s in (old, new)]
    measured = [h for h in halves if h is not None]
    band: float | None = None
    if measured:  # a run of one repetition borrows the other run's spread
        band = max(MIN_BAND * base, sum(measured) * 2 / len(measured))
    if band is None:
        verdict = "unmeasured"
    elif abs(delta) <= band:
        verdict = "noise"
    else:
        up = delta > 0
        verdict = "better" if up == (figure_better(figure) == "higher") else "worse"
    return Change(
        scenario=scenario,
        what=what,
        figure=figure,
        old=old["median"],
        new=new["median"],
        change_pct=100 * delta / base if base else None,
        band_pct=100 * band / base if base and band is not None else None,
        verdict=verdict,
        ours=what not in SIDES or what == "trionats",
    )


def compare_reports(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every figure present in both reports, old median against new median.

    Pure: works on two reports as written by ``--json`` (format 1 or 2), recomputing each
    figure's median and spread from the repetitions in ``results``. Order: the new
    report's scenarios, then sides (trionats first), then ratios.

    The noise rule, per figure: each run's half-range ``h = (max - min) / 2`` over its
    repetitions; ``band = max(2% of the old median, h_old + h_new)``, where a run of a
    single repetition (no spread) takes the other run's ``h``. The change (new median -
    old median) is ``"noise"`` within the band, else ``"better"`` or ``"worse"`` by the
    figure's direction (:func:`figure_better`); ``"unmeasured"`` when neither run
    repeated (no band, nothing flagged). A worse trionats figure or ratio is a regression.
    """
    changes: list[Change] = []
    for scenario, new_sides in new["results"].items():
        old_sides = old["results"].get(scenario)
        if not old_sides:
            continue
        a, b = scenario_stats(old_sides), scenario_stats(new_sides)
        order = ["trionats"] + [side for side in b["sides"] if side != "trionats"]
        for side in order:
            for figure, s in b["sides"].get(side, {}).items():
                if figure in a["sides"].get(side, {}):
                    changes.append(_change(scenario, side, figure, a["sides"][side][figure], s))
        for ratio, s in b["ratios"].items():
            if ratio in a["ratios"]:
                changes.append(_change(scenario, ratio, ratio, a["ratios"][ratio], s))
    return changes


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


if __name__ == "__main__":  # a child process: raw nats-py, or trionats with --trionats
    if _PARENT_PIPE_FLAG in sys.argv:
        sys.argv.remove(_PARENT_PIPE_FLAG)
        _exit_when_stdin_closes()
    _loop = "asyncio"
    if _UVLOOP_FLAG in sys.argv:
        sys.argv.remove(_UVLOOP_FLAG)
        _loop = "uvloop"
    elif _TRIONATS_FLAG in sys.argv:
        sys.argv.remove(_TRIONATS_FLAG)
        _loop = "trio"
    _turns_mode = _TURNS_FLAG in sys.argv
    if _turns_mode:
        sys.argv.remove(_TURNS_FLAG)
    _scenario, _url, _count, _size, _conc = sys.argv[1:6]
    if _url == _URL_FROM_ENV:
        _url = os.environ[URL_ENV]
    _args = (_scenario, _url, int(_count), int(_size), int(_conc))
    if _loop == "trio":
        import trio

        _result = trio.run(functools.partial(trionats_scenario, *_args, turns=_turns_mode))
    else:
        _result = raw_scenario(*_args, _loop, _turns_mode)
    if not _turns_mode:
        print(json.dumps(_result))
