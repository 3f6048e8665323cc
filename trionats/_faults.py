"""A TCP fault-injection proxy written with Trio, for tests: :class:`FaultProxy`.

The proxy listens on 127.0.0.1 and forwards every accepted connection to one upstream
address (a nats-server). While traffic flows, the test changes what the network does:

* ``latency(seconds, jitter=0.0)``: each chunk is delivered ``seconds`` (plus a uniform
  ``[0, jitter]``) after it was read, in order, without limiting throughput;
* ``bandwidth(bytes_per_second)``: each direction is capped at that rate;
* ``split_writes()``: every byte is written on its own (``TCP_NODELAY``: one segment each);
* ``blackhole(direction)``: stop forwarding in one direction (``"up"``: client to server,
  ``"down"``: server to client) or ``"both"``; connections stay open and new ones are
  accepted and stalled, like a network path that silently drops packets (what was read
  is held, not lost, as TCP would retransmit it once the path comes back);
* ``reset()``: abort every current connection with a TCP RST on both sides;
* ``half_close(direction)``: send EOF (FIN) in one direction and stop forwarding it, the
  other direction keeps flowing;
* ``heal()``: back to a plain pass-through (latency, bandwidth, split and black holes off).

Usage::

    async with open_fault_proxy(server.url) as proxy:
        async with trionats.open_connection(proxy.url) as nc:
            proxy.blackhole()
            ...
            proxy.heal()

Only for tests: it binds 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import math
import random
import socket
import struct
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Literal, Protocol, final

import trio

from ._validate import check_number, check_seconds, parse_servers

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

__all__ = ["Direction", "FaultProxy", "open_fault_proxy"]

Direction = Literal["up", "down", "both"]
"""``"up"``: client to server, ``"down"``: server to client, ``"both"``."""

_HOST = "127.0.0.1"
_CHUNK = 65536
_QUEUE = 16  # chunks buffered per direction between reader and writer


class _HasURL(Protocol):
    @property
    def url(self) -> str: ...


def _check_direction(direction: object) -> tuple[bool, bool]:
    if not isinstance(direction, str):
        raise TypeError(f'direction must be "up", "down" or "both", got {direction!r}')
    if direction not in ("up", "down", "both"):
        raise ValueError(f'direction must be "up", "down" or "both", got {direction!r}')
    return direction in ("up", "both"), direction in ("down", "both")


def _abort(stream: trio.SocketStream) -> None:
    """Close with SO_LINGER 0: the peer gets a RST, not a FIN."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@final
class _Pair:
    """One proxied connection: the client side, the upstream side and their pumps."""

    def __init__(self, client: trio.SocketStream) -> None:
        self.client = client
        self.upstream: trio.SocketStream | None = None
        self.scope = trio.CancelScope()
        self.reset = False
        self.eof_up = False  # half_close: EOF sent to the server, no more forwarding up
        self.eof_down = False


@final
class FaultProxy:
    """A TCP proxy on 127.0.0.1 whose faults a test switches while traffic flows.

    Create it with :func:`open_fault_proxy`. All fault methods are synchronous and take
    effect at once, on current and new connections alike.

    Attributes:
        upstream_host: where connections are forwarded.
        upstream_port: the upstream port.
        port: the port the proxy listens on (127.0.0.1).
        accepted: connections accepted so far.
        bytes_up: bytes forwarded from clients to the server.
        bytes_down: bytes forwarded from the server to clients.
        writes: socket writes made (one per byte under ``split_writes``).
    """

    def __init__(self, upstream_host: str, upstream_port: int, listener: trio.SocketListener):
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self._listener = listener
        self.port: int = listener.socket.getsockname()[1]
        self.accepted = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.writes = 0
        self._pairs: set[_Pair] = set()
        self._latency = 0.0
        self._jitter = 0.0
        self._rate: float | None = None
        self._split = False
        self._hole_up = False
        self._hole_down = False
        self._changed = trio.Event()
        self._random = random.Random()

    # -- what the test sees --
    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>``: give this to the client instead of the server's."""
        return f"nats://{_HOST}:{self.port}"

    @property
    def connections(self) -> int:
        """Connections currently open through the proxy."""
        return len(self._pairs)

    def __repr__(self) -> str:
        faults = []
        if self._latency or self._jitter:
            faults.append(f"latency={self._latency}+{self._jitter}")
        if self._rate is not None:
            faults.append(f"bandwidth={self._rate}")
        if self._split:
            faults.append("split_writes")
        if self._hole_up or self._hole_down:
            faults.append(f"blackhole(up={self._hole_up}, down={self._hole_down})")
        return (
            f"<FaultProxy {self.url} -> {self.upstream_host}:{self.upstream_port}"
            f" connections={self.connections} faults=[{', '.join(faults)}]>"
        )

    # -- faults --
    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def latency(self, seconds: float, jitter: float = 0.0) -> None:
        """Delay every chunk by ``seconds`` plus a uniform random ``[0, jitter]``.

        Order is kept; throughput is not limited (chunks are pipelined).

        Raises:
            TypeError: a value is not a number.
            ValueError: a value is negative, NaN or infinite.
        """
        self._latency = check_seconds("latency seconds", seconds, allow_zero=True)
        self._jitter = check_seconds("latency jitter", jitter, allow_zero=True)
        self._notify()

    def bandwidth(self, bytes_per_second: float | None) -> None:
        """Cap each direction of each connection at ``bytes_per_second`` (None: no cap).

        Raises:
            TypeError: not a number.
            ValueError: not a finite number > 0.
        """
        if bytes_per_second is not None:
            bytes_per_second = check_number(
                "bandwidth bytes_per_second", bytes_per_second, minimum=1
            )
            if math.isinf(bytes_per_second):
                raise ValueError(
                    f"bandwidth bytes_per_second must be finite, got {bytes_per_second!r}"
                )
        self._rate = bytes_per_second
        self._notify()

    def split_writes(self, enabled: bool = True) -> None:
        """Write every byte on its own (a client must reassemble protocol lines)."""
        if not isinstance(enabled, bool):
            raise TypeError(f"split_writes enabled must be a bool, got {enabled!r}")
        self._split = enabled
        self._notify()

    def blackhole(self, direction: Direction = "both") -> None:
        """Stop forwarding in ``direction``; connections stay open, new ones stall.

        Raises:
            TypeError: ``direction`` is not a str.
            ValueError: ``direction`` is not "up", "down" or "both".
        """
        up, down = _check_direction(direction)
        self._hole_up = self._hole_up or up
        self._hole_down = self._hole_down or down
        self._notify()

    def reset(self) -> None:
        """Abort every current connection: both the client and the server get a RST."""
        for pair in list(self._pairs):
            pair.reset = True
            _abort(pair.client)
            if pair.upstream is not None:
                _abort(pair.upstream)
            pair.scope.cancel()

    def half_close(self, direction: Direction = "down") -> None:
        """Send EOF in ``direction`` on every current connection and stop forwarding it.

        ``"down"``: the client reads EOF while its writes still reach the server;
        ``"up"``: the server reads EOF (and usually closes the connection).
        """
        up, down = _check_direction(direction)
        for pair in list(self._pairs):
            if up and not pair.eof_up and pair.upstream is not None:
                pair.eof_up = True
                with contextlib.suppress(OSError):
                    pair.upstream.socket.shutdown(socket.SHUT_WR)
            if down and not pair.eof_down:
                pair.eof_down = True
                with contextlib.suppress(OSError):
                    pair.client.socket.shutdown(socket.SHUT_WR)
        self._notify()

    def heal(self) -> None:
        """Pass traffic through unchanged again (connections already reset stay closed)."""
        self._latency = self._jitter = 0.0
        self._rate = None
        self._split = False
        self._hole_up = self._hole_down = False
        self._notify()

    # -- machinery --
    def _holed(self, up: bool) -> bool:
        return self._hole_up if up else self._hole_down

    async def _wait_open(self, up: bool) -> None:
        while self._holed(up):
            await self._changed.wait()

    async def _serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                client = await self._listener.accept()
                self.accepted += 1
                nursery.start_soon(self._handle, client)

    async def _handle(self, client: trio.SocketStream) -> None:
        pair = _Pair(client)
        self._pairs.add(pair)
        try:
            with pair.scope:
                try:
                    pair.upstream = await trio.open_tcp_stream(
                        self.upstream_host, self.upstream_port
                    )
                except OSError:
                    _abort(client)  # upstream down: the client sees its connection refused
                    return
                for stream in (client, pair.upstream):
                    with contextlib.suppress(OSError):
                        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                async with trio.open_nursery() as nursery:
                    done = [0]

                    async def direction(up: bool) -> None:
                        assert pair.upstream is not None
                        src, dst = (client, pair.upstream) if up else (pair.upstream, client)
                        broken = await self._pump(pair, src, dst, up)
                        if broken and not (pair.eof_up if up else pair.eof_down):
                            # one side failed (not a half-close of ours): the other
                            # gets a RST, as through a middlebox that lost its state
                            _abort(client)
                            _abort(pair.upstream)
                            nursery.cancel_scope.cancel()
                        done[0] += 1
                        if done[0] == 2:
                            nursery.cancel_scope.cancel()

                    nursery.start_soon(direction, True)
                    nursery.start_soon(direction, False)
        finally:
            self._pairs.discard(pair)
            with trio.CancelScope(shield=True):
                if pair.reset:
                    _abort(client)
                    if pair.upstream is not None:
                        _abort(pair.upstream)
                streams: list[trio.SocketStream | None] = [client, pair.upstream]
                for end in streams:
                    if end is not None:
                        with contextlib.suppress(trio.BrokenResourceError, OSError):
                            await end.aclose()

    async def _pump(
        self, pair: _Pair, src: trio.SocketStream, dst: trio.SocketStream, up: bool
    ) -> bool:
        """Forward ``src`` to ``dst`` until EOF; True if a socket broke on the way."""
        broken = False
        send, receive = trio.open_memory_channel[tuple[float, bytes] | None](_QUEUE)

        def ended() -> bool:
            return pair.eof_up if up else pair.eof_down

        async def reader() -> None:
            last_due = 0.0
            async with send:
                while True:
                    data = await src.receive_some(_CHUNK)
                    if not data:
                        await send.send(None)
                        return
                    await self._wait_open(up)
                    now = trio.current_time()
                    delay = self._latency + (
                        self._random.uniform(0, self._jitter) if self._jitter else 0.0
                    )
                    last_due = max(last_due, now + delay)
                    await send.send((last_due, data))

        async def writer() -> None:
            async with receive:
                async for item in receive:
                    if ended():
                        return
                    if item is None:
                        await dst.send_eof()
                        return
                    due, data = item
                    await trio.sleep_until(due)
                    await self._wait_open(up)
                    await self._write(dst, data, up, ended)

        async def guarded(part: Callable[[], Awaitable[None]], end: bool) -> None:
            nonlocal broken
            try:
                await part()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                broken = True
                nursery.cancel_scope.cancel()
            else:
                if end:
                    nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, reader, False)
            nursery.start_soon(guarded, writer, True)
        return broken

    async def _write(
        self, dst: trio.SocketStream, data: bytes, up: bool, ended: Callable[[], bool]
    ) -> None:
        view = memoryview(data)
        while view:
            if ended():
                return
            await self._wait_open(up)
            step = len(view)
            if self._split:
                step = 1
            rate = self._rate
            if rate is not None:
                step = min(step, max(1, int(rate / 20)))
            await dst.send_all(view[:step])
            self.writes += 1
            if up:
                self.bytes_up += step
            else:
                self.bytes_down += step
            view = view[step:]
            if rate is not None:
                await trio.sleep(step / rate)


@asynccontextmanager
async def open_fault_proxy(upstream: str | int | _HasURL) -> AsyncIterator[FaultProxy]:
    """Run a :class:`FaultProxy` on 127.0.0.1 in front of ``upstream`` for the block.

    Args:
        upstream: the server to forward to: a URL (``nats://127.0.0.1:4222``), a port on
            127.0.0.1, or anything with a ``url`` (a :class:`trionats.NatsServer`).

    Every proxied connection is closed when the block exits.

    Raises:
        TypeError: ``upstream`` has the wrong type.
        ValueError: ``upstream`` is not a valid URL or port.
    """
    if isinstance(upstream, bool):
        raise TypeError(f"upstream must be a URL, a port or a server, got {upstream!r}")
    if isinstance(upstream, int):
        if not 1 <= upstream <= 65535:
            raise ValueError(f"upstream port must be in 1..65535, got {upstream!r}")
        host, port = _HOST, upstream
    else:
        url = upstream if isinstance(upstream, str) else getattr(upstream, "url", None)
        if not isinstance(url, str):
            raise TypeError(f"upstream must be a URL, a port or a server, got {upstream!r}")
        parsed = parse_servers(url, "upstream")
        if len(parsed) != 1:
            raise ValueError(f"upstream must be one server, got {len(parsed)}")
        host, port = parsed[0].host, parsed[0].port
    listeners = await trio.open_tcp_listeners(0, host=_HOST)
    listener = listeners[0]
    assert isinstance(listener, trio.SocketListener)
    proxy = FaultProxy(host, port, listener)
    async with listener, trio.open_nursery() as nursery:
        await nursery.start(proxy._serve)
        try:
            yield proxy
        finally:
            proxy.heal()
            nursery.cancel_scope.cancel()
