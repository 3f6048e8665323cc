"""The public surface: names, import side effects, module metadata."""

from __future__ import annotations

import inspect
import subprocess
import sys

import trionats


def test_public_names_are_pinned() -> None:
    expected = {
        "ConnectError",
        "Connection",
        "ConnectionClosedError",
        "ConnectionEvent",
        "ConnectionStats",
        "EventKind",
        "EventStream",
        "LeaseExpiredError",
        "Msg",
        "NatsServer",
        "NoRespondersError",
        "PoolClosedError",
        "PoolTimeoutError",
        "ReconnectBufferFullError",
        "ServerNotFoundError",
        "Subscription",
        "SubscriptionClosedError",
        "TimeoutError",
        "TrionatsError",
        "find_nats_server",
        "open_connection",
        "open_nats_cluster",
        "open_nats_server",
        "PoolConfig",
        "CloseReason",
        "CloseStats",
        "Pool",
        "PoolStats",
        "ServerStats",
        "open_pool",
        "Handler",
        "Subscriber",
        "SubscriberConfig",
        "SubscriberStats",
        "SubscriptionHandle",
        "open_subscriber",
        "AckPolicy",
        "ConsumerInfo",
        "DeliverPolicy",
        "JetStream",
        "JetStreamError",
        "JsMsg",
        "MsgAlreadyAckedError",
        "MsgMetadata",
        "PubAck",
        "PullSubscription",
        "StreamInfo",
        "JetStreamHandle",
        "JsHandler",
        "KeyNotFoundError",
        "KeyValue",
        "KvEntry",
        "PubAckFuture",
        "Publisher",
        "BatchHandle",
        "BatchHandler",
        "BatchPublishError",
        "BatchPublisher",
        "BatchPublisherStats",
        "open_batch_publisher",
        "OperationReport",
        "PerformanceProfiler",
        "ProfilerReport",
        "Trend",
        "TrendReport",
        "WindowReport",
    }
    assert expected <= set(trionats.__all__)
    for name in trionats.__all__:
        assert hasattr(trionats, name), name


def test_connect_without_a_context_manager_is_not_public() -> None:
    """``connect()`` needs an asyncio loop that something must own and close; from a plain
    ``trio.run`` it could only fail. Users open connections with ``open_connection``."""
    assert "connect" not in trionats.__all__
    assert not hasattr(trionats, "connect")


def test_public_objects_show_the_public_module() -> None:
    for name in trionats.__all__:
        obj = getattr(trionats, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):  # not the Handler type alias
            assert obj.__module__ == "trionats", (name, obj.__module__)


def test_every_error_derives_from_trionats_error() -> None:
    for name in trionats.__all__:
        obj = getattr(trionats, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, trionats.TrionatsError), name


def test_import_does_not_load_trio_asyncio_or_nats() -> None:
    """Importing trio_asyncio replaces asyncio's loop policy for the whole process."""
    code = (
        "import sys, asyncio, trionats, trionats.testing\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trio_asyncio', 'nats'))\n"
        "print(bad)\n"
        "assert type(asyncio.get_event_loop_policy()).__module__.startswith('asyncio'), "
        "asyncio.get_event_loop_policy()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
