"""A subscriber whose handlers sometimes fail or hang: counted, isolated, stopped cleanly.

Run ``trionats server --port 4222`` first (or set ``NATS_URL``), then
``python examples/subscriber_handlers.py``.
"""

import logging
import os

import trio

import trionats

NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")


async def handle(msg: trionats.Msg) -> bytes | None:
    n = int(msg.data)
    if n % 10 == 3:
        raise ValueError(f"job {n} is invalid")  # counted as failed, logged once
    if n % 10 == 7:
        await trio.sleep(60)  # hangs: cut by handler_timeout, counted as timed_out
    await trio.sleep(0.001)  # the work
    return b"done %d" % n  # the reply, when the message was a request


async def main() -> None:
    # Each failing handler is logged once, with its traceback, on "trionats.subscriber";
    # here they fail on purpose, so keep the output to the figures.
    logging.getLogger("trionats.subscriber").setLevel(logging.CRITICAL)
    config = trionats.SubscriberConfig(max_workers=16, handler_timeout=0.5, stop_timeout=2)
    async with (
        trionats.open_connection(NATS_URL) as nc,
        trionats.open_subscriber(nc, config) as subscriber,
    ):
        handle_ = await subscriber.start("jobs.*", handle, queue="workers")
        for n in range(100):
            await nc.publish(f"jobs.{n % 4}", b"%d" % n)
        reply = await nc.request("jobs.x", b"42", timeout=5)  # a request gets the reply
        print(reply.data)

        with trio.fail_after(10):  # bounded polling until every message is accounted for
            while (s := handle_.stats()).processed + s.failed + s.timed_out < 101:  # noqa: ASYNC110
                await trio.sleep(0.01)
        # A clean stop: unsubscribe, let in-flight handlers finish (2 s), cancel the rest.
        await handle_.stop()
        stats = subscriber.stats()
        print(
            f"received {stats.received}: processed {stats.processed}, failed {stats.failed}, "
            f"timed out {stats.timed_out}, dropped {stats.dropped}"
        )
        assert (stats.processed, stats.failed, stats.timed_out) == (81, 10, 10)


if __name__ == "__main__":
    trio.run(main)
