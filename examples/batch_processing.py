"""Batches end to end: a batch publisher feeds a batch handler, a profiler times both.

A producer publishes 5,000 events through ``open_batch_publisher`` (one flush per batch
instead of one per message); a subscriber hands them to ``store`` in lists of up to 200
(one "bulk insert" per list); a ``PerformanceProfiler`` tracks the bulk inserts' latency
and throughput and the publisher's batches.

Run ``trionats server --port 4222`` first (or set ``NATS_URL``), then
``python examples/batch_processing.py``.
"""

import os

import trio

import trionats

NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
EVENTS = 5000


async def main() -> None:
    profiler = trionats.PerformanceProfiler(window=1.0, windows=10)
    stored: list[bytes] = []

    @profiler.timed("bulk_insert")
    async def store(msgs: list[trionats.Msg]) -> None:
        await trio.sleep(0.002)  # the database round trip, once per list
        stored.extend(m.data for m in msgs)

    config = trionats.SubscriberConfig(max_workers=400)
    async with (
        trionats.open_connection(NATS_URL, name="consumer") as subc,
        trionats.open_connection(NATS_URL, name="producer") as pub,
        trionats.open_subscriber(subc, config) as subscriber,
    ):
        handle = await subscriber.start_batch("events.demo", store, max_batch=200, max_wait=0.02)
        async with (
            profiler.measure("produce"),
            trionats.open_batch_publisher(pub, max_batch=500) as bp,
        ):
            for i in range(EVENTS):
                await bp.publish("events.demo", b"event %d" % i)
        sent = bp.stats()
        print(f"published {sent.sent}, lost {sent.lost}, in {sent.batches} batches")
        with trio.fail_after(30):  # bounded polling until every event is stored
            while handle.stats().processed < EVENTS:  # noqa: ASYNC110 - no event to wait on
                await trio.sleep(0.01)
        stats = handle.stats()
        print(f"stored {len(stored)} events: processed {stats.processed}, dropped {stats.dropped}")

    report = profiler.report()
    inserts = report["bulk_insert"]
    print(
        f"bulk inserts: {inserts.count} runs, {len(stored) / inserts.count:.0f} events per run, "
        f"p50 {inserts.p50 * 1000:.1f} ms, p99 {inserts.p99 * 1000:.1f} ms"
    )
    print(f"producing took {report['produce'].latency.max * 1000:.0f} ms")
    assert sorted(stored, key=lambda d: int(d.split()[1])) == [
        b"event %d" % i for i in range(EVENTS)
    ]


trio.run(main)
