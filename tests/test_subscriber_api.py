"""The subscriber's API edges, against a real nats-server on 127.0.0.1: what a handler may
be, argument errors (TypeError for a wrong type, ValueError for a wrong value), and
exception groups (only the subscriber's own nursery levels are removed)."""

from __future__ import annotations

import functools
from collections.abc import Coroutine
from typing import Any

import pytest
import trio

import trionats
from trionats._subscriber import open_subscriber


async def publish_n(nc: trionats.Connection, subject: str, n: int) -> None:
    for i in range(n):
        await nc.publish(subject, str(i).encode())
    await nc.flush()


# -- 3. the handler must be an async function ------------------------------------------------


async def async_function(msg: trionats.Msg) -> bytes:
    return b"function"


async def async_with_prefix(prefix: bytes, msg: trionats.Msg) -> bytes:
    return prefix + msg.data


class Service:
    async def method(self, msg: trionats.Msg) -> bytes:
        return b"method"


class CallableObject:
    async def __call__(self, msg: trionats.Msg) -> bytes:
        return b"object"


class SyncCallableObject:
    def __call__(self, msg: trionats.Msg) -> None:
        pass  # pragma: no cover


def plain_function(msg: trionats.Msg) -> None:
    pass  # pragma: no cover


def returns_a_coroutine(msg: trionats.Msg) -> Coroutine[Any, Any, bytes]:
    return async_function(msg)  # pragma: no cover


async def test_async_handlers_of_every_kind_are_accepted(nats_url: str) -> None:
    handlers: dict[str, tuple[Any, bytes]] = {
        "kind.function": (async_function, b"function"),
        "kind.method": (Service().method, b"method"),
        "kind.partial": (functools.partial(async_with_prefix, b"partial:"), b"partial:x"),
        "kind.object": (CallableObject(), b"object"),
        "kind.partial_object": (functools.partial(CallableObject()), b"object"),
    }
    async with trionats.open_connection(nats_url) as nc, open_subscriber(nc) as subscriber:
        for subject, (handler, _) in handlers.items():
            await subscriber.start(subject, handler)
        for subject, (_, expected) in handlers.items():
            reply = await nc.request(subject, b"x", timeout=5)
            assert reply.data == expected, subject
        assert subscriber.stats().processed == len(handlers)


@pytest.mark.parametrize(
    ("handler", "named"),
    [
        (plain_function, "plain_function"),
        (lambda msg: None, "<lambda>"),
        (returns_a_coroutine, "returns_a_coroutine"),
        (SyncCallableObject(), "SyncCallableObject"),
        (functools.partial(plain_function), "plain_function): functools.partial("),
        (CallableObject, "CallableObject"),  # the class: calling it is not async
        ("not callable", "str: 'not callable'"),
        (None, "NoneType: None"),
    ],
)
async def test_a_handler_that_is_not_async_is_a_type_error_at_start(
    nats_url: str, handler: Any, named: str
) -> None:
    async with trionats.open_connection(nats_url) as nc, open_subscriber(nc) as subscriber:
        with pytest.raises(TypeError, match="handler must be an async function") as info:
            await subscriber.start("never.started", handler)
        assert named in str(info.value)
        assert subscriber.active() == []
        assert subscriber.stats().active == 0


# -- 4. arguments: TypeError for a wrong type, ValueError for a wrong value ------------------


async def test_start_and_stop_arguments(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc, open_subscriber(nc) as subscriber:
        with pytest.raises(TypeError, match=r"max_workers .*'x'"):
            await subscriber.start("a", async_function, max_workers="x")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"max_workers .*2\.5"):
            await subscriber.start("a", async_function, max_workers=2.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"max_workers .*0"):
            await subscriber.start("a", async_function, max_workers=0)
        assert subscriber.stats().active == 0
        handle = await subscriber.start("a", async_function)
        with pytest.raises(TypeError, match=r"timeout .*'soon'"):
            await handle.stop(timeout="soon")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"timeout .*-1"):
            await handle.stop(timeout=-1)
        assert subscriber.active() == [handle]  # a rejected stop changed nothing


# -- 5. exception groups ---------------------------------------------------------------------


@pytest.mark.parametrize("members", [1, 2])
async def test_a_users_exception_group_comes_out_intact(nats_url: str, members: int) -> None:
    errors = [KeyError("first"), LookupError("second")][:members]
    raised = ExceptionGroup("mine", errors)

    async def handler(msg: trionats.Msg) -> None:
        pass  # pragma: no cover

    async def body(nc: trionats.Connection) -> None:
        async with open_subscriber(nc) as subscriber:
            await subscriber.start("eg", handler)
            raise raised

    async with trionats.open_connection(nats_url) as nc:
        with pytest.raises(ExceptionGroup) as info:
            await body(nc)
    # Trio's cancel scopes may hand back a derived copy (ExceptionGroup.split), so compare
    # what matters: the same type, message and member objects, at the top.
    assert type(info.value) is ExceptionGroup
    assert info.value.message == "mine"
    assert all(a is b for a, b in zip(info.value.exceptions, errors, strict=True))


async def test_a_single_error_in_the_block_comes_out_bare(nats_url: str) -> None:
    async def handler(msg: trionats.Msg) -> None:
        pass  # pragma: no cover

    error = KeyError("alone")

    async def body(nc: trionats.Connection) -> None:
        async with open_subscriber(nc) as subscriber:
            await subscriber.start("bare", handler)
            raise error

    async with trionats.open_connection(nats_url) as nc:
        with pytest.raises(KeyError) as info:
            await body(nc)
    assert info.value is error


async def test_a_users_exception_group_on_a_pool_subscriber_comes_out_intact(
    nats_url: str,
) -> None:
    raised = ExceptionGroup("mine", [ValueError("only")])
    async with trionats.open_pool(trionats.PoolConfig(servers=[nats_url])) as pool:
        with pytest.raises(ExceptionGroup) as info:
            async with open_subscriber(pool):
                raise raised
    assert type(info.value) is ExceptionGroup
    assert info.value.message == "mine"
    assert len(info.value.exceptions) == 1
    assert info.value.exceptions[0] is raised.exceptions[0]


async def test_a_handler_base_exception_comes_out_bare(nats_url: str) -> None:
    """Not an Exception, so not counted as failed: it ends the block, out of our groups."""

    class Fatal(BaseException):
        pass

    async def handler(msg: trionats.Msg) -> None:
        raise Fatal("stop everything")

    async def body(nc: trionats.Connection, pub: trionats.Connection) -> None:
        async with open_subscriber(nc) as subscriber:
            await subscriber.start("fatal", handler)
            await publish_n(pub, "fatal", 1)
            await trio.sleep_forever()

    async with trionats.open_connection(nats_url) as nc, trionats.open_connection(nats_url) as pub:
        with pytest.raises(Fatal, match="stop everything"):
            await body(nc, pub)
