"""A service that stops cleanly on SIGTERM (or Ctrl-C): in-flight work finishes first.

Run ``trionats server --port 4222`` first (or set ``NATS_URL``), then
``python examples/graceful_shutdown.py`` and stop it with Ctrl-C or ``kill <pid>``.

On the signal: stop taking messages (unsubscribe), give the handlers in flight up to
``stop_timeout`` to finish and reply, close the connection, exit 0.
"""

import os
import signal

import trio

import trionats

NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")


async def handle(msg: trionats.Msg) -> bytes:
    print(f"working on {msg.data.decode()}", flush=True)
    await trio.sleep(0.5)  # slow work: a shutdown in the middle lets it finish
    return b"handled " + msg.data


async def main() -> None:
    config = trionats.SubscriberConfig(max_workers=8, stop_timeout=5)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with (
            trionats.open_connection(NATS_URL, name="shutdown-example") as nc,
            trionats.open_subscriber(nc, config) as subscriber,
        ):
            handle_ = await subscriber.start("svc.work", handle, queue="svc")
            print(f"ready (pid {os.getpid()})", flush=True)
            async for signum in signals:
                print(f"got {signal.Signals(signum).name}: stopping", flush=True)
                break
            await handle_.stop()  # unsubscribe, then let in-flight handlers finish
            stats = subscriber.stats()
            print(
                f"stopped cleanly: processed {stats.processed}, "
                f"cancelled {stats.cancelled}, in flight {stats.in_flight}",
                flush=True,
            )


if __name__ == "__main__":
    trio.run(main)
