"""A message received from NATS."""

from __future__ import annotations

from typing import TYPE_CHECKING, final

from trio.lowlevel import checkpoint_if_cancelled

from ._validate import check_data, check_headers

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["Msg"]


@final
class Msg:
    """A message received from NATS.

    Attributes:
        subject: the subject it was published to.
        data: the payload.
        reply: the reply subject ("" when there is none).
        headers: the headers, or None.
    """

    __slots__ = ("_conn", "data", "headers", "reply", "subject")

    def __init__(
        self,
        _conn: Connection,
        subject: str,
        reply: str,
        data: bytes,
        headers: dict[str, str] | None,
        _client: object = None,
        _sid: int = 0,
    ) -> None:
        self._conn = _conn
        self.subject = subject
        self.reply = reply
        self.data = data
        self.headers = headers

    async def respond(self, data: bytes = b"", *, headers: dict[str, str] | None = None) -> None:
        """Publish ``data`` to this message's reply subject.

        The same contract as :meth:`Connection.publish`: a respond that raises
        ``Cancelled`` sent nothing, one that returns has queued the reply. Allowed while
        the connection drains, until its final flush.

        Raises:
            ValueError: the message has no reply subject.
        """
        if not self.reply:
            raise ValueError(f"message on {self.subject!r} has no reply subject to respond to")
        await checkpoint_if_cancelled()
        if type(data) is not bytes:
            check_data(data)
        if headers is not None:
            check_headers(headers)
        # The reply subject came from the server: no need to validate (or cache) it.
        await self._conn._publish(self.reply, data, "", headers)

    def __repr__(self) -> str:
        return (
            f"<Msg subject={self.subject!r} reply={self.reply!r} "
            f"data={self.data[:32]!r}{'...' if len(self.data) > 32 else ''}>"
        )
