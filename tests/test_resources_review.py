"""Review fixes for the resource manager and the Prometheus export."""

from __future__ import annotations

import pytest
from polling import wait_until

import trionats


async def test_a_snapshot_over_max_payload_is_counted_not_raised(nats_url: str) -> None:
    # A snapshot the server refuses (over its max_payload) is a publish error: the
    # sampler keeps running and the application's block is not torn down.
    async with trionats.open_connection(nats_url) as nc:
        big = "x" * (nc.max_payload + 1)
        async with trionats.open_resource_manager(interval=0.01, publish_on=nc, name=big) as rm:
            await wait_until(lambda: rm.publish_errors >= 2)
            assert rm.published == 0
            assert rm.samples >= 2


@pytest.mark.parametrize(
    ("buckets", "error", "text"),
    [
        ((0.1, float("inf")), ValueError, r"buckets\[1\].*inf"),
        ((float("nan"),), ValueError, r"buckets\[0\].*nan"),
        (("0.1", "1"), TypeError, r"buckets\[0\].*'0.1'"),
        ((0.0, 1.0), ValueError, r"buckets\[0\]"),
        (5, TypeError, "buckets.*int: 5"),
        ("0.1", TypeError, "buckets.*str: '0.1'"),
    ],
)
async def test_prometheus_buckets_are_validated(
    buckets: object, error: type[Exception], text: str
) -> None:
    import trionats.prometheus as tp

    async with trionats.open_resource_manager(interval=60) as rm:
        with pytest.raises(error, match=text):
            tp.TrionatsCollector(rm, buckets=buckets)  # type: ignore[arg-type]


async def test_top_ignores_a_malformed_snapshot(
    nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import trio

    from trionats._resources import SCHEMA
    from trionats._top import top

    bad = [
        {"type": SCHEMA, "id": "a", "interval": 0.05, "pools": [{"name": "p"}]},
        {"type": SCHEMA, "id": "b", "interval": "soon"},
        {"type": SCHEMA, "id": "c", "interval": 0.05, "process": []},
    ]
    async with (
        trionats.open_connection(nats_url) as nc,
        trionats.open_resource_manager(
            interval=0.05, publish_on=nc, publish_subject="rv.stats", name="good-svc"
        ),
        trio.open_nursery() as nursery,
    ):

        async def junk() -> None:
            while True:
                for body in bad:
                    await nc.publish(f"rv.stats.{body['id']}", json.dumps(body).encode())
                await trio.sleep(0.01)

        nursery.start_soon(junk)
        received = await top(nats_url, once=True, duration=30, subject="rv.stats", plain=True)
        nursery.cancel_scope.cancel()
    assert received >= 1
    out = capsys.readouterr().out
    assert out.count("process good-svc (id ") == 1, out
