"""Key-value store on JetStream (nats-py's names): a bucket is the stream ``KV_<bucket>``
capturing ``$KV.<bucket>.>``, one subject per key, the last ``history`` values kept.

``watch`` is an ordered pull consumer of its own: it remembers the last stream sequence it
delivered and, when its consumer is lost (a server restart, the connection reconnecting),
creates a new one starting right after it, so a watch goes through a restart without
losing or repeating an update. (An object store may come later, in its own module.)
"""

from __future__ import annotations

import base64
import contextlib
import datetime
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, final

import trio

from . import _errors
from ._errors import JetStreamError
from ._jetstream import DeliverPolicy, JsMsg, _check_name
from ._validate import check_data, check_int, check_seconds

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ._jetstream import JetStream

__all__ = ["KeyNotFoundError", "KeyValue", "KvEntry"]

_OP = "KV-Operation"
_DEL = "DEL"
_PURGE = "PURGE"
_WATCH_PULL = 256


class KeyNotFoundError(JetStreamError):
    """The key has no value (never set, deleted or purged)."""


class _Reset(Exception):
    """A watch's consumer skipped a sequence: resume with a new consumer."""


def _check_key(key: object, *, pattern: bool = False) -> str:
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}: {key!r}")
    tokens = key.split(".")
    bad = not key or any(not t for t in tokens) or any(c in key for c in " \t\r\n")
    if not pattern:
        bad = bad or "*" in key or ">" in key
    if bad:
        what = "key pattern" if pattern else "key"
        raise ValueError(
            f"{what} must be dot-separated non-empty tokens without whitespace"
            f"{'' if pattern else ' or wildcards'}, got {key!r}"
        )
    return key


@final
@dataclass(frozen=True, slots=True)
class KvEntry:
    """One value (or deletion) of a key.

    Attributes:
        bucket: the bucket.
        key: the key.
        value: the value (b"" for a deletion).
        revision: the stream sequence of this update.
        operation: "PUT", "DEL" or "PURGE".
        created: when it was stored (UTC), or None when the server did not say.
        delta: updates still pending after this one (watch and history), else 0.
    """

    bucket: str
    key: str
    value: bytes
    revision: int
    operation: str = "PUT"
    created: datetime.datetime | None = None
    delta: int = 0


def _parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    head, _, frac = text.rstrip("Z").partition(".")
    try:
        base = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.UTC)
    except ValueError:
        return None
    micros = int((frac + "000000")[:6]) if frac.isdigit() else 0
    return base.replace(microsecond=micros)


@final
class KeyValue:
    """A key-value bucket: ``kv = await js.create_key_value(bucket=...)``."""

    def __init__(self, js: JetStream, bucket: str) -> None:
        self._js = js
        self.bucket = bucket
        self._stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."

    def _entry(self, msg: JsMsg) -> KvEntry:
        headers = msg.headers or {}
        m = msg.metadata
        return KvEntry(
            bucket=self.bucket,
            key=msg.subject[len(self._prefix) :],
            value=msg.data,
            revision=m.stream_seq,
            operation=headers.get(_OP, "PUT"),
            created=m.timestamp,
            delta=m.num_pending,
        )

    async def put(self, key: str, value: bytes) -> int:
        """Set ``key`` to ``value``; returns the new revision.

        Cancellation: the same as :meth:`JetStream.publish`.
        """
        _check_key(key)
        if type(value) is not bytes:
            check_data(value)
        return (await self._js.publish(self._prefix + key, value)).seq

    async def create(self, key: str, value: bytes) -> int:
        """Set ``key`` only if it has no value yet; returns the revision.

        Raises:
            JetStreamError: the key already has a value (``err_code`` 10071).
        """
        _check_key(key)
        if type(value) is not bytes:
            check_data(value)
        ack = await self._js.publish(
            self._prefix + key, value, headers={"Nats-Expected-Last-Subject-Sequence": "0"}
        )
        return ack.seq

    async def get(self, key: str) -> KvEntry:
        """The latest value of ``key``.

        Raises:
            KeyNotFoundError: never set, deleted or purged.
        """
        _check_key(key)
        try:
            r = await self._js._api(
                f"STREAM.MSG.GET.{self._stream}", {"last_by_subj": self._prefix + key}
            )
        except JetStreamError as exc:
            if exc.code == 404:
                raise KeyNotFoundError(f"key {key!r} not found in bucket {self.bucket!r}") from None
            raise
        message = r.get("message", {})
        headers = _decode_headers(message.get("hdrs"))
        op = headers.get(_OP, "PUT")
        if op in (_DEL, _PURGE):
            raise KeyNotFoundError(f"key {key!r} in bucket {self.bucket!r} was deleted")
        return KvEntry(
            bucket=self.bucket,
            key=key,
            value=base64.b64decode(message.get("data") or ""),
            revision=int(message.get("seq", 0)),
            operation=op,
            created=_parse_time(message.get("time")),
        )

    async def delete(self, key: str) -> int:
        """Delete ``key`` (its history is kept); returns the revision of the deletion."""
        _check_key(key)
        return (await self._js.publish(self._prefix + key, b"", headers={_OP: _DEL})).seq

    async def purge(self, key: str) -> int:
        """Delete ``key`` and its whole history; returns the revision of the purge."""
        _check_key(key)
        headers = {_OP: _PURGE, "Nats-Rollup": "sub"}
        return (await self._js.publish(self._prefix + key, b"", headers=headers)).seq

    async def _read_all(self, pattern: str, deliver: DeliverPolicy) -> list[KvEntry]:
        """Every message on ``pattern`` (one ephemeral consumer, no acks)."""
        info = await self._js.add_consumer(
            self._stream,
            filter_subject=self._prefix + pattern,
            deliver_policy=deliver,
            inactive_threshold=30,
            config={"ack_policy": "none", "mem_storage": True},
        )
        entries: list[KvEntry] = []
        try:
            if info.num_pending:
                async with self._js.pull_subscribe(self._stream, info.name) as psub:
                    while len(entries) < info.num_pending:
                        msgs = await psub.fetch(info.num_pending - len(entries), timeout=5)
                        entries.extend(self._entry(m) for m in msgs)
                        for m in msgs:
                            m._acked = True  # ack_policy none: nothing to send
        finally:
            # (removed by inactive_threshold anyway if this fails)
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(2),
                contextlib.suppress(_errors.TrionatsError),
            ):
                await self._js.delete_consumer(self._stream, info.name)
        return entries

    async def keys(self) -> list[str]:
        """The keys that have a value now (deleted ones left out), in revision order."""
        latest = await self._read_all(">", DeliverPolicy.LAST_PER_SUBJECT)
        return [e.key for e in latest if e.operation == "PUT"]

    async def history(self, key: str) -> list[KvEntry]:
        """Every update of ``key`` the bucket keeps (its ``history``), oldest first.

        Raises:
            KeyNotFoundError: the key has no update at all.
        """
        _check_key(key)
        entries = await self._read_all(key, DeliverPolicy.ALL)
        if not entries:
            raise KeyNotFoundError(f"key {key!r} not found in bucket {self.bucket!r}")
        return entries

    def watch(
        self, key_pattern: str = ">", *, include_history: bool = False, buffer: int = 256
    ) -> Any:
        """Updates of the keys matching ``key_pattern``, as a Trio async iterator.

        ``async with kv.watch("orders.*") as updates: async for entry in updates:``. It
        starts with the current value of each matching key (every kept value with
        ``include_history``), then every update as it happens, deletions included
        (``entry.operation``). Leaving the block stops it. Through a server restart or a
        reconnection it resumes right after the last revision it delivered.

        Args:
            key_pattern: a key or a pattern (``*`` one token, ``>`` the rest).
            include_history: start with every kept value instead of the latest ones.
            buffer: updates buffered while the consumer of the iterator is busy.
        """
        _check_key(key_pattern, pattern=True)
        check_int("buffer", buffer, minimum=1)
        return self._watch(key_pattern, include_history, buffer)

    @asynccontextmanager
    async def _watch(
        self, pattern: str, include_history: bool, buffer: int
    ) -> AsyncIterator[trio.MemoryReceiveChannel[KvEntry]]:
        send, receive = trio.open_memory_channel[KvEntry](buffer)
        try:
            async with trio.open_nursery() as nursery:
                first = DeliverPolicy.ALL if include_history else DeliverPolicy.LAST_PER_SUBJECT
                nursery.start_soon(self._watch_loop, pattern, first, send)
                try:
                    with receive:
                        yield receive
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            _errors.reraise_unwrapped(group, 1)  # only our nursery's level

    async def _watch_loop(
        self,
        pattern: str,
        first: DeliverPolicy,
        send: trio.MemorySendChannel[KvEntry],
    ) -> None:
        last_seq = 0
        js = self._js
        async with send:
            while True:
                try:
                    epoch = js._conn.stats().reconnects
                    if last_seq:
                        info = await js.add_consumer(
                            self._stream,
                            filter_subject=self._prefix + pattern,
                            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                            opt_start_seq=last_seq + 1,
                            inactive_threshold=30,
                            config={"ack_policy": "none", "mem_storage": True},
                        )
                    else:
                        info = await js.add_consumer(
                            self._stream,
                            filter_subject=self._prefix + pattern,
                            deliver_policy=first,
                            inactive_threshold=30,
                            config={"ack_policy": "none", "mem_storage": True},
                        )
                    consumer_seq = 0
                    async with js.pull_subscribe(self._stream, info.name) as psub:
                        while True:
                            try:
                                msgs = await psub.fetch(_WATCH_PULL, timeout=2.0)
                            except _errors.TimeoutError:
                                msgs = []
                            if js._conn.stats().reconnects != epoch:
                                # The server may have restarted: a restored consumer can
                                # restart its deliver policy. Resume after last_seq.
                                raise _Reset
                            if not msgs:
                                # No update for a while: is our consumer still there?
                                await js.consumer_info(self._stream, info.name)
                                continue
                            for m in msgs:
                                m._acked = True
                                if m.metadata.consumer_seq != consumer_seq + 1:
                                    # A gap: the consumer was recreated or reset (a server
                                    # restart). Start a new one after last_seq.
                                    raise _Reset
                                consumer_seq += 1
                                seq = m.metadata.stream_seq
                                if seq <= last_seq:
                                    continue  # ordered: never repeat an update
                                last_seq = seq
                                await send.send(self._entry(m))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the iterator is gone
                except (_errors.TrionatsError, _Reset):
                    # Consumer lost (server restart), connection reconnecting: resume
                    # after last_seq with a new consumer.
                    if js._conn.is_closed:
                        return
                    await trio.sleep(0.1)

    def __repr__(self) -> str:
        return f"<trionats.KeyValue {self.bucket!r}>"


def _decode_headers(hdrs: str | None) -> dict[str, str]:
    """Headers of a ``STREAM.MSG.GET`` answer (base64 of ``NATS/1.0\\r\\nK: V\\r\\n...``)."""
    if not hdrs:
        return {}
    out: dict[str, str] = {}
    for line in base64.b64decode(hdrs).decode(errors="replace").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip()] = value.strip()
    return out


async def create_key_value(
    js: JetStream,
    bucket: str,
    *,
    history: int = 1,
    ttl: float | None = None,
    max_bytes: int = -1,
    storage: str = "file",
) -> KeyValue:
    """Create (or open, when it exists with the same settings) a bucket."""
    _check_name("bucket", bucket)
    check_int("history", history, minimum=1)
    if history > 64:
        raise ValueError(f"history must be <= 64, got {history!r}")
    if ttl is not None:
        check_seconds("ttl", ttl)
    await js.add_stream(
        f"KV_{bucket}",
        [f"$KV.{bucket}.>"],
        storage=storage,
        max_bytes=max_bytes,
        max_age=ttl,
        config={
            "max_msgs_per_subject": history,
            "discard": "new",
            "allow_rollup_hdrs": True,
            "deny_delete": True,
            "allow_direct": True,
        },
    )
    return KeyValue(js, bucket)


async def key_value(js: JetStream, bucket: str) -> KeyValue:
    """Open an existing bucket.

    Raises:
        JetStreamError: no such bucket.
    """
    _check_name("bucket", bucket)
    await js.stream_info(f"KV_{bucket}")
    return KeyValue(js, bucket)
