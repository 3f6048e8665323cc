"""The adapter: with its protocol parser (``_wire``), the only modules that import
asyncio, trio_asyncio or nats.

Layering: ``_pool``/``_subscriber`` -> ``_connection`` -> ``_bridge`` -> nats-py (asyncio).
``import trionats`` does not import this module (importing trio_asyncio swaps asyncio's
event loop policy for the whole process); ``_connection`` loads it when the first
connection opens.

Every touch of nats-py or trio-asyncio internals is here; the rest of the package calls
the functions below with the nats-py client as an opaque handle. What they rely on beyond
the public APIs (checked by ``tests/test_bridge_internals.py`` and, at the first
connection, by :func:`check_internals`, so an upgrade fails loudly, not silently slower):

* ``Client._pending`` (a list of bytes), ``_pending_data_size``, ``_max_pending_size``,
  ``_flush_queue`` (an asyncio.Queue the flusher takes one item per write from, and
  completes unless ``done()``), ``_pongs``, ``_status`` and the status constants,
  ``_max_payload``, ``stats``, ``options``;
* ``nats.protocol.command.pub_cmd`` / ``hpub_cmd`` build the protocol commands;
* ``Client.msg_class`` builds every message nats-py's parser delivers; ``Client._ps`` is
  the parser ``_read_loop`` feeds (replaced by ``_wire.FastParser``, a subclass of
  ``nats.protocol.parser.Parser`` relying on its ``buf``, ``state``, ``reset`` and
  ``parse``), and ``_process_msg``'s handling of ``stats``, ``_subs``, ``_received``,
  ``_max_msgs``, ``_jsi`` and ``_future``, which the fast path repeats;
* a subscription without a callback hands messages to ``sub._pending_queue.put_nowait``
  from the read loop, so a Trio object with that method receives them synchronously;
  ``Client._remove_sub`` and ``_send_unsubscribe`` end one;
* trio-asyncio's loop: ``_main_loop_one``, ``_timers``, ``_q_recv``, ``_nursery``
  (see :func:`_main_loop_one_batched`); ``_q_send`` (what ``_queue_handle`` and
  ``call_soon_threadsafe`` send handles to), ``_io_task`` (one per reader/writer, run
  after ``_add_io_handler``), ``TrioAsyncioExit`` (see :func:`_install_loop`);
* ``nats.aio.transport.TcpTransport._io_writer`` (an asyncio StreamWriter), for
  :func:`write_now`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import heapq
import inspect
import logging
import math
import types
import warnings
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, final

import nats
import nats.errors
import sniffio
import trio

with warnings.catch_warnings():
    # trio-asyncio 0.15/0.16 subclass AbstractChildWatcher, deprecated since Python 3.12:
    # a user running with -W error must not see our import fail.
    warnings.filterwarnings("ignore", "'AbstractChildWatcher'", DeprecationWarning)
    import trio_asyncio
    import trio_asyncio._base
    import trio_asyncio._handles
from nats.aio.client import PING_PROTO
from nats.aio.client import Client as NatsClient
from nats.aio.transport import TcpTransport as _TcpTransport
from nats.protocol.command import hpub_cmd as _hpub_cmd

from . import _errors
from ._validate import redact
from ._wire import FastParser

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine

__all__ = [
    "APPENDED",
    "APPENDED_YIELD",
    "MUST_WAIT",
    "NOT_OPEN",
    "RECONNECT_BUFFER_FULL",
    "TOO_BIG",
    "YIELD_BYTES",
    "NatsClient",
    "check_internals",
    "client_loop",
    "connect_options",
    "current_loop",
    "encode_headers",
    "flushed",
    "force_close",
    "install_msg_factory",
    "is_connecting",
    "kick",
    "last_error",
    "loop_scope",
    "max_payload",
    "new_client",
    "ready_queue",
    "run_aio",
    "send_ping",
    "send_unsub_nowait",
    "set_reconnect_options",
    "step",
    "subscribe_nowait",
    "translate",
    "try_append",
    "unsubscribe_nowait",
    "wait_future",
    "write_now",
]

log = logging.getLogger("trionats.bridge")


def _exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Ignore the CancelledError reports nats-py leaves behind; log everything else.

    nats-py's drain leaves a ``_GatheringFuture`` whose unretrieved CancelledError makes
    trio-asyncio's default handler crash ``open_loop()``.
    """
    exc = context.get("exception")
    if isinstance(exc, asyncio.CancelledError):
        return
    log.debug("asyncio loop reported: %s", context.get("message"), exc_info=exc)


# Handles run back to back before the batched main loop yields to Trio's scheduler.
_LOOP_BATCH = 64


@final
class _Ready:
    """The loop's handle queue, in place of trio-asyncio's memory channel.

    Installed as the loop's ``_q_send``: ``call_soon`` and friends (through
    ``_queue_handle``) and ``call_soon_threadsafe`` (through ``run_sync_soon``, in the Trio
    thread) call :meth:`send_nowait`. A deque, plus the parked main loop woken directly:
    cheaper than a channel, and an I/O task can run what a read queued itself (see
    :func:`_io_task_inline`) without breaking the order, which a channel that hands an
    item straight to its parked receiver would.
    """

    __slots__ = ("blocked", "direct_pass", "handles", "inline", "passes", "waiter")

    def __init__(self) -> None:
        self.handles: collections.deque[Any] = collections.deque()
        self.waiter: trio.lowlevel.Task | None = None  # the main loop, while parked
        self.inline = False  # an I/O task runs what gets queued: do not wake the main loop
        self.blocked = False  # the main loop waits for an AsyncHandle's task to start
        # Passes over the queue (main loop batches, I/O task reads), and the pass of the
        # last direct write (write_now): at most one direct write per pass.
        self.passes = 0
        self.direct_pass = -1

    def send_nowait(self, handle: Any) -> None:
        self.handles.append(handle)
        waiter = self.waiter
        if waiter is not None and not self.inline:
            self.waiter = None
            trio.lowlevel.reschedule(waiter)

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            trio.lowlevel.reschedule(waiter)


def _run_handle(obj: Any) -> None:
    if not obj._cancelled:
        previous, sniffio.thread_local.name = sniffio.thread_local.name, "asyncio"
        try:
            obj._run()
        finally:
            sniffio.thread_local.name = previous


async def _main_loop_one_batched(self: Any, no_wait: bool = False) -> None:
    """trio-asyncio's ``_main_loop_one``, minus a Trio checkpoint per asyncio callback.

    The original awaits its handle channel (a full Trio scheduling round, inside a new
    cancel scope) for every callback: ~11 µs per callback instead of asyncio's 1.4 µs, and
    every hop of a read/flush chain waits for another scheduler batch. This version runs
    whatever is already queued (in :class:`_Ready`) without yielding, up to
    ``_LOOP_BATCH`` handles, then does one checkpoint; it waits (parked, woken by the next
    handle queued) only when the queue is empty, and opens a cancel scope only when a
    timer bounds the wait. Same order, same semantics.
    """
    ready: _Ready = self._trionats_ready
    handles = ready.handles
    ready.passes += 1
    ran = 0
    while True:
        obj = None
        timeout = math.inf
        if self._timers:
            timeout = self._timers[0]._when - self.time()
            if timeout <= 0:
                obj = heapq.heappop(self._timers)
        if obj is None:
            if not handles:
                if no_wait:
                    raise trio.WouldBlock
                if ran:
                    return  # let _main_loop check _stopped; we wait on the next call
                ready.waiter = trio.lowlevel.current_task()

                def abort(_: Any) -> trio.lowlevel.Abort:
                    ready.waiter = None
                    return trio.lowlevel.Abort.SUCCEEDED

                if timeout == math.inf:
                    await trio.lowlevel.wait_task_rescheduled(abort)
                else:
                    with trio.move_on_after(timeout):
                        await trio.lowlevel.wait_task_rescheduled(abort)
                return  # woken (or the timer is due): start over
            obj = handles.popleft()
            if isinstance(obj, asyncio.TimerHandle):
                heapq.heappush(self._timers, obj)
                continue
        if isinstance(obj, trio_asyncio._handles.AsyncHandle):
            obj._context.run(self._nursery.start_soon, obj._run, name=obj._callback)
            ready.blocked = True
            try:
                await obj._started.wait()
            finally:
                ready.blocked = False
            return
        _run_handle(obj)
        ran += 1
        if ran >= _LOOP_BATCH or no_wait:
            await trio.lowlevel.checkpoint()
            return


def _run_ready_inline(loop: Any, ready: _Ready) -> bool:
    """Run queued handles in the calling (I/O) task; True when the queue is now empty.

    Stops at an AsyncHandle (the main loop starts its task), while the main loop waits
    for one to start, and after ``_LOOP_BATCH`` handles. A TimerHandle goes to the
    loop's timers (the main loop is woken to recompute its wait).
    """
    handles = ready.handles
    ran = 0
    while handles:
        if ready.blocked or ran >= _LOOP_BATCH:
            return False
        obj = handles[0]
        if isinstance(obj, trio_asyncio._handles.AsyncHandle):
            return False
        handles.popleft()
        if isinstance(obj, asyncio.TimerHandle):
            heapq.heappush(loop._timers, obj)
            ready.wake()
            continue
        try:
            _run_handle(obj)
        except trio_asyncio._base.TrioAsyncioExit:
            handles.appendleft(obj)  # loop.stop(): the main loop runs it again, and stops
            return False
        ran += 1
    return True


async def _io_task_inline(self: Any, fd: Any, handle: Any, wait_ready: Any) -> None:
    """trio-asyncio's ``_io_task`` (one per reader/writer), minus two hops per read.

    The original runs the reader callback (``_read_ready``: the bytes go to the stream
    reader, which queues the read loop's wake-up), then ``await self.synchronize()``:
    it queues an Event.set, waits for the main loop to run everything queued, then
    waits for the fd again. That is a main-loop step and a second I/O-task step per
    read before the read loop even parses the bytes. Here the I/O task runs what the
    callback queued itself, in the same step (the read loop parses the message and hands
    it to the waiting Trio task), and synchronizes with the main loop only when
    something is left over. Same order: everything goes through the one queue.
    """
    ready: _Ready = self._trionats_ready
    with handle._scope:
        try:
            while True:
                if handle._cancelled:
                    break
                try:
                    await wait_ready(fd)
                except OSError:
                    if handle._cancelled:
                        break
                    raise
                if handle._cancelled:
                    break
                if ready.blocked:
                    handle._run()
                    await self.synchronize()
                    continue
                ready.inline = True
                ready.passes += 1
                try:
                    handle._run()
                    drained = _run_ready_inline(self, ready)
                finally:
                    ready.inline = False
                if not drained:
                    await self.synchronize()
        except Exception as exc:
            handle._raise(exc)


def _install_loop(loop: Any) -> None:
    """Swap the batched main loop, the handle queue and the inline I/O task into ``loop``.

    trio-asyncio looks ``_main_loop_one``, ``_q_send`` and ``_io_task`` up on the instance
    each time. The main loop is parked in its original ``_main_loop_one`` (in the old
    channel's ``receive``): a no-op handle sent there lets it return, and its next
    iteration is ours.
    """
    ready = _Ready()
    old_send, old_recv = loop._q_send, loop._q_recv
    while True:  # anything already queued keeps its place
        try:
            ready.handles.append(old_recv.receive_nowait())
        except trio.WouldBlock:
            break
    loop._trionats_ready = ready
    loop._q_send = ready
    loop._main_loop_one = types.MethodType(_main_loop_one_batched, loop)
    loop._io_task = types.MethodType(_io_task_inline, loop)
    old_send.send_nowait(asyncio.Handle(_nothing, (), loop))


def _nothing() -> None:
    pass


@asynccontextmanager
async def loop_scope() -> AsyncIterator[None]:
    """Run the block with a trio-asyncio loop: the caller's if one is open, else a new one."""
    if trio_asyncio.current_loop.get() is not None:
        yield
        return
    try:
        async with trio_asyncio.open_loop() as loop:
            loop.set_exception_handler(_exception_handler)
            _install_loop(loop)
            yield
    except BaseExceptionGroup as group:
        # open_loop's two nurseries wrap whatever the block raised: strip those two
        # levels, no more (a group the caller raised comes out intact).
        _errors.reraise_unwrapped(group, levels=_LOOP_NURSERY_LEVELS)


_LOOP_NURSERY_LEVELS = 2
"""Nested nurseries in ``trio_asyncio.open_loop`` around the block (0.15 and 0.16)."""


async def run_aio(fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any, **kwargs: Any) -> Any:
    """Await an asyncio coroutine function from Trio, converting cancellation both ways.

    A Trio cancel cancels the asyncio task. When nats-py catches that CancelledError and
    returns normally (drain, ``_flush_pending``), the Trio cancel is restored here instead of
    vanishing. nats-py exceptions are translated into trionats ones.
    """
    try:
        result = await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)
    except asyncio.CancelledError:
        # asyncio cancelled without a Trio cancel (e.g. the loop is shutting down).
        await trio.lowlevel.checkpoint_if_cancelled()
        raise _errors.ConnectionClosedError(
            "the operation was cancelled on the asyncio side"
        ) from None
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        await trio.lowlevel.checkpoint_if_cancelled()
        raise translate(exc) from exc
    await trio.lowlevel.checkpoint_if_cancelled()
    return result


def translate(exc: BaseException) -> BaseException:
    """Map a nats-py / asyncio exception to the trionats hierarchy."""
    if isinstance(exc, _errors.TrionatsError):
        return exc
    if isinstance(exc, nats.errors.NoRespondersError):
        return _errors.NoRespondersError(redact(str(exc)) or "no responders")
    if isinstance(exc, nats.errors.TimeoutError | asyncio.TimeoutError):
        return _errors.TimeoutError(redact(str(exc)) or "timed out")
    if isinstance(
        exc,
        nats.errors.ConnectionClosedError
        | nats.errors.ConnectionDrainingError
        | nats.errors.ConnectionReconnectingError,
    ):
        return _errors.ConnectionClosedError(redact(str(exc)) or type(exc).__name__)
    if isinstance(exc, nats.errors.OutboundBufferLimitError):
        return _errors.ReconnectBufferFullError(
            "not connected and the reconnect buffer is full (pending_size)"
        )
    if isinstance(exc, nats.errors.NoServersError | nats.errors.AuthorizationError | OSError):
        return _errors.ConnectError(redact(str(exc)) or type(exc).__name__)
    if isinstance(exc, nats.errors.Error):  # nats-py's own message names it ("nats: ...")
        return _errors.TrionatsError(redact(str(exc)) or type(exc).__name__)
    return _errors.TrionatsError(redact(f"{type(exc).__name__}: {exc}"))


def step(coro: Coroutine[Any, Any, Any]) -> tuple[bool, Any]:
    """Run a nats-py coroutine from Trio up to its first suspension, synchronously.

    Returns ``(True, result)`` when it completed (the usual case: nats-py's command
    coroutines only append to a buffer), or ``(False, yielded)`` when it suspended; the
    caller then finishes it with ``_resume`` in an asyncio task, or
    closes it. nats-py exceptions are translated.
    """
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return True, stop.value
    except Exception as exc:
        raise translate(exc) from exc
    return False, yielded


async def _resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
    """Finish, as an asyncio task, a coroutine that was stepped from Trio and suspended."""
    while True:
        if yielded is not None:
            yielded._asyncio_future_blocking = False
            await yielded
        else:
            await asyncio.sleep(0)
        try:
            yielded = coro.send(None)
        except StopIteration:
            return


async def force_close(client: NatsClient, timeout: float) -> None:
    """Close a nats-py client, shielded and bounded; tear the socket down if that hangs.

    Safe to call twice and on a client that never finished connecting (closing the socket
    of a connect that timed out works around a nats-py leak).
    """
    with trio.CancelScope(shield=True):
        with trio.move_on_after(timeout):
            try:
                await trio_asyncio.aio_as_trio(client.close)()
            except (Exception, asyncio.CancelledError) as exc:
                # CancelledError: nats-py's close awaits the stream's wait_closed(), whose
                # future is cancelled when the socket was torn down mid-reconnect (seen
                # closing a pool right after a server restart). Not a cancel of ours: we
                # are shielded, and a Trio cancel would arrive as trio.Cancelled.
                log.debug("close failed: %r", exc)
        transport = getattr(client, "_transport", None)
        if transport is not None:
            # Abort, not close: a close waits to write what is buffered, and a frozen
            # peer never reads it, so the socket would outlive the loop.
            writer = getattr(transport, "_io_writer", None)
            raw = getattr(writer, "transport", None)
            with contextlib.suppress(Exception):
                if raw is not None:
                    raw.abort()  # a no-op on a transport already closed
                transport.close()
        for name in ("_reading_task", "_flusher_task", "_ping_interval_task", "_reconnection_task"):
            task = getattr(client, name, None)
            if task is not None and not task.done():
                task.cancel()
        # Let the cancelled tasks run their cancellation before the loop can close.
        await trio_asyncio.aio_as_trio(asyncio.sleep)(0)


def announced_servers(client: NatsClient) -> list[str]:
    """The client URLs (``host:port``) the server's INFO announced (``connect_urls``)."""
    info = getattr(client, "_server_info", None) or {}
    urls = info.get("connect_urls") or []
    return [u for u in urls if isinstance(u, str)]


def abort_failed_attempt(client: NatsClient) -> None:
    """Abort the socket of a reconnect attempt that failed, if it is still open.

    When a server accepts TCP but never answers (frozen, or a black-holed path), nats-py's
    reconnect loop times out waiting for INFO and moves on without closing that socket:
    the next attempt replaces it, unclosed (a ResourceWarning and an fd until the GC).
    Called from the error callback while not connected, when no live socket exists.
    """
    transport = getattr(client, "_transport", None)
    writer = getattr(transport, "_io_writer", None)
    raw = getattr(writer, "transport", None)
    if raw is not None:
        with contextlib.suppress(Exception):
            raw.abort()  # a no-op on a transport already closed


# -- publishing ------------------------------------------------------------------------
# What try_append did (an int: the hot path compares ints, no enum attribute lookups).
APPENDED = 0
"""The message is in the outgoing buffer."""
APPENDED_YIELD = 1
"""The message is in the outgoing buffer, which is large: yield so the flusher writes it."""
MUST_WAIT = 2
"""Not appended: the buffer is over ``pending_size``; wait for :func:`flushed`, then retry."""
RECONNECT_BUFFER_FULL = 3
"""Not appended: not connected, and the reconnect buffer (``pending_size``) is full."""
NOT_OPEN = 4
"""Not appended: the client is closed, closing or draining."""
TOO_BIG = 5
"""Not appended: headers + payload exceed the server's ``max_payload``."""

YIELD_BYTES = 256 * 1024
"""Outgoing bytes buffered beyond which a publish yields so the flusher can write them."""

_CONNECTED = NatsClient.CONNECTED
_RECONNECTING = NatsClient.RECONNECTING
_CONNECTING = NatsClient.CONNECTING
_DISCONNECTED = NatsClient.DISCONNECTED


@final
class _Kick:
    """What a flusher kick puts in nats-py's flush queue: a "future" that is already done.

    nats-py's flusher takes one item per write and completes it unless ``done()``; a
    shared done object costs no allocation (nats-py's own kick creates a Future per batch).
    """

    __slots__ = ()

    def done(self) -> bool:
        return True


_KICK = _Kick()


def try_append(
    client: NatsClient, subject: str, reply: str, payload: Any, hdr: Any, wake: bool = True
) -> int:
    """Append a PUB (HPUB when ``hdr`` is not None) to the outgoing buffer, synchronously.

    The same steps as nats-py's ``publish`` + ``_send_command``, minus the coroutine and
    minus its forced flush: the caller waits for the flusher *before* appending (see
    :data:`MUST_WAIT`), so a cancelled wait sent nothing. Kicks the flusher when its queue
    is empty (once per batch), unless ``wake`` is False: then the caller must
    :func:`write_now` or :func:`kick` before it next yields. Returns one of the outcome
    constants above.
    """
    status = client._status
    pending = client._pending_data_size
    size = len(payload) if hdr is None else len(payload) + len(hdr)
    if size > client._max_payload:
        return TOO_BIG
    limit = client._max_pending_size
    if status == _CONNECTED:
        if 0 < limit < pending:
            return MUST_WAIT
    elif status in (_RECONNECTING, _DISCONNECTED, _CONNECTING):
        # Lost and coming back (a reconnect passes through CONNECTING while it sends its
        # CONNECT): buffered, replayed once connected, within pending_size.
        if limit <= 0 or pending + size > limit:
            return RECONNECT_BUFFER_FULL
    else:
        return NOT_OPEN
    cmd = (
        # == nats.protocol.command.pub_cmd(subject, reply, payload), without the call
        f"PUB {subject} {reply} {size}\r\n".encode() + payload + b"\r\n"
        if hdr is None
        else _hpub_cmd(subject, reply, hdr, payload)
    )
    stats = client.stats
    stats["out_msgs"] += 1
    stats["out_bytes"] += len(payload)
    client._pending.append(cmd)
    pending += len(cmd)
    client._pending_data_size = pending
    queue = client._flush_queue
    if wake and status == _CONNECTED and queue is not None and queue.empty():
        queue.put_nowait(_KICK)  # type: ignore[arg-type]  # duck-typed: see _Kick
    return APPENDED_YIELD if pending >= YIELD_BYTES else APPENDED


def kick(client: NatsClient) -> None:
    """Wake the flusher, unless a kick is already queued (what ``try_append`` does)."""
    queue = client._flush_queue
    if client._status == _CONNECTED and queue is not None and queue.empty():
        queue.put_nowait(_KICK)  # type: ignore[arg-type]  # duck-typed: see _Kick


def ready_queue() -> _Ready | None:
    """The handle queue of this task tree's loop: None on a loop :func:`loop_scope` did
    not open (a user's own trio-asyncio loop), where :func:`write_now` never writes."""
    return getattr(trio_asyncio.current_loop.get(), "_trionats_ready", None)


def write_now(client: NatsClient, ready: _Ready | None) -> bool:
    """Write the outgoing buffer to the socket from the calling task; False: not done.

    For a task about to wait for the server (a request, a flush): the flusher would
    write the buffer one Trio scheduling round later, in the main loop's next step; this
    writes it before the task parks. Only when the socket is idle (the transport holds
    nothing unsent: no backpressure to respect), connected over TCP/TLS, and at most once
    per pass of the loop: a hundred requesters parking in one scheduling round write the
    first request at once and leave the rest to the flusher, in one write. The order is
    kept: the whole buffer goes, in order, and anything the flusher took before is
    already in the transport ahead of it. When this returns False, :func:`kick` instead.
    """
    if (
        ready is None
        or ready.direct_pass == ready.passes
        or client._status != _CONNECTED
        or not client._pending_data_size
        or type(client._transport) is not _TcpTransport
    ):
        return False
    writer = client._transport._io_writer
    if writer is None:
        return False
    transport = writer.transport
    if transport.is_closing() or transport.get_write_buffer_size():
        return False
    pending = client._pending
    client._pending = []
    client._pending_data_size = 0
    ready.direct_pass = ready.passes
    writer.write(pending[0] if len(pending) == 1 else b"".join(pending))
    return True


def encode_headers(headers: dict[str, str]) -> bytes:
    """The NATS/1.0 header block of an HPUB (names and values already validated)."""
    parts = [b"NATS/1.0\r\n"]
    for key, value in headers.items():
        parts.append(f"{key}: {value.strip()}\r\n".encode())
    parts.append(b"\r\n")
    return b"".join(parts)


def _repair_write_pause(client: NatsClient) -> None:
    """Pause the socket's protocol when its write buffer is past the high-water mark.

    nats-py's flusher writes with ``writelines`` and then awaits ``drain()``, which
    blocks only while the protocol is paused. On some CPython versions (seen on 3.12.1
    and 3.13.0) the selector transport's ``writelines`` never pauses it, so ``drain()``
    never blocks and a frozen server let the transport's buffer grow without bound
    (146 MB in 2 s in our test). ``_maybe_pause_protocol`` is what ``write`` calls; where
    ``writelines`` already paused the protocol it does nothing.
    """
    writer = getattr(client._transport, "_io_writer", None)
    transport = getattr(writer, "transport", None)
    pause = getattr(transport, "_maybe_pause_protocol", None)
    if pause is not None:
        with contextlib.suppress(Exception):
            pause()


def flushed(client: NatsClient) -> asyncio.Future[Any]:
    """A future that completes once the flusher has written the buffer out (a kick).

    Already done when not connected (the buffer is replayed on reconnect). Waiting for it
    (:func:`wait_future`) is the publish backpressure; cancelling the wait changes nothing.
    """
    loop = trio_asyncio.current_loop.get()
    future: asyncio.Future[Any] = loop.create_future()
    queue = client._flush_queue
    if client._status != _CONNECTED or queue is None:
        future.set_result(None)
        return future
    _repair_write_pause(client)
    try:
        queue.put_nowait(future)
    except asyncio.QueueFull:  # pragma: no cover - 1024 kicks queued: finish in asyncio
        loop.create_task(queue.put(future))
    return future


def send_ping(client: NatsClient, ready: _Ready | None = None) -> asyncio.Future[Any]:
    """Queue a PING behind everything already buffered; the future completes on its PONG.

    Not nats-py's ``_send_ping``: that writes the PING straight to the socket, ahead of
    publishes still in the outgoing buffer, so its PONG can come back before the server
    has seen them and a flush would return too early. The buffer, PING included, is
    written at once when :func:`write_now` can, else by the flusher.
    """
    loop = trio_asyncio.current_loop.get()
    future: asyncio.Future[Any] = loop.create_future()
    client._pongs.append(future)
    client._pending.append(PING_PROTO)
    client._pending_data_size += len(PING_PROTO)
    if not write_now(client, ready):
        flushed(client)
    return future


# -- subscriptions -----------------------------------------------------------------------
def _step_without_forced_flush(client: NatsClient, coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a nats-py command coroutine (subscribe, unsubscribe) to completion, synchronously.

    They append to the buffer and kick the flusher; past ``pending_size`` they would also
    await a forced flush through ``asyncio.wait_for``, which fails outside an asyncio task
    on Python >= 3.12. With the limit lifted for this one synchronous step they never
    suspend; the command is small and the flusher writes it with the rest.
    """
    limit = client._max_pending_size
    client._max_pending_size = 0
    try:
        done, result = step(coro)
    finally:
        client._max_pending_size = limit
    if not done:  # pragma: no cover - only a full flusher queue (1024 kicks) suspends
        loop = trio_asyncio.current_loop.get()
        loop.create_task(_resume(coro, result))
        return None
    return result


def subscribe_nowait(client: NatsClient, subject: str, queue: str | None, sink: Any) -> Any:
    """Subscribe in nats-py, with ``sink`` as the subscription's pending queue.

    ``sink.put_nowait(msg)`` is then called synchronously by the read loop for every
    message. Returns the nats-py subscription (an opaque handle for :func:`unsubscribe_nowait`).
    """
    sub = _step_without_forced_flush(client, client.subscribe(subject, queue=queue or ""))
    if sub is None:  # pragma: no cover - see _step_without_forced_flush
        raise _errors.TrionatsError("nats-py subscribe suspended unexpectedly")
    # Nothing can have arrived yet: the SUB is not written before we yield.
    sub._pending_queue = sink
    sub._pending_bytes_limit = 0  # the sink enforces its own limits (and counts drops)
    return sub


def unsubscribe_nowait(client: NatsClient, nats_sub: Any, *, send_unsub: bool) -> None:
    """Stop routing messages to ``nats_sub``; with ``send_unsub``, also queue an UNSUB."""
    sid = nats_sub._id
    client._remove_sub(sid)
    if send_unsub:
        send_unsub_nowait(client, nats_sub)


def send_unsub_nowait(client: NatsClient, nats_sub: Any) -> None:
    """Queue an UNSUB (the server stops sending after it; in-flight messages still come)."""
    if client._status != _CONNECTED:
        return  # nats-py does not replay removed subscriptions on reconnect
    with contextlib.suppress(_errors.TrionatsError):  # the connection died meanwhile
        _step_without_forced_flush(client, client._send_unsubscribe(nats_sub._id))


# -- state -------------------------------------------------------------------------------
def max_payload(client: NatsClient) -> int:
    """The largest message (headers + payload) the server accepts, from its INFO."""
    return int(client._max_payload)


def is_connecting(client: NatsClient) -> bool:
    """The first connect (or a reconnect) is under way."""
    return client._status in (_DISCONNECTED, _CONNECTING)


def last_error(client: NatsClient) -> BaseException | None:
    """The last error nats-py recorded (a server ``-ERR`` among them), or None."""
    err = client.last_error
    return err if isinstance(err, BaseException) else None


_CONNECT_PARAMETERS = frozenset(inspect.signature(NatsClient.connect).parameters)


def connect_options(options: dict[str, Any]) -> dict[str, Any]:
    """nats-py's connect options: ``skip_subject_validation`` only where it exists (2.16+).

    nats-py 2.15 does not validate subjects client-side at all: there is nothing to skip.
    """
    if "skip_subject_validation" in _CONNECT_PARAMETERS:
        return options
    return {k: v for k, v in options.items() if k != "skip_subject_validation"}


def install_msg_factory(
    client: NatsClient, msg_type: Callable[..., Any], conn: Any, sinks: tuple[type, ...]
) -> None:
    """Every delivered message is ``msg_type(conn, subject, reply, data, headers)``.

    nats-py's ``msg_class`` builds them where nats-py's parser delivers; the client's
    parser becomes a :class:`~trionats._wire.FastParser`, which builds and hands over a
    plain MSG to a pending queue of one of the ``sinks`` types itself (see ``_wire``).
    """
    client.msg_class = functools.partial(msg_type, conn)  # type: ignore[assignment]
    client._ps = FastParser(client, msg_type, conn, sinks)


def set_reconnect_options(
    client: NatsClient,
    *,
    allow_reconnect: bool,
    max_reconnect_attempts: int,
    reconnect_time_wait: float,
    connect_timeout: float,
) -> None:
    """After the first connect: the user's reconnect policy (nats-py reads it live)."""
    options = client.options
    options["allow_reconnect"] = allow_reconnect
    options["max_reconnect_attempts"] = max_reconnect_attempts
    options["reconnect_time_wait"] = reconnect_time_wait
    options["connect_timeout"] = connect_timeout


async def wait_future(future: asyncio.Future[Any]) -> Any:
    """Wait from Trio for an asyncio future, without a bridge round trip.

    Cancelling the wait does not cancel the future.
    """
    if future.done():
        await trio.lowlevel.checkpoint()
        return future.result()
    task = trio.lowlevel.current_task()
    waiting = True

    def on_done(_: asyncio.Future[Any]) -> None:
        nonlocal waiting
        if waiting:  # a done-callback already queued when the wait was aborted is ignored
            waiting = False
            trio.lowlevel.reschedule(task)

    def abort(_: Any) -> trio.lowlevel.Abort:
        nonlocal waiting
        waiting = False
        future.remove_done_callback(on_done)
        return trio.lowlevel.Abort.SUCCEEDED

    future.add_done_callback(on_done)
    await trio.lowlevel.wait_task_rescheduled(abort)
    return future.result()


def current_loop() -> Any:
    """The trio-asyncio loop of this task tree (its clock is Trio's)."""
    return trio_asyncio.current_loop.get()


def client_loop(client: NatsClient) -> Any:
    """The asyncio loop ``client``'s read task runs on, None before it connected."""
    task = getattr(client, "_reading_task", None)
    return None if task is None else task.get_loop()


def new_client() -> NatsClient:
    return NatsClient()


# -- compatibility check --
SUPPORTED = "nats-py>=2.15,<2.17; trio-asyncio>=0.15,<0.17; trio>=0.27"
"""The dependency range CI tests (``.ci/run``); a test keeps it equal to pyproject.toml."""

_internals_checked = False
_internals_problem: str | None = None


def check_internals() -> None:
    """Check, once per process, that the nats-py and trio-asyncio internals used here exist.

    Covers what this module and the connect options rely on beyond the public APIs:
    attributes, status constants, ``Client.connect`` keyword arguments, and the names the
    relied-on nats-py / trio-asyncio functions use (their code objects' ``co_names``, so no
    source files are needed). The outcome is cached: later calls cost a global lookup.

    Raises:
        TrionatsError: one message naming the installed nats-py, trio-asyncio and trio
            versions, the supported range (:data:`SUPPORTED`) and every missing piece.
    """
    global _internals_checked, _internals_problem
    if not _internals_checked:
        import importlib.metadata
        import inspect

        import nats.aio.client
        import nats.aio.subscription
        import nats.aio.transport
        import nats.protocol.command
        import nats.protocol.parser
        import trio_asyncio._base

        missing: list[str] = []

        def uses(where: str, fn: Any, names: str) -> None:
            code = getattr(fn, "__code__", None)
            have = () if code is None else code.co_names
            absent = [name for name in names.split() if name not in have]
            if absent:
                missing.append(f"{where} using {', '.join(absent)}")

        def params(where: str, fn: Any, names: str) -> None:
            try:
                have: Any = inspect.signature(fn).parameters
            except (TypeError, ValueError):  # not a function
                have = ()
            absent = [name for name in names.split() if name not in have]
            if absent:
                missing.append(f"{where}({'=, '.join(absent)}=)")

        def has(where: str, obj: Any, names: str) -> None:
            missing.extend(f"{where}.{name}" for name in names.split() if not hasattr(obj, name))

        client_cls: Any = getattr(nats.aio.client, "Client", None)
        statuses = (
            "DISCONNECTED CONNECTED CLOSED RECONNECTING CONNECTING DRAINING_SUBS DRAINING_PUBS"
        )
        for value, name in enumerate(statuses.split()):
            if getattr(client_cls, name, None) != value:
                missing.append(f"Client.{name} == {value}")
        has(
            "Client",
            client_cls,
            "connect close drain subscribe new_inbox is_connected last_error "
            "_send_unsubscribe _remove_sub _flush_pending _flusher",
        )
        try:
            client = client_cls()
        except Exception as exc:  # pragma: no cover - only an incompatible nats-py
            client = None
            missing.append(f"Client() ({type(exc).__name__}: {exc})")
        has(
            "Client()",
            client,
            "_pending _pending_data_size _max_pending_size _max_payload _flush_queue _pongs "
            "_status _subs _transport _reading_task _flusher_task _ping_interval_task "
            "_reconnection_task msg_class",
        )
        if not isinstance(getattr(client, "_pending", None), list):
            missing.append("Client()._pending as a list")
        stats = getattr(client, "stats", None)
        if not isinstance(stats, dict) or not {"out_msgs", "out_bytes"} <= stats.keys():
            missing.append("Client().stats['out_msgs', 'out_bytes']")
        if not isinstance(getattr(client, "options", None), dict):
            missing.append("Client().options as a dict")
        params(
            "Client.connect",
            getattr(client_cls, "connect", None),
            "servers name error_cb disconnected_cb reconnected_cb discovered_server_cb "
            "closed_cb lame_duck_mode_cb connect_timeout allow_reconnect "
            "max_reconnect_attempts reconnect_time_wait ping_interval max_outstanding_pings "
            "no_echo pending_size inbox_prefix user password token nkeys_seed nkeys_seed_str "
            "user_credentials tls tls_hostname",
        )
        # The read loop hands each message, built by msg_class, to the subscription's
        # _pending_queue.put_nowait; the flusher takes one kick per write, completes it
        # unless done().
        uses(
            "Client._process_msg",
            getattr(client_cls, "_process_msg", None),
            "_pending_queue put_nowait _pending_bytes_limit _build_message",
        )
        uses("Client._build_message", getattr(client_cls, "_build_message", None), "msg_class")
        # The fast parser (_wire.FastParser) repeats _process_msg's plain case.
        uses(
            "Client._process_msg",
            getattr(client_cls, "_process_msg", None),
            "stats _subs _received _max_msgs _jsi _future",
        )
        uses("Client._read_loop", getattr(client_cls, "_read_loop", None), "_ps parse")
        parser_mod: Any = getattr(nats.protocol, "parser", None)
        has("nats.protocol.parser", parser_mod, "Parser AWAITING_CONTROL_LINE")
        parser_cls: Any = getattr(parser_mod, "Parser", None)
        has("Parser", parser_cls, "reset parse")
        try:
            has("Parser()", parser_cls(), "buf state")
        except Exception as exc:  # a Parser that cannot be built (tested)
            missing.append(f"Parser() ({type(exc).__name__}: {exc})")
        uses(
            "Client._flusher",
            getattr(client_cls, "_flusher", None),
            "_flush_queue _pending _pending_data_size done",
        )
        uses(
            "Subscription.__init__",
            getattr(getattr(nats.aio.subscription, "Subscription", None), "__init__", None),
            "_pending_queue _pending_bytes_limit _id",
        )
        if not isinstance(getattr(nats.aio.client, "PING_PROTO", None), bytes):
            missing.append("nats.aio.client.PING_PROTO")
        command = nats.protocol.command
        params("pub_cmd", getattr(command, "pub_cmd", None), "subject reply payload")
        params("hpub_cmd", getattr(command, "hpub_cmd", None), "subject reply hdr payload")
        has(
            "nats.errors",
            nats.errors,
            "Error NoRespondersError TimeoutError ConnectionClosedError ConnectionDrainingError "
            "ConnectionReconnectingError OutboundBufferLimitError NoServersError "
            "AuthorizationError",
        )
        has("trio_asyncio", trio_asyncio, "open_loop current_loop aio_as_trio")
        has("trio_asyncio._handles", trio_asyncio._handles, "AsyncHandle")
        loop_cls = getattr(trio_asyncio._base, "BaseTrioEventLoop", None)
        uses(
            "BaseTrioEventLoop._main_loop", getattr(loop_cls, "_main_loop", None), "_main_loop_one"
        )
        uses(
            "BaseTrioEventLoop._main_loop_one",
            getattr(loop_cls, "_main_loop_one", None),
            "_timers _q_recv _nursery AsyncHandle _started _context _run _callback",
        )
        # _install_loop: handles are queued through _q_send (our _Ready), readers and
        # writers run in _io_task, looked up on the loop when they are added.
        import trio_asyncio._async

        uses(
            "TrioEventLoop._queue_handle",
            getattr(getattr(trio_asyncio._async, "TrioEventLoop", None), "_queue_handle", None),
            "_q_send send_nowait",
        )
        uses(
            "BaseTrioEventLoop.call_soon_threadsafe",
            getattr(loop_cls, "call_soon_threadsafe", None),
            "_q_send send_nowait",
        )
        uses(
            "BaseTrioEventLoop._add_io_handler",
            getattr(loop_cls, "_add_io_handler", None),
            "_nursery start_soon _io_task",
        )
        uses(
            "BaseTrioEventLoop._io_task",
            getattr(loop_cls, "_io_task", None),
            "_scope _cancelled _run synchronize _raise",
        )
        has("trio_asyncio._base", trio_asyncio._base, "TrioAsyncioExit")
        # write_now: the TCP/TLS transport writes through its asyncio StreamWriter.
        uses(
            "TcpTransport.write",
            getattr(getattr(nats.aio.transport, "TcpTransport", None), "write", None),
            "_io_writer write",
        )
        if missing:

            def installed(dist: str) -> str:
                try:
                    return importlib.metadata.version(dist)
                except importlib.metadata.PackageNotFoundError:  # pragma: no cover
                    return "not installed"

            _internals_problem = (
                f"trionats does not support the installed nats-py {installed('nats-py')}, "
                f"trio-asyncio {installed('trio-asyncio')}, trio {installed('trio')}: these "
                f"internals it relies on are missing or changed: {'; '.join(missing)}. "
                f"Supported: {SUPPORTED}."
            )
        _internals_checked = True
    if _internals_problem is not None:
        raise _errors.TrionatsError(_internals_problem)
