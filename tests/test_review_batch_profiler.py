"""Review fixes: the batch publisher sends what it accepted; profiler.record validates."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from polling import wait_until

import trionats
from trionats import PerformanceProfiler


async def test_batch_publish_sends_the_data_and_headers_as_accepted(nats_url: str) -> None:
    # The caller reuses its buffer and headers dict once publish has returned (the
    # message waits in the batch until it is flushed): what goes out is what was accepted.
    got: list[tuple[bytes, str | None]] = []

    async def collect(sub: trionats.Subscription) -> None:
        async for msg in sub:
            got.append((msg.data, (msg.headers or {}).get("k")))
            if len(got) == 3:
                return

    async with (
        trionats.open_connection(nats_url) as pub,
        trionats.open_connection(nats_url) as subc,
        subc.subscribe("bp.reuse") as sub,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(collect, sub)
        async with trionats.open_batch_publisher(pub, max_batch=1000, max_delay=600) as bp:
            buf = bytearray(b"one")
            headers = {"k": "1"}
            await bp.publish("bp.reuse", buf, headers=headers)
            buf[:] = b"two"
            headers["k"] = "2"
            await bp.publish("bp.reuse", memoryview(buf), headers=headers)
            buf[:] = b"xxx"
            headers["k"] = "x" * (pub.max_payload + 1)  # over max_payload, after the check
            await bp.publish("bp.reuse", b"three")
            buf[:] = b"yyy"
        assert bp.stats().sent == 3
        assert bp.error is None
        with trio.fail_after(10):
            await wait_until(lambda: len(got) == 3)
    assert got == [(b"one", "1"), (b"two", "2"), (b"three", None)]


@pytest.mark.parametrize("error", ["yes", 1, None])
async def test_profiler_record_error_must_be_a_bool(error: object) -> None:
    profiler = PerformanceProfiler()
    with pytest.raises(TypeError, match="error"):
        profiler.record("op", 0.1, error=error)  # type: ignore[arg-type]
    assert "op" not in profiler.report()
