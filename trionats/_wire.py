"""The protocol parser trionats installs on its nats-py clients: nats-py's, with a fast path.

Part of the adapter (with ``_bridge``, the only modules that import nats). nats-py's
``Parser`` tries a chain of regular expressions on every control line, copies each payload
twice, and awaits two coroutines per MSG (``Client._process_msg`` and
``_process_headers``) before the message reaches its subscription's pending queue: about
half of what a delivered message costs in Python. :class:`FastParser` handles the common
case itself: a MSG without headers, for a subscription whose pending queue is one of
trionats' own sinks (a :class:`~trionats._subscription.Subscription` or the request
router) and that nats-py has nothing else to do for (no JetStream state, no auto-
unsubscribe count, no old-style request future). For those it does what
``_process_msg`` does (the client's ``in_msgs``/``in_bytes`` stats, the subscription's
``_received``), builds the message and calls the sink's ``put_nowait``, with no
coroutine and one copy of the payload.

Everything else goes through nats-py's own ``Parser.parse``, so its behaviour, errors
included, is nats-py's: an HMSG or another subscription's MSG one item at a time (an
HMSG's extent is what nats-py's own pattern matches), and from a control line (PING,
PONG, INFO, +OK, -ERR) or a line that is not a well-formed MSG, the rest of the read.
A ``reset()`` meanwhile (the client resets the parser when the connection is lost) ends
the pass, as it ends nats-py's. If nats-py's parser stops in the middle of an item (the
read ended inside it), the stream stays with nats-py's parser until it is back between
items.
"""

from __future__ import annotations

from typing import Any

from nats.protocol.parser import AWAITING_CONTROL_LINE, HMSG_RE, Parser

__all__ = ["FastParser"]

_CRLF = b"\r\n"


class FastParser(Parser):
    """nats-py's protocol parser plus a fast path for plain MSGs to trionats' sinks.

    ``msg_type(conn, subject, reply, data, headers)`` builds a delivered message;
    ``sinks`` are the pending-queue types whose ``put_nowait`` takes a message
    synchronously and enforces its own limits.
    """

    def __init__(self, nc: Any, msg_type: Any, conn: Any, sinks: tuple[type, ...]) -> None:
        self._msg_type = msg_type
        self._conn = conn
        self._sinks = frozenset(sinks)
        self._generation = 0  # bumped by reset(): a pass in progress must stop
        self._want = 0  # bytes the buffered item needs before parsing is worth trying
        self._delegated = False  # nats-py's parser is in the middle of an item
        super().__init__(nc)

    def reset(self) -> None:
        super().reset()
        self._generation += 1
        self._want = 0
        self._delegated = False

    async def parse(self, data: bytes = b"") -> None:
        if self._delegated:
            await self._parse_slow(data)
            return
        buf = self.buf
        if buf:
            buf += data
            if len(buf) < self._want:
                return  # the item at the front is still incomplete
            data = bytes(buf)
            del buf[:]
        self._want = 0
        generation = self._generation
        nc = self.nc
        subs = nc._subs
        stats = nc.stats
        sinks = self._sinks
        make = self._msg_type
        conn = self._conn
        end = len(data)
        pos = 0
        while pos < end:
            eol = data.find(_CRLF, pos)
            if eol < 0:
                break  # the control line is incomplete
            if data.startswith(b"MSG ", pos):
                args = data[pos + 4 : eol].split()
                nargs = len(args)
                if (nargs == 3 or nargs == 4) and args[-1].isdigit() and args[1].isdigit():
                    start = eol + 2
                    stop = start + int(args[-1])
                    item_end = stop + 2
                    if item_end > end:
                        self._want = item_end - pos
                        break
                    sub = subs.get(int(args[1]))
                    if (
                        sub is not None
                        and type(sub._pending_queue) in sinks
                        and sub._jsi is None
                        and sub._future is None
                        and not sub._max_msgs
                    ):
                        # Client._process_msg for this case, without its coroutines.
                        stats["in_msgs"] += 1
                        stats["in_bytes"] += stop - start
                        sub._received += 1
                        sub._pending_queue.put_nowait(
                            make(
                                conn,
                                args[0].decode(),
                                args[2].decode() if nargs == 4 else "",
                                data[start:stop],
                                None,
                            )
                        )
                        pos = item_end
                        continue
                else:
                    item_end = end  # not a well-formed MSG: nats-py decides
            elif data.startswith(b"HMSG ", pos):
                # Where the item ends is what nats-py's own pattern matches.
                match = HMSG_RE.match(memoryview(data)[pos:])
                if match is None:
                    item_end = end
                else:
                    item_end = pos + match.end() + int(match.group(6)) + 2
                    if item_end > end:
                        self._want = item_end - pos
                        break
            else:
                # A control line (PING, PONG, INFO, +OK, -ERR) or anything else: rare, and
                # nats-py's patterns may take more than one line (``PING\s*\r\n``), so
                # nats-py's parser takes the rest of this read.
                item_end = end
            # One item (or the rest of the read) through nats-py's parser.
            self.buf = bytearray(data[pos:item_end])
            await Parser.parse(self)
            if self._generation != generation:
                return  # reset meanwhile: what is left belongs to a lost connection
            pos = item_end
            if self.buf or self.state != AWAITING_CONTROL_LINE:
                # nats-py stopped inside the item: it owns the stream from here.
                self._delegated = True
                await self._parse_slow(data[pos:])
                return
            self.buf = buf
            subs = nc._subs
            stats = nc.stats
        if pos < end:
            buf += memoryview(data)[pos:]

    async def _parse_slow(self, data: bytes) -> None:
        """nats-py's parser alone, until it is back between two items."""
        await Parser.parse(self, data)
        if not self.buf and self.state == AWAITING_CONTROL_LINE:
            self._delegated = False
