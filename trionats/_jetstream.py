"""JetStream, built natively on :class:`~trionats.Connection` (no asyncio round trip).

The JetStream API is JSON requests on ``$JS.API.>`` subjects, sent with the connection's
request mux. Pull consumers are ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>``
requests whose messages arrive on an inbox subscription with a
``$JS.ACK.<stream>.<consumer>.<delivered>.<stream_seq>.<consumer_seq>.<ts_ns>.<pending>``
reply subject (also the newer form with domain and account hash tokens), from which each
message's metadata is parsed. Status messages (404 no messages, 408 request expired, 409
...) are headers-only messages. Acks are publishes to the reply subject (``+ACK``,
``-NAK`` with an optional ``{"delay": ns}``, ``+WPI``, ``+TERM``); ``ack_sync`` is a
request with the ack as payload.

Cancellation follows the connection's publish contract: an ack (or nak, term, in
progress) that raises ``Cancelled`` sent nothing; one that returned was queued.
"""

from __future__ import annotations

import datetime
import enum
import itertools
import json
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, final

import trio
from trio.lowlevel import checkpoint_if_cancelled

from . import _errors
from ._errors import JetStreamError
from ._request import _Pending
from ._validate import (
    _PUBLISH_OK,
    check_data,
    check_headers,
    check_int,
    check_publish_subject,
    check_seconds,
)

if TYPE_CHECKING:
    from ._connection import Connection
    from ._kv import KeyValue
    from ._msg import Msg
    from ._subscription import Subscription

__all__ = [
    "AckPolicy",
    "ConsumerInfo",
    "DeliverPolicy",
    "JetStream",
    "JsMsg",
    "MsgAlreadyAckedError",
    "MsgMetadata",
    "PubAck",
    "PubAckFuture",
    "Publisher",
    "PullSubscription",
    "StreamInfo",
]

_API = "$JS.API."
_ACK_PREFIX = "$JS.ACK."
_STATUS = "Status"
_DESCRIPTION = "Description"
_PENDING_MSGS = "Nats-Pending-Messages"
_NS = 1_000_000_000


class MsgAlreadyAckedError(JetStreamError):
    """The message was already acknowledged (acked, naked or terminated)."""


class DeliverPolicy(enum.Enum):
    """Where a new consumer starts in its stream."""

    ALL = "all"
    NEW = "new"
    LAST = "last"
    LAST_PER_SUBJECT = "last_per_subject"
    BY_START_SEQUENCE = "by_start_sequence"
    BY_START_TIME = "by_start_time"


class AckPolicy(enum.Enum):
    """How the subscriber acknowledges a JetStream message around its handler.

    Attributes:
        ACK_FIRST: ack before the handler runs (at most once for the handler).
        ACK_AFTER: ack when the handler returns; a handler that raises is not acked (the
            server redelivers after ``ack_wait``/``backoff``).
        NAK_ON_ERROR: ack on success; nak (with the optional ``nak_delay``) on an error.
        TERM_ON_ERROR: ack on success; term (never redelivered) on an error.
        MANUAL: the handler calls ``ack``/``nak``/``term`` itself.

    With every policy, a handler cancelled (``handler_timeout``, a stop's grace period
    over) whose message is not yet acknowledged gets it naked at once.
    """

    ACK_FIRST = "ack_first"
    ACK_AFTER = "ack_after"
    NAK_ON_ERROR = "nak_on_error"
    TERM_ON_ERROR = "term_on_error"
    MANUAL = "manual"


def _publish_headers(
    subject: object, data: object, headers: object, msg_id: object
) -> dict[str, str]:
    """Check a JetStream publish's subject, data, headers and ``msg_id``; its headers."""
    check_publish_subject(subject)
    if type(data) is not bytes:
        check_data(data)
    hdrs: dict[str, str] = {}
    if headers is not None:
        hdrs.update(check_headers(headers) or {})
    if msg_id is not None:
        if not isinstance(msg_id, str) or not msg_id:
            raise (TypeError if not isinstance(msg_id, str) else ValueError)(
                f"msg_id must be a non-empty str, got {msg_id!r}"
            )
        hdrs["Nats-Msg-Id"] = msg_id
    return hdrs


def _check_name(field: str, value: object) -> str:
    """A stream or consumer name: a non-empty str without ``.``, ``*``, ``>`` or spaces."""
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a str, got {type(value).__name__}: {value!r}")
    if not value or any(c in value for c in ".*> \t\r\n/\\") or len(value) > 255:
        raise ValueError(
            f"{field} must be a non-empty name without '.', '*', '>', '/', '\\' or "
            f"whitespace, got {value!r}"
        )
    return value


def _ns(field: str, seconds: object) -> int:
    return int(check_seconds(field, seconds) * _NS)


@final
@dataclass(frozen=True, slots=True)
class PubAck:
    """The server's acknowledgement of a JetStream publish.

    Attributes:
        stream: the stream that stored the message.
        seq: its sequence in that stream.
        duplicate: True when the ``msg_id`` was already stored (nothing new stored).
        domain: the JetStream domain, or None.
    """

    stream: str
    seq: int
    duplicate: bool = False
    domain: str | None = None


@final
@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A stream's configuration and state.

    Attributes:
        name: the stream's name.
        subjects: the subjects it captures.
        messages: messages stored.
        bytes: bytes stored.
        first_seq: sequence of the first stored message.
        last_seq: sequence of the last stored message.
        consumer_count: consumers on the stream.
        config: the full configuration, as the server reports it.
        state: the full state, as the server reports it.
    """

    name: str
    subjects: tuple[str, ...]
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    consumer_count: int
    config: dict[str, Any]
    state: dict[str, Any]

    @classmethod
    def _from(cls, r: dict[str, Any]) -> StreamInfo:
        config, state = r.get("config", {}), r.get("state", {})
        return cls(
            name=config.get("name", ""),
            subjects=tuple(config.get("subjects") or ()),
            messages=int(state.get("messages", 0)),
            bytes=int(state.get("bytes", 0)),
            first_seq=int(state.get("first_seq", 0)),
            last_seq=int(state.get("last_seq", 0)),
            consumer_count=int(state.get("consumer_count", 0)),
            config=config,
            state=state,
        )


@final
@dataclass(frozen=True, slots=True)
class ConsumerInfo:
    """A consumer's configuration and state.

    Attributes:
        stream: the stream's name.
        name: the consumer's name.
        num_ack_pending: messages delivered and not yet acknowledged.
        num_pending: messages in the stream not yet delivered to this consumer.
        num_redelivered: messages delivered more than once and still unacknowledged.
        num_waiting: pull requests waiting on the server.
        delivered_consumer_seq: the last consumer sequence delivered.
        delivered_stream_seq: the stream sequence of that message.
        ack_floor_stream_seq: every message up to this stream sequence is acknowledged.
        ack_wait: seconds the server waits for an ack before redelivering.
        max_deliver: deliveries per message (-1: unlimited).
        durable: True for a durable consumer.
        config: the full configuration, as the server reports it.
    """

    stream: str
    name: str
    num_ack_pending: int
    num_pending: int
    num_redelivered: int
    num_waiting: int
    delivered_consumer_seq: int
    delivered_stream_seq: int
    ack_floor_stream_seq: int
    ack_wait: float
    max_deliver: int
    durable: bool
    config: dict[str, Any]

    @classmethod
    def _from(cls, r: dict[str, Any]) -> ConsumerInfo:
        config = r.get("config", {})
        delivered, floor = r.get("delivered", {}), r.get("ack_floor", {})
        return cls(
            stream=r.get("stream_name", ""),
            name=r.get("name", ""),
            num_ack_pending=int(r.get("num_ack_pending", 0)),
            num_pending=int(r.get("num_pending", 0)),
            num_redelivered=int(r.get("num_redelivered", 0)),
            num_waiting=int(r.get("num_waiting", 0)),
            delivered_consumer_seq=int(delivered.get("consumer_seq", 0)),
            delivered_stream_seq=int(delivered.get("stream_seq", 0)),
            ack_floor_stream_seq=int(floor.get("stream_seq", 0)),
            ack_wait=int(config.get("ack_wait", 30 * _NS)) / _NS,
            max_deliver=int(config.get("max_deliver", -1)),
            durable=bool(config.get("durable_name")),
            config=config,
        )


@final
@dataclass(frozen=True, slots=True)
class MsgMetadata:
    """Where a JetStream message comes from, parsed from its ``$JS.ACK`` reply subject.

    Attributes:
        stream: the stream.
        consumer: the consumer.
        num_delivered: deliveries of this message so far (1 the first time).
        stream_seq: its sequence in the stream.
        consumer_seq: its sequence for this consumer (grows with redeliveries).
        timestamp_ns: when it was stored, nanoseconds since the epoch.
        num_pending: messages still pending for the consumer after this one.
        domain: the JetStream domain, or None.
    """

    stream: str
    consumer: str
    num_delivered: int
    stream_seq: int
    consumer_seq: int
    timestamp_ns: int
    num_pending: int
    domain: str | None = None

    @property
    def timestamp(self) -> datetime.datetime:
        """When the message was stored (UTC)."""
        return datetime.datetime.fromtimestamp(self.timestamp_ns / _NS, tz=datetime.UTC)

    @classmethod
    def _parse(cls, reply: str) -> MsgMetadata:
        tokens = reply.split(".")
        n = len(tokens)
        try:
            if n == 9:  # $JS.ACK.stream.consumer.delivered.sseq.cseq.ts.pending
                _, _, stream, consumer, *nums = tokens
                domain = None
            elif n >= 12:  # $JS.ACK.domain.account.stream.consumer.delivered...(.random)
                domain = None if tokens[2] == "_" else tokens[2]
                stream, consumer, *nums = tokens[4:11]
            else:
                raise ValueError
            d, s, c, t, p = (int(x) for x in nums)
        except ValueError:
            raise JetStreamError(f"not a JetStream message reply subject: {reply!r}") from None
        return cls(stream, consumer, d, s, c, t, p, domain)


@final
class JsMsg:
    """A message delivered by a JetStream consumer.

    Attributes:
        subject: the subject it was published to.
        data: the payload.
        headers: the headers, or None.
        reply: the ``$JS.ACK...`` subject acks go to.
    """

    __slots__ = ("_acked", "_conn", "_metadata", "data", "headers", "reply", "subject")

    def __init__(self, conn: Connection, msg: Msg) -> None:
        self._conn = conn
        self.subject = msg.subject
        self.data = msg.data
        self.headers = msg.headers
        self.reply = msg.reply
        self._metadata: MsgMetadata | None = None  # parsed on first use
        self._acked = False

    @property
    def metadata(self) -> MsgMetadata:
        """Stream and consumer sequences, deliveries, timestamp, pending (parsed from
        ``reply`` on first use).

        Raises:
            JetStreamError: the reply subject is not a JetStream ack subject.
        """
        metadata = self._metadata
        if metadata is None:
            metadata = self._metadata = MsgMetadata._parse(self.reply)
        return metadata

    @property
    def is_acked(self) -> bool:
        """True once ``ack``, ``ack_sync``, ``nak`` or ``term`` returned."""
        return self._acked

    async def _send(self, payload: bytes, final: bool) -> None:
        await checkpoint_if_cancelled()
        if self._acked:
            raise MsgAlreadyAckedError(
                f"message {self.metadata.stream}#{self.metadata.stream_seq} was already "
                "acknowledged"
            )
        if final:
            self._acked = True
        try:
            await self._conn._publish(self.reply, payload, "", None)
        except BaseException:
            if final:
                self._acked = False  # the publish contract: nothing was sent
            raise

    async def ack(self) -> None:
        """Acknowledge: processed, never redeliver. Sent iff it returns.

        Raises:
            MsgAlreadyAckedError: already acked, naked or terminated.
            trionats.ConnectionClosedError: the connection is closed.
        """
        await self._send(b"+ACK", True)

    async def nak(self, delay: float | None = None) -> None:
        """Negative ack: redeliver, after ``delay`` seconds if given. Sent iff it returns.

        Raises:
            MsgAlreadyAckedError: already acked, naked or terminated.
            TypeError / ValueError: a bad ``delay``.
        """
        payload = b"-NAK" if delay is None else b'-NAK {"delay": %d}' % _ns("delay", delay)
        await self._send(payload, True)

    async def in_progress(self) -> None:
        """Tell the server the handler is still working: restarts its ``ack_wait``.

        May be sent any number of times before the message is acknowledged.

        Raises:
            MsgAlreadyAckedError: already acked, naked or terminated.
        """
        await self._send(b"+WPI", False)

    async def term(self) -> None:
        """Terminate: never redeliver, not processed. Sent iff it returns.

        Raises:
            MsgAlreadyAckedError: already acked, naked or terminated.
        """
        await self._send(b"+TERM", True)

    async def ack_sync(self, timeout: float = 5.0) -> None:
        """Acknowledge and wait for the server's confirmation.

        A cancel (or timeout) while waiting for the confirmation leaves the ack sent: the
        message counts as acknowledged. A cancel before it was sent sends nothing.

        Raises:
            MsgAlreadyAckedError: already acknowledged.
            trionats.TimeoutError: no confirmation within ``timeout`` seconds.
        """
        await checkpoint_if_cancelled()
        timeout = check_seconds("timeout", timeout)
        if self._acked:
            raise MsgAlreadyAckedError(
                f"message {self.metadata.stream}#{self.metadata.stream_seq} was already "
                "acknowledged"
            )
        # request() checks for cancellation once, before queueing, and nothing yielded
        # since the check above: from here on a Cancelled means the ack was sent.
        self._acked = True
        try:
            await self._conn.request(self.reply, b"+ACK", timeout=timeout)
        except _errors.ConnectionClosedError:
            self._acked = False  # not sent, or the server forgot it with the connection
            raise

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"<JsMsg subject={self.subject!r} stream={m.stream!r} seq={m.stream_seq} "
            f"delivered={m.num_delivered}>"
        )


def _status(msg: Msg) -> str | None:
    headers = msg.headers
    if headers is None or msg.data:
        return None
    return headers.get(_STATUS)


@final
class PullSubscription:
    """A pull consumer bound to an inbox: ``fetch`` messages in batches.

    Created by ``async with js.pull_subscribe(stream, consumer) as psub``. Leaving the
    block naks what was fetched from the server but not handed out (a cancelled fetch's
    messages are kept for the next fetch), so the server redelivers them at once.
    """

    def __init__(self, js: JetStream, stream: str, consumer: str, sub: Subscription) -> None:
        self._js = js
        self.stream = stream
        self.consumer = consumer
        self._sub = sub
        self._prefix = sub.subject[:-1]
        self._tokens = itertools.count()
        self._next_subject = f"{_API}CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._stash: deque[JsMsg] = deque()
        self._unsubscribed = False

    async def _pull(self, batch: int, expires: float) -> str:
        """Send a pull request for ``batch`` messages; returns its reply subject."""
        reply = self._prefix + str(next(self._tokens))
        body = json.dumps({"batch": batch, "expires": int(expires * _NS)}).encode()
        await self._js._conn._publish(self._next_subject, body, reply, None)
        return reply

    def _classify(self, msg: Msg) -> JsMsg | tuple[str, str, int | None]:
        """A JetStream message, or (status, reply subject, pending messages) of a status."""
        if msg.reply.startswith(_ACK_PREFIX):
            return JsMsg(self._js._conn, msg)
        headers = msg.headers or {}
        pending = headers.get(_PENDING_MSGS)
        return (
            headers.get(_STATUS, ""),
            msg.subject,
            int(pending) if pending and pending.isdigit() else None,
        )

    async def fetch(self, batch: int = 1, timeout: float = 5.0) -> list[JsMsg]:
        """Fetch up to ``batch`` messages, waiting at most ``timeout`` seconds.

        Returns as soon as ``batch`` messages came, or when the request expires with
        fewer. A cancelled fetch loses nothing: the messages it had received are returned
        by the next fetch (or naked when the block is left).

        Raises:
            trionats.TimeoutError: no message within ``timeout``.
            JetStreamError: the consumer was deleted, or another server error.
        """
        await checkpoint_if_cancelled()
        check_int("batch", batch, minimum=1)
        timeout = check_seconds("timeout", timeout)
        got: list[JsMsg] = []
        while self._stash and len(got) < batch:
            got.append(self._stash.popleft())
        if got:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return got
        try:
            reply = await self._pull(batch, timeout)
            with trio.move_on_after(timeout + 1.0):
                while len(got) < batch:
                    msg = await self._sub.next_msg()
                    item = self._classify(msg)
                    if isinstance(item, JsMsg):
                        got.append(item)
                        continue
                    status, subject, _ = item
                    if subject != reply:
                        continue  # a status of an earlier (cancelled) fetch
                    if status in ("404", "408"):
                        break
                    if status == "409":
                        desc = (msg.headers or {}).get(_DESCRIPTION, "")
                        if "Deleted" in desc or "Exceeded" not in desc:
                            raise JetStreamError(
                                f"pull from {self.stream}/{self.consumer}: {desc}", code=409
                            )
                        break
        except BaseException:
            self._stash.extendleft(reversed(got))
            raise
        if not got:
            raise _errors.TimeoutError(
                f"no message from {self.stream}/{self.consumer} within {timeout} s"
            )
        return got

    def _unsub_now(self) -> None:
        """Queue the inbox's UNSUB (once): the server delivers nothing more to it."""
        conn = self._js._conn
        nats_sub = self._sub._nats_sub
        if self._unsubscribed or nats_sub is None or conn._closed:
            return
        self._unsubscribed = True
        conn._bridge.send_unsub_nowait(conn._client, nats_sub)

    async def _stop_interest(self) -> None:
        """UNSUB the inbox, then a round trip: whatever the server sent before is buffered.

        The server drops a waiting pull request whose reply subject lost its interest, so
        after this nothing more arrives for an outstanding request.
        """
        conn = self._js._conn
        if self._sub._nats_sub is None or conn._closed:
            return
        self._unsub_now()
        if conn._client.is_connected:
            with trio.move_on_after(2.0):
                with suppress(_errors.TrionatsError):
                    await conn._ping()

    async def _nak_leftovers(self) -> int:
        sub = self._sub
        left: list[JsMsg] = list(self._stash)
        self._stash.clear()
        while sub.pending:
            item = self._classify(sub.take_nowait())
            if isinstance(item, JsMsg):
                left.append(item)
        for m in left:
            try:
                await self._js._conn._publish(m.reply, b"-NAK", "", None)
            except _errors.TrionatsError:
                break
        return len(left)


@final
class JetStream:
    """JetStream on one connection: streams, consumers, publish. ``nc.jetstream()``.

    Args:
        conn: the connection.
        prefix: the API prefix (``$JS.API``; another for a domain or an import).
        timeout: seconds each API request waits for the server's answer.
    """

    def __init__(self, conn: Connection, *, prefix: str = "$JS.API", timeout: float = 5.0) -> None:
        self._conn = conn
        self._prefix = check_publish_subject(prefix, "prefix", cache=False).rstrip(".") + "."
        self._timeout = check_seconds("timeout", timeout)

    async def _api(self, what: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = b"" if body is None else json.dumps(body).encode()
        try:
            msg = await self._conn.request(self._prefix + what, data, timeout=self._timeout)
        except _errors.NoRespondersError:
            raise JetStreamError(
                "JetStream is not enabled on the server (no responders on "
                f"{self._prefix + what!r})",
                code=503,
            ) from None
        return _decode(msg.data, what)

    # -- streams -------------------------------------------------------------------------
    @staticmethod
    def _stream_config(
        name: str,
        subjects: Sequence[str] | None,
        storage: str,
        max_msgs: int,
        max_bytes: int,
        max_age: float | None,
        duplicate_window: float | None,
        num_replicas: int,
        extra: dict[str, Any] | None,
    ) -> dict[str, Any]:
        _check_name("name", name)
        config: dict[str, Any] = {"name": name}
        if subjects is not None:
            if isinstance(subjects, str) or not isinstance(subjects, Sequence):
                raise TypeError(
                    f"subjects must be a list of str, got {type(subjects).__name__}: {subjects!r}"
                )
            for s in subjects:
                if not isinstance(s, str) or not s or " " in s:
                    raise ValueError(f"subjects: not a subject: {s!r}")
            config["subjects"] = list(subjects)
        if storage not in ("file", "memory"):
            raise ValueError(f"storage must be 'file' or 'memory', got {storage!r}")
        config["storage"] = storage
        config["max_msgs"] = check_int("max_msgs", max_msgs, minimum=-1)
        config["max_bytes"] = check_int("max_bytes", max_bytes, minimum=-1)
        if max_age is not None:
            config["max_age"] = _ns("max_age", max_age)
        if duplicate_window is not None:
            config["duplicate_window"] = _ns("duplicate_window", duplicate_window)
        config["num_replicas"] = check_int("num_replicas", num_replicas, minimum=1)
        if extra is not None:
            if not isinstance(extra, dict):
                raise TypeError(f"config must be a dict, got {type(extra).__name__}")
            config.update(extra)
        return config

    async def add_stream(
        self,
        name: str,
        subjects: Sequence[str] | None = None,
        *,
        storage: str = "file",
        max_msgs: int = -1,
        max_bytes: int = -1,
        max_age: float | None = None,
        duplicate_window: float | None = None,
        num_replicas: int = 1,
        config: dict[str, Any] | None = None,
    ) -> StreamInfo:
        """Create a stream (idempotent when the configuration is the same).

        Args:
            name: the stream's name.
            subjects: the subjects it stores (wildcards allowed).
            storage: "file" or "memory".
            max_msgs: messages kept (-1: unlimited).
            max_bytes: bytes kept (-1: unlimited).
            max_age: seconds a message is kept (None: forever).
            duplicate_window: seconds a ``msg_id`` is remembered for dedup.
            num_replicas: replicas in a cluster.
            config: more fields of the server's StreamConfig, passed as they are.

        Raises:
            JetStreamError: the server refused it (``err_code`` says why).
        """
        body = self._stream_config(
            name, subjects, storage, max_msgs, max_bytes, max_age, duplicate_window,
            num_replicas, config,
        )  # fmt: skip
        return StreamInfo._from(await self._api(f"STREAM.CREATE.{name}", body))

    async def update_stream(
        self,
        name: str,
        subjects: Sequence[str] | None = None,
        *,
        storage: str = "file",
        max_msgs: int = -1,
        max_bytes: int = -1,
        max_age: float | None = None,
        duplicate_window: float | None = None,
        num_replicas: int = 1,
        config: dict[str, Any] | None = None,
    ) -> StreamInfo:
        """Change a stream's configuration (the arguments of :meth:`add_stream`)."""
        body = self._stream_config(
            name, subjects, storage, max_msgs, max_bytes, max_age, duplicate_window,
            num_replicas, config,
        )  # fmt: skip
        return StreamInfo._from(await self._api(f"STREAM.UPDATE.{name}", body))

    async def delete_stream(self, name: str) -> bool:
        """Delete a stream and everything in it.

        Raises:
            JetStreamError: no such stream (``err_code`` 10059).
        """
        _check_name("name", name)
        return bool((await self._api(f"STREAM.DELETE.{name}")).get("success"))

    async def stream_info(self, name: str) -> StreamInfo:
        """A stream's configuration and state."""
        _check_name("name", name)
        return StreamInfo._from(await self._api(f"STREAM.INFO.{name}"))

    async def purge_stream(
        self, name: str, *, subject: str | None = None, keep: int | None = None
    ) -> int:
        """Remove messages (those on ``subject`` only, keeping the last ``keep``).

        Returns:
            How many messages were removed.
        """
        _check_name("name", name)
        body: dict[str, Any] = {}
        if subject is not None:
            body["filter"] = check_publish_subject(subject, "subject", cache=False) and subject
        if keep is not None:
            body["keep"] = check_int("keep", keep, minimum=0)
        return int((await self._api(f"STREAM.PURGE.{name}", body or None)).get("purged", 0))

    # -- consumers -----------------------------------------------------------------------
    async def add_consumer(
        self,
        stream: str,
        durable_name: str | None = None,
        *,
        filter_subject: str | None = None,
        deliver_policy: DeliverPolicy = DeliverPolicy.ALL,
        opt_start_seq: int | None = None,
        opt_start_time: datetime.datetime | None = None,
        ack_wait: float = 30.0,
        max_deliver: int = -1,
        backoff: Sequence[float] | None = None,
        max_ack_pending: int = 1000,
        inactive_threshold: float | None = None,
        config: dict[str, Any] | None = None,
    ) -> ConsumerInfo:
        """Create a pull consumer (explicit acks): durable when ``durable_name`` is given.

        Args:
            stream: the stream.
            durable_name: the durable name; None for an ephemeral consumer (the server
                names it; removed after ``inactive_threshold`` without pulls).
            filter_subject: only messages on this subject (wildcards allowed).
            deliver_policy: where to start; ``BY_START_SEQUENCE`` needs ``opt_start_seq``,
                ``BY_START_TIME`` needs ``opt_start_time`` (an aware datetime).
            ack_wait: seconds before an unacknowledged message is redelivered.
            max_deliver: deliveries per message (-1: unlimited).
            backoff: redelivery delays in seconds (its length must be < ``max_deliver``).
            max_ack_pending: unacknowledged messages the server allows in flight.
            inactive_threshold: seconds without activity before an ephemeral consumer is
                removed.
            config: more ConsumerConfig fields, passed as they are.

        Raises:
            JetStreamError: the server refused it (no such stream, ...).
        """
        _check_name("stream", stream)
        cfg: dict[str, Any] = {"ack_policy": "explicit"}
        if durable_name is not None:
            cfg["durable_name"] = _check_name("durable_name", durable_name)
        if filter_subject is not None:
            if not isinstance(filter_subject, str) or not filter_subject:
                raise (TypeError if not isinstance(filter_subject, str) else ValueError)(
                    f"filter_subject must be a non-empty str, got {filter_subject!r}"
                )
            cfg["filter_subject"] = filter_subject
        if not isinstance(deliver_policy, DeliverPolicy):
            raise TypeError(
                f"deliver_policy must be a DeliverPolicy, got {type(deliver_policy).__name__}: "
                f"{deliver_policy!r}"
            )
        cfg["deliver_policy"] = deliver_policy.value
        if deliver_policy is DeliverPolicy.BY_START_SEQUENCE:
            cfg["opt_start_seq"] = check_int("opt_start_seq", opt_start_seq, minimum=1)
        elif opt_start_seq is not None:
            raise ValueError(
                f"opt_start_seq={opt_start_seq!r} needs deliver_policy=BY_START_SEQUENCE"
            )
        if deliver_policy is DeliverPolicy.BY_START_TIME:
            if not isinstance(opt_start_time, datetime.datetime):
                raise TypeError(
                    f"opt_start_time must be a datetime, got {type(opt_start_time).__name__}: "
                    f"{opt_start_time!r}"
                )
            if opt_start_time.tzinfo is None:
                raise ValueError(f"opt_start_time must be timezone-aware, got {opt_start_time!r}")
            cfg["opt_start_time"] = opt_start_time.astimezone(datetime.UTC).isoformat()
        elif opt_start_time is not None:
            raise ValueError(
                f"opt_start_time={opt_start_time!r} needs deliver_policy=BY_START_TIME"
            )
        cfg["ack_wait"] = _ns("ack_wait", ack_wait)
        check_int("max_deliver", max_deliver, minimum=-1)
        if max_deliver == 0:
            raise ValueError("max_deliver must be -1 (unlimited) or >= 1, got 0")
        cfg["max_deliver"] = max_deliver
        if backoff is not None:
            if not isinstance(backoff, list | tuple):
                raise TypeError(f"backoff must be a list of seconds, got {backoff!r}")
            cfg["backoff"] = [_ns("backoff", b) for b in backoff]
        cfg["max_ack_pending"] = check_int("max_ack_pending", max_ack_pending, minimum=-1)
        if inactive_threshold is not None:
            cfg["inactive_threshold"] = _ns("inactive_threshold", inactive_threshold)
        if config is not None:
            if not isinstance(config, dict):
                raise TypeError(f"config must be a dict, got {type(config).__name__}")
            cfg.update(config)
        name = cfg.get("durable_name") or cfg.get("name")
        what = f"CONSUMER.CREATE.{stream}" + (f".{name}" if name else "")
        body: dict[str, Any] = {"stream_name": stream, "config": cfg}
        return ConsumerInfo._from(await self._api(what, body))

    async def delete_consumer(self, stream: str, consumer: str) -> bool:
        """Delete a consumer."""
        _check_name("stream", stream)
        _check_name("consumer", consumer)
        return bool((await self._api(f"CONSUMER.DELETE.{stream}.{consumer}")).get("success"))

    async def consumer_info(self, stream: str, consumer: str) -> ConsumerInfo:
        """A consumer's configuration and state (``num_ack_pending``, ``num_pending``...)."""
        _check_name("stream", stream)
        _check_name("consumer", consumer)
        return ConsumerInfo._from(await self._api(f"CONSUMER.INFO.{stream}.{consumer}"))

    # -- publish -------------------------------------------------------------------------
    async def publish(
        self,
        subject: str,
        data: bytes = b"",
        *,
        msg_id: str | None = None,
        expected_last_seq: int | None = None,
        expected_last_msg_id: str | None = None,
        expected_stream: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> PubAck:
        """Publish to a stream and wait for the server to store it.

        Cancellation: cancelled before the message was queued, nothing was sent; cancelled
        while waiting for the PubAck, the message may or may not be stored. Publishing
        again with the same ``msg_id`` is safe (within the stream's duplicate window
        the second is reported ``duplicate``, not stored twice).

        Args:
            subject: a subject a stream captures.
            data: the payload.
            msg_id: an id for deduplication (header ``Nats-Msg-Id``).
            expected_last_seq: store only if the stream's last sequence is this.
            expected_last_msg_id: store only if the stream's last message id is this.
            expected_stream: store only if the subject belongs to this stream.
            headers: more headers.
            timeout: seconds to wait for the PubAck (None: the JetStream's timeout).

        Raises:
            JetStreamError: the server refused it (an expectation failed, ...) or no
                stream captures ``subject`` (code 503).
            trionats.TimeoutError: no PubAck in time (the message may be stored).
        """
        await checkpoint_if_cancelled()
        hdrs = _publish_headers(subject, data, headers, msg_id)
        if expected_last_seq is not None:
            seq = check_int("expected_last_seq", expected_last_seq, minimum=0)
            hdrs["Nats-Expected-Last-Sequence"] = str(seq)
        if expected_last_msg_id is not None:
            if not isinstance(expected_last_msg_id, str):
                raise TypeError(f"expected_last_msg_id must be a str, got {expected_last_msg_id!r}")
            hdrs["Nats-Expected-Last-Msg-Id"] = expected_last_msg_id
        if expected_stream is not None:
            hdrs["Nats-Expected-Stream"] = _check_name("expected_stream", expected_stream)
        wait = self._timeout if timeout is None else check_seconds("timeout", timeout)
        try:
            msg = await self._conn.request(subject, data, timeout=wait, headers=hdrs or None)
        except _errors.NoRespondersError:
            raise JetStreamError(
                f"no stream captures {subject!r} (no responders)", code=503
            ) from None
        r = _decode(msg.data, "publish")
        return PubAck(
            stream=r.get("stream", ""),
            seq=int(r.get("seq", 0)),
            duplicate=bool(r.get("duplicate", False)),
            domain=r.get("domain"),
        )

    def publisher(self, max_pending: int = 256, *, timeout: float | None = None) -> Any:
        """Asynchronous publishing: ``async with js.publisher(max_pending=...) as pub``.

        See :class:`Publisher`. ``timeout``: seconds each PubAck is waited for (None:
        this JetStream's timeout).
        """
        check_int("max_pending", max_pending, minimum=1)
        wait = self._timeout if timeout is None else check_seconds("timeout", timeout)
        return self._publisher(max_pending, wait)

    @asynccontextmanager
    async def _publisher(self, max_pending: int, timeout: float) -> AsyncIterator[Publisher]:
        pub = Publisher(self, max_pending, timeout)
        try:
            async with trio.open_nursery() as nursery:
                # The watchdog is shielded: a cancel of the block must not stop the timeouts
                # the shielded exit below relies on to be bounded.
                watch = trio.CancelScope(shield=True)

                async def watchdog() -> None:
                    with watch:
                        await pub._watch()

                nursery.start_soon(watchdog)
                pub._open = True
                try:
                    yield pub
                finally:
                    with trio.CancelScope(shield=True):
                        await pub._finish()
                    watch.cancel()
        except BaseExceptionGroup as group:
            _errors.reraise_unwrapped(group, 1)

    # -- key-value -------------------------------------------------------------------------
    async def create_key_value(
        self,
        bucket: str,
        *,
        history: int = 1,
        ttl: float | None = None,
        max_bytes: int = -1,
        storage: str = "file",
    ) -> KeyValue:
        """Create (or open, when it exists with the same settings) a key-value bucket.

        Args:
            bucket: the bucket's name.
            history: values kept per key (1..64).
            ttl: seconds a value is kept (None: forever).
            max_bytes: the bucket's size limit (-1: none).
            storage: "file" or "memory".
        """
        from ._kv import create_key_value

        return await create_key_value(
            self, bucket, history=history, ttl=ttl, max_bytes=max_bytes, storage=storage
        )

    async def key_value(self, bucket: str) -> KeyValue:
        """Open an existing key-value bucket.

        Raises:
            JetStreamError: no such bucket (code 404).
        """
        from ._kv import key_value

        return await key_value(self, bucket)

    # -- pull ------------------------------------------------------------------------------
    def pull_subscribe(self, stream: str, consumer: str) -> _PullContext:
        """Bind to an existing pull consumer: ``async with js.pull_subscribe(s, c) as p``.

        Leaving the block naks every message fetched from the server and not handed out.
        """
        _check_name("stream", stream)
        _check_name("consumer", consumer)
        return self._pull_subscribe(stream, consumer)

    @asynccontextmanager
    async def _pull_subscribe(self, stream: str, consumer: str) -> AsyncIterator[PullSubscription]:
        inbox = self._conn._client.new_inbox() + ".*"
        async with self._conn.subscribe(inbox) as sub:
            psub = PullSubscription(self, stream, consumer, sub)
            try:
                yield psub
            finally:
                with trio.CancelScope(shield=True):
                    await psub._nak_leftovers()


_PullContext = Any  # an async context manager of PullSubscription (see pull_subscribe)


def _decode(data: bytes, what: str) -> dict[str, Any]:
    try:
        r = json.loads(data)
    except ValueError:
        raise JetStreamError(f"{what}: the server's answer is not JSON: {data[:200]!r}") from None
    if not isinstance(r, dict):
        raise JetStreamError(f"{what}: unexpected answer {data[:200]!r}")
    err = r.get("error")
    if err:
        raise JetStreamError(
            f"{what}: {err.get('description', 'error')}",
            code=int(err.get("code", 0)),
            err_code=int(err.get("err_code", 0)),
            description=str(err.get("description", "")),
        )
    return r


@final
class PubAckFuture:
    """The outcome of one :meth:`Publisher.publish`: a PubAck, or why there is none.

    Attributes:
        subject: the subject published to.
        msg_id: the message id, or None.
    """

    __slots__ = ("_ack", "_data", "_done", "_error", "_event", "msg_id", "subject")

    def __init__(self, subject: str, msg_id: str | None) -> None:
        self.subject = subject
        self.msg_id = msg_id
        self._ack: PubAck | None = None
        self._data = b""  # the server's answer, decoded on the first result()
        self._error: BaseException | None = None
        self._done = False
        self._event: trio.Event | None = None  # created only when someone waits

    @property
    def done(self) -> bool:
        """True once the server answered, or the wait for its answer ended."""
        return self._done

    def _resolve(self, data: bytes, error: BaseException | None) -> None:
        self._data = data
        self._error = error
        self._done = True
        event = self._event
        if event is not None:
            event.set()

    async def result(self) -> PubAck:
        """Wait for the outcome.

        Raises:
            JetStreamError: the server refused the message (nothing stored).
            trionats.TimeoutError: no PubAck in time: the message may or may not be
                stored (publish it again with the same ``msg_id`` to be sure).
            trionats.ConnectionClosedError: the connection closed before the PubAck.
        """
        if self._done:
            await trio.lowlevel.checkpoint()
        else:
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()
        if self._error is None and self._ack is None:
            try:
                self._ack = _pub_ack(_decode(self._data, "publish"))
            except JetStreamError as exc:
                self._error = exc
            self._data = b""
        if self._error is not None:
            raise self._error
        assert self._ack is not None
        return self._ack


def _pub_ack(r: dict[str, Any]) -> PubAck:
    return PubAck(
        stream=r.get("stream", ""),
        seq=int(r.get("seq", 0)),
        duplicate=bool(r.get("duplicate", False)),
        domain=r.get("domain"),
    )


class _AckWait(_Pending):
    """One outstanding PubAck of a :class:`Publisher`, registered in the connection's
    reply router.

    The router hands the reply over by setting ``msg`` (or ``error`` when the connection
    dies); here those are properties that settle the future on the spot, from the read
    loop: no Trio task is parked or woken per message. ``task`` stays None, so the router
    never reschedules anything for it.
    """

    __slots__ = ("deadline", "future", "publisher", "token")

    def __init__(self, publisher: Publisher, future: PubAckFuture, token: str, deadline: float):
        self.task = None
        self.active = True  # False once settled (reply, error, timeout or not sent)
        self.publisher = publisher
        self.future = future
        self.token = token
        self.deadline = deadline

    @property
    def msg(self) -> Msg | None:
        return None

    @msg.setter
    def msg(self, msg: Msg | None) -> None:
        if msg is None or not self.active:
            return
        headers = msg.headers
        if headers is not None and not msg.data and headers.get(_STATUS) == "503":
            subject = self.future.subject
            self.publisher._settle(
                self, JetStreamError(f"no stream captures {subject!r}", code=503)
            )
        else:
            self.publisher._settle(self, None, msg.data)

    @property
    def error(self) -> BaseException | None:
        return None

    @error.setter
    def error(self, error: BaseException | None) -> None:
        if error is not None and self.active:
            self.publisher._settle(
                self, _errors.ConnectionClosedError("the connection closed before the PubAck came")
            )


@final
class Publisher:
    """Asynchronous JetStream publishing with at most ``max_pending`` acks outstanding.

    ``async with js.publisher(max_pending=256) as pub: fut = await pub.publish(...)``.
    ``publish`` returns once the message is queued (a cancelled ``publish`` sent nothing)
    and waits first while ``max_pending`` acks are outstanding. Leaving the block waits
    for every outstanding PubAck, each at most ``timeout`` seconds, even when the block
    is left by a cancel (shielded, bounded): every future is resolved, so a cancel never
    hides whether a message was stored.

    Cost: with room under ``max_pending``, ``publish`` does not yield (it checks for
    cancellation, and yields every few hundred calls, like :meth:`Connection.publish`);
    each PubAck settles its future from the connection's reply router, without a task
    per message; one watchdog task per block enforces the timeouts.
    """

    def __init__(self, js: JetStream, max_pending: int, timeout: float) -> None:
        self._conn = js._conn
        self._max_pending = max_pending
        self._timeout = timeout
        self._outstanding = 0
        self._order: deque[_AckWait] = deque()  # in publish order, so in deadline order
        self._room = trio.lowlevel.ParkingLot()  # publish() waiting under max_pending
        self._idle = trio.lowlevel.ParkingLot()  # the watchdog, nothing outstanding
        self._drained = trio.lowlevel.ParkingLot()  # the block's exit, waiting for all
        self._open = False

    async def publish(
        self,
        subject: str,
        data: bytes = b"",
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> PubAckFuture:
        """Queue ``data`` for the stream capturing ``subject``; returns its future.

        Raises:
            ValueError / TypeError: bad subject, data, msg_id or headers.
        """
        await checkpoint_if_cancelled()
        hdrs: dict[str, str] | None = None
        if headers is None and msg_id is None:
            if subject not in _PUBLISH_OK:
                check_publish_subject(subject)
            if type(data) is not bytes:
                check_data(data)
        else:
            hdrs = _publish_headers(subject, data, headers, msg_id) or None
        if not self._open:
            raise _errors.TrionatsError("the publisher's block has ended")
        while self._outstanding >= self._max_pending:
            await self._room.park()  # a cancel here sent nothing
            if not self._open:
                raise _errors.TrionatsError("the publisher's block has ended")
        conn = self._conn
        try:
            conn._check_open()
            router = conn._router or await conn._ensure_router()  # never yields
        except BaseException:
            self._pass_room()
            raise
        token = "p" + str(next(conn._tokens))
        future = PubAckFuture(subject, msg_id)
        wait = _AckWait(self, future, token, trio.current_time() + self._timeout)
        router.waiting[token] = wait
        self._outstanding += 1
        try:
            await conn._publish(subject, data, router.prefix + token, hdrs)
        except BaseException:
            if wait.active:  # not sent (the publish contract): forget it
                router.waiting.pop(token, None)
                self._settle(wait, _errors.TrionatsError("not sent"))
            raise
        order = self._order
        while order and not order[0].active:
            order.popleft()
        order.append(wait)
        if self._idle:
            self._idle.unpark_all()
        return future

    def _pass_room(self) -> None:
        """A publish that was woken for room does not take it: wake the next one."""
        if self._room and self._outstanding < self._max_pending:
            self._room.unpark()

    def _settle(self, wait: _AckWait, error: BaseException | None, data: bytes = b"") -> None:
        """Resolve ``wait``'s future (once) and free its place under ``max_pending``."""
        if not wait.active:
            return
        wait.active = False
        wait.future._resolve(data, error)
        self._outstanding -= 1
        if self._room:
            self._room.unpark()
        if not self._outstanding and self._drained:
            self._drained.unpark_all()

    async def _watch(self) -> None:
        """Time out PubAcks: sleep until the oldest outstanding one's deadline."""
        order = self._order
        conn = self._conn
        while True:
            while order and not order[0].active:
                order.popleft()
            if not order:
                await self._idle.park()
                continue
            await trio.sleep_until(order[0].deadline)
            now = trio.current_time()
            while order and (not order[0].active or order[0].deadline <= now):
                wait = order.popleft()
                if wait.active:
                    router = conn._router
                    if router is not None:
                        router.waiting.pop(wait.token, None)
                    self._settle(
                        wait,
                        _errors.TimeoutError(
                            f"no PubAck for {wait.future.subject!r} within {self._timeout} s "
                            "(the message may be stored)"
                        ),
                    )

    async def _finish(self) -> None:
        """At the block's exit: wait (the caller shields) until every future is resolved."""
        self._open = False
        self._room.unpark_all()  # publishes waiting for room: the block has ended
        while self._outstanding:
            await self._drained.park()
