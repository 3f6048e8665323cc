"""Production monitoring: a resource manager watching a pool, a subscriber and a
connection, alerts as they happen, health and suggestions, a Prometheus scrape endpoint,
and snapshots published for `trionats top`.

Run against a server (`trionats server --port 4222`), or set NATS_URL:

    python production_monitoring.py

While it runs, `trionats top --url nats://127.0.0.1:4222` shows it live.
"""

from __future__ import annotations

import os

import trio

import trionats
import trionats.prometheus

URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")


async def scrape(port: int) -> str:
    """What Prometheus would read from the endpoint."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data.partition(b"\r\n\r\n")[2].decode()


async def main() -> None:
    pool_config = trionats.PoolConfig(servers=[URL], idle_per_server=2, max_per_server=4)
    # A small subscriber on purpose: bursts overflow its buffer and the manager says so.
    sub_config = trionats.SubscriberConfig(max_workers=2, pending_msgs=20)
    limits = trionats.Limits(max_pending_msgs=10, max_handler_p99=0.5)
    async with (
        trionats.open_connection(URL, name="monitoring") as nc,
        trionats.open_pool(pool_config) as pool,
        trionats.open_subscriber(pool, sub_config) as subscriber,
        trionats.open_resource_manager(
            interval=0.5, limits=limits, publish_on=nc, name="orders-service"
        ) as rm,
        trionats.prometheus.serve(rm, port=0) as endpoint,
        trio.open_nursery() as nursery,
    ):
        rm.register_pool("main", pool)
        rm.register_subscriber("orders", subscriber)
        rm.register_connection("events", nc)
        print(f"metrics at {endpoint.url}; snapshots on {rm.publish_subject}")

        async def watch_alerts(alerts: trionats.AlertStream) -> None:
            async for alert in alerts:
                print("ALERT" if not alert.cleared else "CLEARED", alert.message)

        nursery.start_soon(watch_alerts, rm.alerts())

        async def handle(msg: trionats.Msg) -> None:
            await trio.sleep(0.01)  # some work

        await subscriber.start("orders.*", handle)
        async with pool.borrow() as publisher:
            for i in range(200):  # a burst: more than two workers and 20 buffered can take
                await publisher.publish(f"orders.{i % 8}", b"order %d" % i)
            await publisher.flush()
        with trio.fail_after(20):
            while (s := subscriber.stats()).processed + s.dropped < 200:  # noqa: ASYNC110
                await trio.sleep(0.05)

        snap = rm.sample_now()
        orders = snap.component("orders")
        assert isinstance(orders, trionats.SubscriberSnapshot)
        print(
            f"orders: processed {orders.stats.processed}, dropped {orders.stats.dropped}, "
            f"p99 {orders.handler_duration.p99 * 1000:.0f} ms"
        )
        health = rm.health()
        print(f"health: {health.status.value}")
        for reason in health.reasons:
            print(f"  {reason}")
        for advice in rm.suggestions():
            print(f"suggestion [{advice.rule}]: {advice.text}")

        metrics = await scrape(endpoint.port)
        for line in metrics.splitlines():
            if line.startswith(("trionats_messages_processed_total", "trionats_pool_connections{")):
                print(line)
        nursery.cancel_scope.cancel()
    print("stopped: sampler, endpoint and alert watcher ended with their blocks")


if __name__ == "__main__":
    trio.run(main)
