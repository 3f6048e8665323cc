"""Key-value store on JetStream, against a real nats-server (its store in a temp dir)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import trionats
from trionats import JetStreamError, KeyNotFoundError, KvEntry


async def test_put_get_delete_keys_history(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        kv = await nc.jetstream().create_key_value("cfg", history=3)
        assert await kv.put("a", b"1") == 1
        assert await kv.put("a", b"2") == 2
        assert await kv.put("b.c", b"3") == 3
        entry = await kv.get("a")
        assert (entry.key, entry.value, entry.revision, entry.operation) == ("a", b"2", 2, "PUT")
        assert entry.created is not None
        assert await kv.keys() == ["a", "b.c"]
        for i in range(3, 6):
            await kv.put("a", str(i).encode())
        history = await kv.history("a")
        assert [e.value for e in history] == [b"3", b"4", b"5"]  # history=3 kept
        assert await kv.delete("b.c") == 7
        with pytest.raises(KeyNotFoundError):
            await kv.get("b.c")
        with pytest.raises(KeyNotFoundError):
            await kv.get("never")
        assert await kv.keys() == ["a"]
        assert [e.operation for e in await kv.history("b.c")] == ["PUT", "DEL"]
        await kv.purge("a")
        with pytest.raises(KeyNotFoundError):
            await kv.get("a")
        assert [e.operation for e in await kv.history("a")] == ["PURGE"]
        assert await kv.create("new", b"x") > 0
        with pytest.raises(JetStreamError):
            await kv.create("new", b"y")  # already has a value
        again = await nc.jetstream().key_value("cfg")
        assert (await again.get("new")).value == b"x"
        with pytest.raises(JetStreamError):
            await nc.jetstream().key_value("nope")


@pytest.mark.parametrize(
    ("call", "exc", "text"),
    [
        (lambda kv: kv.put("a.*", b""), ValueError, "a.*"),
        (lambda kv: kv.put("", b""), ValueError, "key"),
        (lambda kv: kv.put(3, b""), TypeError, "key"),
        (lambda kv: kv.put("a", "text"), TypeError, "str"),
        (lambda kv: kv.get("a b"), ValueError, "a b"),
    ],
)
async def test_bad_input(nats_url: str, call: Any, exc: type[Exception], text: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        js = nc.jetstream()
        kv = await js.create_key_value("b")
        with pytest.raises(exc) as e:
            await call(kv)
        assert text in str(e.value)
        with pytest.raises(ValueError, match="history"):
            await js.create_key_value("c", history=65)
        with pytest.raises(ValueError, match="bucket"):
            await js.create_key_value("a.b")
        with pytest.raises(ValueError, match="key pattern"):
            kv.watch("a..b")


async def test_watch_initial_values_then_updates_in_order(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        kv = await nc.jetstream().create_key_value("w", history=5)
        await kv.put("k.1", b"old")
        await kv.put("k.1", b"a")
        await kv.put("k.2", b"b")
        await kv.put("other", b"x")
        got: list[KvEntry] = []
        async with kv.watch("k.*") as updates:
            with trio.fail_after(10):
                async for entry in updates:
                    got.append(entry)
                    if len(got) == 2:
                        for i in range(20):
                            await kv.put(f"k.{i % 3}", str(i).encode())
                        await kv.delete("k.1")
                    if len(got) == 2 + 21:
                        break
        assert [(e.key, e.value) for e in got[:2]] == [("k.1", b"a"), ("k.2", b"b")]
        updates_seen = got[2:]
        assert [e.value for e in updates_seen[:20]] == [str(i).encode() for i in range(20)]
        assert (updates_seen[20].key, updates_seen[20].operation) == ("k.1", "DEL")
        revisions = [e.revision for e in got]
        assert revisions == sorted(revisions)
        assert len(set(revisions)) == len(revisions)


async def test_watch_include_history(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        kv = await nc.jetstream().create_key_value("h", history=5)
        for v in (b"1", b"2", b"3"):
            await kv.put("k", v)
        async with kv.watch("k", include_history=True) as updates:
            with trio.fail_after(10):
                got = [(await updates.receive()).value for _ in range(3)]
        assert got == [b"1", b"2", b"3"]


async def test_watch_through_a_server_restart(nats_server: trionats.NatsServer) -> None:
    """The watch resumes after the last revision it delivered: nothing lost, nothing
    repeated, across a kill and restart of the server (file store kept)."""
    async with trionats.open_connection(nats_server.url, reconnect_time_wait=0.05) as nc:
        js = nc.jetstream()
        kv = await js.create_key_value("r", history=10)
        await kv.put("k", b"0")
        got: list[bytes] = []
        async with kv.watch("k") as updates:
            with trio.fail_after(40):
                got.append((await updates.receive()).value)
                await kv.put("k", b"1")
                got.append((await updates.receive()).value)
                await nats_server.kill()
                await nats_server.start()
                # the bucket is back once JetStream recovered its store
                for i in range(2, 6):
                    while True:
                        try:
                            await kv.put("k", str(i).encode())
                            break
                        except trionats.TrionatsError:
                            await trio.sleep(0.05)  # the server is still starting
                while len(got) < 6:
                    got.append((await updates.receive()).value)
        assert got == [str(i).encode() for i in range(6)]


async def test_watch_cancelled_while_waiting(nats_url: str) -> None:
    async with trionats.open_connection(nats_url) as nc:
        kv = await nc.jetstream().create_key_value("c")
        with trio.move_on_after(0.2) as scope:
            async with kv.watch() as updates:
                await updates.receive()
        assert scope.cancelled_caught
        await kv.put("a", b"1")  # the connection is still usable
        assert (await kv.get("a")).value == b"1"
