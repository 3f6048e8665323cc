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
