"""The fast protocol parser (``trionats._wire.FastParser``) behaves as nats-py's parser.

A differential test: the same byte stream, cut into random chunks, goes through nats-py's
``Parser`` on one nats-py client and through ``FastParser`` on another, set up alike;
every message delivered, every control call (PING, PONG, INFO, -ERR), the client's stats,
each subscription's counters and the first error must be the same. No server is needed:
this is about parsing, so the clients are never connected, and their ``_process_ping``
and friends are recorders (nats-py's real ones would write to a socket).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Coroutine
from typing import Any

import nats.errors
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.protocol.parser import Parser

from trionats._msg import Msg
from trionats._wire import FastParser

FAST_SID = 1  # a plain subscription on a trionats sink: the fast path
COUNTED_SID = 2  # a trionats sink with an auto-unsubscribe count: nats-py's path
OTHER_SID = 3  # a sink of a type the fast parser does not know: nats-py's path
UNKNOWN_SID = 9  # no such subscription


class Sink:
    """A pending queue like trionats' own: records what it is handed."""

    def __init__(self, log: list[Any], name: str) -> None:
        self.log = log
        self.name = name

    def put_nowait(self, msg: Msg) -> None:
        self.log.append(("msg", self.name, msg.subject, msg.reply, msg.data, msg.headers))

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True


class OtherSink(Sink):
    pass


def run(coro: Coroutine[Any, Any, Any]) -> None:
    """Run a coroutine that never suspends (the recorders below never do)."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise AssertionError("the parser suspended")


def make_client(fast: bool, log: list[Any]) -> tuple[Client, Parser]:
    client = Client()
    conn = object()
    client.msg_class = lambda **kw: Msg(conn, kw["subject"], kw["reply"], kw["data"], kw["headers"])  # type: ignore[assignment]
    for sid, sink, max_msgs in (
        (FAST_SID, Sink(log, "fast"), 0),
        (COUNTED_SID, Sink(log, "counted"), 3),
        (OTHER_SID, OtherSink(log, "other"), 0),
    ):
        sub = Subscription(client, sid, subject=f"s{sid}", max_msgs=max_msgs)
        sub._pending_queue = sink  # type: ignore[assignment]
        sub._pending_bytes_limit = 0
        client._subs[sid] = sub

    async def ping() -> None:
        log.append(("ping",))

    async def pong() -> None:
        log.append(("pong",))

    async def info(info: dict[str, Any], initial_connection: bool = False) -> None:
        log.append(("info", info))

    async def err(text: str) -> None:
        log.append(("err", text))
        if "reset" in text:
            client._ps.reset()  # what nats-py does when the connection is lost

    client._process_ping = ping  # type: ignore[method-assign]
    client._process_pong = pong  # type: ignore[method-assign]
    client._process_info = info  # type: ignore[method-assign]
    client._process_err = err  # type: ignore[method-assign]
    parser: Parser = FastParser(client, Msg, conn, (Sink,)) if fast else Parser(client)
    client._ps = parser
    return client, parser


token = st.text("abcxyz.", min_size=1, max_size=6)
payload = st.binary(max_size=40) | st.sampled_from([b"\r\n", b"a\r\nPING\r\n", b"MSG a 1 1\r\n"])


@st.composite
def msg_item(draw: st.DrawFn) -> bytes:
    sid = draw(st.sampled_from([FAST_SID, FAST_SID, FAST_SID, COUNTED_SID, OTHER_SID, UNKNOWN_SID]))
    subject, data = draw(token), draw(payload)
    reply = draw(st.none() | token)
    sep = draw(st.sampled_from([" ", " ", " ", "  ", "\t"]))
    args = [subject, str(sid)] + ([] if reply is None else [reply]) + [str(len(data))]
    return f"MSG{sep}{' '.join(args)}\r\n".encode() + data + b"\r\n"


@st.composite
def hmsg_item(draw: st.DrawFn) -> bytes:
    sid = draw(st.sampled_from([FAST_SID, COUNTED_SID]))
    key, value, data = draw(token), draw(token), draw(payload)
    hdr = f"NATS/1.0\r\n{key}: {value}\r\n\r\n".encode()
    line = f"HMSG s {sid} {len(hdr)} {len(hdr) + len(data)}\r\n".encode()
    return line + hdr + data + b"\r\n"


item = st.one_of(
    msg_item(),
    msg_item(),
    msg_item(),
    hmsg_item(),
    st.sampled_from(
        [
            b"PING\r\n",
            b"PONG\r\n",
            b"+OK\r\n",
            b"-ERR 'Permissions Violation'\r\n",
            b"-ERR 'reset'\r\n",
            b'INFO {"max_payload": 1024}\r\n',
        ]
    ),
)


def feed(fast: bool, stream: bytes, cuts: list[int]) -> list[Any]:
    log: list[Any] = []
    client, _ = make_client(fast, log)
    bounds = [0, *sorted(cuts), len(stream)]
    for lo, hi in itertools.pairwise(bounds):
        try:
            run(client._ps.parse(stream[lo:hi]))
        except Exception as exc:
            log.append(("raised", type(exc)))
            break
    log.append(("stats", client.stats["in_msgs"], client.stats["in_bytes"]))
    log.append(("subs", sorted((sid, sub._received) for sid, sub in client._subs.items())))
    return log


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    items=st.lists(item, max_size=25),
    garbage=st.sampled_from(
        [
            b"",
            b"",
            b"",
            b"BOGUS\r\n",
            b"MSG x y z\r\n",
            b"MSG a 1 zz\r\n",
            b"MSG a 1 r x 1\r\nx\r\n",
        ]
    ),
    data=st.data(),
)
def test_fast_parser_does_what_nats_py_does(items: list[bytes], garbage: bytes, data: Any) -> None:
    stream = b"".join(items) + garbage + b"PING\r\n"
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    assert feed(True, stream, cuts) == feed(False, stream, cuts)


def test_the_fast_path_delivers_without_nats_py() -> None:
    """Plain MSGs to a trionats sink never reach Client._process_msg; the rest does."""
    log: list[Any] = []
    client, _ = make_client(True, log)
    calls: list[int] = []
    original = client._process_msg

    async def counting(sid: int, *args: Any) -> None:
        calls.append(sid)
        await original(sid, *args)

    client._process_msg = counting  # type: ignore[method-assign]
    run(client._ps.parse(b"MSG a 1 2\r\nhi\r\nMSG b 1 r 0\r\n\r\nMSG c 3 1\r\nx\r\n"))
    assert calls == [OTHER_SID]
    assert log[:2] == [("msg", "fast", "a", "", b"hi", None), ("msg", "fast", "b", "r", b"", None)]


def test_a_large_message_in_many_reads_is_assembled_once() -> None:
    """A payload split over many reads waits in the buffer until it is whole (no
    re-parse per read), and is delivered exactly once, intact."""
    log: list[Any] = []
    _, parser = make_client(True, log)
    body = bytes(range(256)) * 4096  # 1 MiB
    stream = f"MSG big 1 {len(body)}\r\n".encode() + body + b"\r\nPING\r\n"
    for i in range(0, len(stream), 32768):
        run(parser.parse(stream[i : i + 32768]))
    assert log == [("msg", "fast", "big", "", body, None), ("ping",)]
    assert not parser.buf


def test_a_reset_during_an_item_ends_the_pass() -> None:
    log: list[Any] = []
    _, parser = make_client(True, log)
    run(parser.parse(b"MSG a 1 1\r\nx\r\n-ERR 'reset'\r\nMSG b 1 1\r\ny\r\n"))
    assert [entry[:3] for entry in log] == [("msg", "fast", "a"), ("err", "'reset'")]
    run(parser.parse(b"MSG c 1 1\r\nz\r\n"))  # the next read parses normally
    assert log[-1][:3] == ("msg", "fast", "c")


def test_malformed_input_raises_as_nats_py_does() -> None:
    _, parser = make_client(True, [])
    with pytest.raises(nats.errors.ProtocolError):
        run(parser.parse(b"MSG a 1 x\r\n"))
    _, parser = make_client(True, [])
    with pytest.raises(nats.errors.ProtocolError):
        run(parser.parse(b"HELLO\r\n"))


def test_info_is_decoded_by_nats_py() -> None:
    log: list[Any] = []
    _, parser = make_client(True, log)
    info = {"server_id": "x", "max_payload": 10}
    run(parser.parse(b"INFO " + json.dumps(info).encode() + b"\r\n"))
    assert log == [("info", info)]


def test_a_control_line_is_as_long_as_nats_py_says() -> None:
    """nats-py's PING pattern (``PING\\s*\\r\\n``) also takes a blank line after it: found
    by the differential test, after a reset left the rest of a read behind."""
    stream = b"PING\r\n\r\nMSG a 1 1\r\nx\r\n"
    assert feed(True, stream, []) == feed(False, stream, [])
    assert ("msg", "fast", "a", "", b"x", None) in feed(True, stream, [])
