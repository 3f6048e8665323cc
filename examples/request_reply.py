"""A request/reply service and its clients on one connection each.

Run ``trionats server --port 4222`` first (or set ``NATS_URL``), then
``python examples/request_reply.py``.
"""

import os

import trio

import trionats

NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")


async def serve(nc: trionats.Connection, task_status: trio.TaskStatus[None]) -> None:
    """Answer ``math.double`` requests until cancelled."""
    async with nc.subscribe("math.double", queue="doublers") as sub:
        task_status.started()  # subscribed: requests sent from now on are answered
        async for msg in sub:
            await msg.respond(b"%d" % (2 * int(msg.data)))


async def main() -> None:
    async with (
        trionats.open_connection(NATS_URL, name="service") as service,
        trionats.open_connection(NATS_URL, name="client") as client,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(serve, service)

        results: dict[int, int] = {}

        async def ask(n: int) -> None:
            reply = await client.request("math.double", b"%d" % n, timeout=2)
            results[n] = int(reply.data)

        async with trio.open_nursery() as askers:  # 100 requests in flight at once
            for n in range(100):
                askers.start_soon(ask, n)
        assert all(results[n] == 2 * n for n in range(100))
        print(f"{len(results)} concurrent requests answered")

        try:
            await client.request("math.triple", b"1", timeout=2)
        except trionats.NoRespondersError as exc:  # nobody subscribes to it: at once
            print("no responders:", exc)

        nursery.cancel_scope.cancel()  # stop the service


if __name__ == "__main__":
    trio.run(main)
