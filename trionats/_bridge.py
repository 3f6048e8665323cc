"""The only module that imports asyncio, trio_asyncio or nats.

Layering: ``_pool``/``_subscriber`` -> ``_connection`` -> ``_bridge`` -> nats-py (asyncio).
``import trionats`` does not import this module (importing trio_asyncio swaps asyncio's
event loop policy for the whole process); ``_connection`` loads it when the first
connection opens.

What this module relies on in nats-py beyond its public API (checked by
``tests/test_bridge_internals.py`` so an upgrade fails loudly, not silently slower):

* ``Client._send_publish`` is a buffer append that completes without suspending
  unless the outgoing buffer passed ``pending_size`` (then it awaits a flush);
* ``Client.msg_class`` builds every delivered message;
* a subscription without a callback hands messages to ``sub._pending_queue.put_nowait``
  from the read loop, so a Trio object with that method receives them synchronously;
* ``Client._pending_data_size``, ``_max_payload``, ``_max_pending_size``, ``stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import types
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import nats
import nats.errors
import sniffio
import trio
import trio_asyncio
import trio_asyncio._handles
from nats.aio.client import PING_PROTO
from nats.aio.client import Client as NatsClient
from nats.protocol.command import pub_cmd as _pub_cmd

from . import _errors

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine

__all__ = [
    "NatsClient",
    "append_publish",
    "current_loop",
    "finish_in_asyncio",
    "force_close",
    "loop_scope",
    "new_client",
    "run_aio",
    "send_ping",
    "step",
    "translate",
    "wait_future",
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


async def _main_loop_one_batched(self: Any, no_wait: bool = False) -> None:
    """trio-asyncio's ``_main_loop_one``, minus a Trio checkpoint per asyncio callback.

    The original awaits its handle channel (a full Trio scheduling round, inside a new
    cancel scope) for every callback: ~11 µs per callback instead of asyncio's 1.4 µs, and
    every hop of a read/flush chain waits for another scheduler batch. This version runs
    whatever is already queued without yielding, up to ``_LOOP_BATCH`` handles, then does
    one checkpoint; it waits (one checkpoint) only when the queue is empty, and opens a
    cancel scope only when a timer bounds the wait. Same order, same semantics.
    """
    ran = 0
    while True:
        obj = None
        timeout = math.inf
        if self._timers:
            timeout = self._timers[0]._when - self.time()
            if timeout <= 0:
                obj = heapq.heappop(self._timers)
        if obj is None:
            try:
                obj = self._q_recv.receive_nowait()
            except trio.WouldBlock:
                if no_wait:
                    raise
                if ran:
                    return  # let _main_loop check _stopped; we wait on the next call
                if timeout == math.inf:
                    obj = await self._q_recv.receive()
                else:
                    with trio.move_on_after(timeout):
                        obj = await self._q_recv.receive()
                    if obj is None:
                        return
            if isinstance(obj, asyncio.TimerHandle):
                heapq.heappush(self._timers, obj)
                continue
        if isinstance(obj, trio_asyncio._handles.AsyncHandle):
            obj._context.run(self._nursery.start_soon, obj._run, name=obj._callback)
            await obj._started.wait()
            return
        if not obj._cancelled:
            previous, sniffio.thread_local.name = sniffio.thread_local.name, "asyncio"
            try:
                obj._run()
            finally:
                sniffio.thread_local.name = previous
        ran += 1
        if ran >= _LOOP_BATCH or no_wait:
            await trio.lowlevel.checkpoint()
            return


@asynccontextmanager
async def loop_scope() -> AsyncIterator[None]:
    """Run the block with a trio-asyncio loop: the caller's if one is open, else a new one."""
    if trio_asyncio.current_loop.get() is not None:
        yield
        return
    try:
        async with trio_asyncio.open_loop() as loop:
            loop.set_exception_handler(_exception_handler)
            # Looked up on the instance at every iteration of the loop's _main_loop.
            loop._main_loop_one = types.MethodType(_main_loop_one_batched, loop)
            yield
    except BaseExceptionGroup as group:
        # open_loop's nurseries wrap whatever the block raised; hand callers the original.
        leaf = _single_leaf(group)
        if leaf is None:
            raise
        raise leaf from leaf.__cause__


def _single_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception inside nested single-member groups, or None."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


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
        return _errors.NoRespondersError(str(exc) or "no responders")
    if isinstance(exc, nats.errors.TimeoutError | asyncio.TimeoutError):
        return _errors.TimeoutError(str(exc) or "timed out")
    if isinstance(
        exc,
        nats.errors.ConnectionClosedError
        | nats.errors.ConnectionDrainingError
        | nats.errors.ConnectionReconnectingError,
    ):
        return _errors.ConnectionClosedError(str(exc))
    if isinstance(exc, nats.errors.OutboundBufferLimitError):
        return _errors.ReconnectBufferFullError(
            "not connected and the reconnect buffer is full (pending_size)"
        )
    if isinstance(exc, nats.errors.NoServersError | nats.errors.AuthorizationError | OSError):
        return _errors.ConnectError(str(exc) or type(exc).__name__)
    return _errors.TrionatsError(f"{type(exc).__name__}: {exc}")


def step(coro: Coroutine[Any, Any, Any]) -> tuple[bool, Any]:
    """Run a nats-py coroutine from Trio up to its first suspension, synchronously.

    Returns ``(True, result)`` when it completed (the usual case: nats-py's command
    coroutines only append to a buffer), or ``(False, yielded)`` when it suspended; the
    caller then finishes it with :func:`finish_in_asyncio` or ``_resume`` in a task, or
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


async def finish_in_asyncio(coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
    """Wait, from Trio, for a stepped coroutine that suspended (a forced flush).

    The continuation runs as its own asyncio task and is not cancelled with the caller:
    the message is already in the outgoing buffer when this is called, so a Trio cancel
    here only stops the waiting (backpressure), never un-sends the message.
    """
    loop = trio_asyncio.current_loop.get()
    task = loop.create_task(_resume(coro, yielded))
    await trio_asyncio.run_aio_future(asyncio.shield(task))


async def force_close(client: NatsClient, timeout: float) -> None:
    """Close a nats-py client, shielded and bounded; tear the socket down if that hangs.

    Safe to call twice and on a client that never finished connecting (closing the socket
    of a connect that timed out works around a nats-py leak).
    """
    with trio.CancelScope(shield=True):
        with trio.move_on_after(timeout):
            try:
                await trio_asyncio.aio_as_trio(client.close)()
            except Exception as exc:  # pragma: no cover - depends on nats-py's state
                log.debug("close failed: %r", exc)
        transport = getattr(client, "_transport", None)
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()
        for name in ("_reading_task", "_flusher_task", "_ping_interval_task", "_reconnection_task"):
            task = getattr(client, name, None)
            if task is not None and not task.done():
                task.cancel()
        # Let the cancelled tasks run their cancellation before the loop can close.
        await trio_asyncio.aio_as_trio(asyncio.sleep)(0)


def append_publish(
    client: NatsClient, subject: str, reply: str, payload: Any
) -> Coroutine[Any, Any, Any] | None:
    """Append a PUB (without headers) to the client's outgoing buffer, synchronously.

    The same steps as nats-py's ``_send_publish`` + ``_send_command``, minus the coroutine
    (creating and finishing one per message costs more than the append itself). Returns
    the follow-up nats-py would have awaited, for the caller to step: a kick of the
    flusher when its queue is empty (once per batch), or a forced flush when the buffer
    passed ``pending_size``; None when there is nothing more to do.
    """
    cmd = _pub_cmd(subject, reply, payload)
    stats = client.stats
    stats["out_msgs"] += 1
    stats["out_bytes"] += len(payload)
    client._pending.append(cmd)
    size = client._pending_data_size + len(cmd)
    client._pending_data_size = size
    if 0 < client._max_pending_size < size:
        return client._flush_pending(force_flush=True)
    queue = client._flush_queue
    if queue is not None and queue.empty():
        return client._flush_pending()
    return None


def send_ping(client: NatsClient) -> asyncio.Future[Any]:
    """Queue a PING behind everything already buffered; the future completes on its PONG.

    Not nats-py's ``_send_ping``: that writes the PING straight to the socket, ahead of
    publishes still in the outgoing buffer, so its PONG can come back before the server
    has seen them and a flush would return too early.
    """
    loop = trio_asyncio.current_loop.get()
    future: asyncio.Future[Any] = loop.create_future()
    client._pongs.append(future)
    client._pending.append(PING_PROTO)
    client._pending_data_size += len(PING_PROTO)
    coro = client._flush_pending()
    done, yielded = step(coro)
    if not done:  # the flusher's queue was full: finish queueing in asyncio
        loop.create_task(_resume(coro, yielded))
    return future


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


def new_client() -> NatsClient:
    return NatsClient()
