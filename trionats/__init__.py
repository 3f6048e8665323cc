"""trionats: a Trio-native NATS client with a connection pool and a concurrent subscriber.

Every connection, subscription and worker lives inside a nursery the caller opened, so
nothing can leak; every timeout is a Trio cancel scope. Under the hood it drives nats-py
through trio-asyncio, which is imported only when the first connection opens (importing
trio_asyncio replaces asyncio's event loop policy for the whole process).

Layers (imports point downward only)::

    _subscriber, _pool   ->   _connection   ->   _bridge (asyncio, trio_asyncio, nats)
"""

from ._batch import BatchPublisher as BatchPublisher
from ._batch import BatchPublishError as BatchPublishError
from ._batch import BatchPublisherStats as BatchPublisherStats
from ._batch import open_batch_publisher as open_batch_publisher
from ._config import PoolConfig as PoolConfig
from ._connect import open_connection as open_connection
from ._connection import Connection as Connection
from ._connection import ConnectionStats as ConnectionStats
from ._errors import ConnectError as ConnectError
from ._errors import ConnectionClosedError as ConnectionClosedError
from ._errors import JetStreamError as JetStreamError
from ._errors import LeaseExpiredError as LeaseExpiredError
from ._errors import NoRespondersError as NoRespondersError
from ._errors import PoolClosedError as PoolClosedError
from ._errors import PoolTimeoutError as PoolTimeoutError
from ._errors import ReconnectBufferFullError as ReconnectBufferFullError
from ._errors import ServerNotFoundError as ServerNotFoundError
from ._errors import SubscriptionClosedError as SubscriptionClosedError
from ._errors import TimeoutError as TimeoutError
from ._errors import TrionatsError as TrionatsError
from ._events import ConnectionEvent as ConnectionEvent
from ._events import EventKind as EventKind
from ._events import EventStream as EventStream
from ._jetstream import AckPolicy as AckPolicy
from ._jetstream import ConsumerInfo as ConsumerInfo
from ._jetstream import DeliverPolicy as DeliverPolicy
from ._jetstream import JetStream as JetStream
from ._jetstream import JsMsg as JsMsg
from ._jetstream import MsgAlreadyAckedError as MsgAlreadyAckedError
from ._jetstream import MsgMetadata as MsgMetadata
from ._jetstream import PubAck as PubAck
from ._jetstream import PubAckFuture as PubAckFuture
from ._jetstream import Publisher as Publisher
from ._jetstream import PullSubscription as PullSubscription
from ._jetstream import StreamInfo as StreamInfo
from ._kv import KeyNotFoundError as KeyNotFoundError
from ._kv import KeyValue as KeyValue
from ._kv import KvEntry as KvEntry
from ._metrics import LatencySnapshot as LatencySnapshot
from ._msg import Msg as Msg
from ._pool import CloseReason as CloseReason
from ._pool import CloseStats as CloseStats
from ._pool import Pool as Pool
from ._pool import PoolStats as PoolStats
from ._pool import ServerStats as ServerStats
from ._pool import open_pool as open_pool
from ._profiler import OperationReport as OperationReport
from ._profiler import PerformanceProfiler as PerformanceProfiler
from ._profiler import ProfilerReport as ProfilerReport
from ._profiler import Trend as Trend
from ._profiler import TrendReport as TrendReport
from ._profiler import WindowReport as WindowReport
from ._resources import Alert as Alert
from ._resources import AlertStream as AlertStream
from ._resources import ComponentHealth as ComponentHealth
from ._resources import ConnectionSnapshot as ConnectionSnapshot
from ._resources import Health as Health
from ._resources import HealthStatus as HealthStatus
from ._resources import Limits as Limits
from ._resources import PoolSnapshot as PoolSnapshot
from ._resources import ProcessStats as ProcessStats
from ._resources import Registration as Registration
from ._resources import ResourceManager as ResourceManager
from ._resources import Severity as Severity
from ._resources import SubscriberSnapshot as SubscriberSnapshot
from ._resources import Suggestion as Suggestion
from ._resources import SystemStats as SystemStats
from ._resources import open_resource_manager as open_resource_manager
from ._server import NatsServer as NatsServer
from ._server import find_nats_server as find_nats_server
from ._server import open_nats_cluster as open_nats_cluster
from ._server import open_nats_server as open_nats_server
from ._subscriber import Handler as Handler
from ._subscriber import JetStreamHandle as JetStreamHandle
from ._subscriber import JsHandler as JsHandler
from ._subscriber import Subscriber as Subscriber
from ._subscriber import SubscriberConfig as SubscriberConfig
from ._subscriber import SubscriberStats as SubscriberStats
from ._subscriber import SubscriptionHandle as SubscriptionHandle
from ._subscriber import open_subscriber as open_subscriber
from ._subscriber_batch import BatchHandle as BatchHandle
from ._subscriber_batch import BatchHandler as BatchHandler
from ._subscription import Subscription as Subscription
from ._validate import ServerURL as ServerURL

__version__ = "0.1.0.dev0"

__all__ = [
    "AckPolicy",
    "Alert",
    "AlertStream",
    "BatchHandle",
    "BatchHandler",
    "BatchPublishError",
    "BatchPublisher",
    "BatchPublisherStats",
    "CloseReason",
    "CloseStats",
    "ComponentHealth",
    "ConnectError",
    "Connection",
    "ConnectionClosedError",
    "ConnectionEvent",
    "ConnectionSnapshot",
    "ConnectionStats",
    "ConsumerInfo",
    "DeliverPolicy",
    "EventKind",
    "EventStream",
    "Handler",
    "Health",
    "HealthStatus",
    "JetStream",
    "JetStreamError",
    "JetStreamHandle",
    "JsHandler",
    "JsMsg",
    "KeyNotFoundError",
    "KeyValue",
    "KvEntry",
    "LatencySnapshot",
    "LeaseExpiredError",
    "Limits",
    "Msg",
    "MsgAlreadyAckedError",
    "MsgMetadata",
    "NatsServer",
    "NoRespondersError",
    "OperationReport",
    "PerformanceProfiler",
    "Pool",
    "PoolClosedError",
    "PoolConfig",
    "PoolSnapshot",
    "PoolStats",
    "PoolTimeoutError",
    "ProcessStats",
    "ProfilerReport",
    "PubAck",
    "PubAckFuture",
    "Publisher",
    "PullSubscription",
    "ReconnectBufferFullError",
    "Registration",
    "ResourceManager",
    "ServerNotFoundError",
    "ServerStats",
    "ServerURL",
    "Severity",
    "StreamInfo",
    "Subscriber",
    "SubscriberConfig",
    "SubscriberSnapshot",
    "SubscriberStats",
    "Subscription",
    "SubscriptionClosedError",
    "SubscriptionHandle",
    "Suggestion",
    "SystemStats",
    "TimeoutError",
    "Trend",
    "TrendReport",
    "TrionatsError",
    "WindowReport",
    "find_nats_server",
    "open_batch_publisher",
    "open_connection",
    "open_nats_cluster",
    "open_nats_server",
    "open_pool",
    "open_resource_manager",
    "open_subscriber",
]


def __getattr__(name: str) -> object:
    """``trionats.prometheus`` without importing it first (it needs prometheus-client)."""
    if name == "prometheus":
        import importlib

        return importlib.import_module("trionats.prometheus")
    raise AttributeError(f"module 'trionats' has no attribute {name!r}")


def _fixup_module_metadata() -> None:
    """Show the public path (``trionats.X``) in reprs, tracebacks and docs."""
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("trionats._"):
            obj.__module__ = "trionats"


_fixup_module_metadata()
del _fixup_module_metadata
