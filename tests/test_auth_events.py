"""Authentication options and server-driven events against real nats-servers."""

from __future__ import annotations

import os
import signal
import ssl
from pathlib import Path

import nkeys
import pytest
import trio
import trustme

import trionats


async def test_user_password() -> None:
    async with trionats.open_nats_server(args=["--user", "alice", "--pass", "s3cret"]) as server:
        async with trionats.open_connection(server.url, user="alice", password="s3cret") as nc:
            await nc.flush()
        with pytest.raises(trionats.ConnectError, match=r"(?i)authorization"):
            async with trionats.open_connection(
                server.url, user="alice", password="wrong", connect_timeout=5
            ):
                pass  # pragma: no cover


async def test_token() -> None:
    async with trionats.open_nats_server(args=["--auth", "tok123"]) as server:
        async with trionats.open_connection(server.url, token="tok123") as nc:
            await nc.flush()
        with pytest.raises(trionats.ConnectError):
            async with trionats.open_connection(server.url, token="nope", connect_timeout=5):
                pass  # pragma: no cover


async def test_lame_duck_event(nats_server: trionats.NatsServer) -> None:
    async with trionats.open_connection(nats_server.url) as nc, nc.events() as events:
        assert nats_server._process is not None
        nats_server._process.send_signal(signal.SIGUSR2)  # nats-server: enter lame duck mode
        with trio.fail_after(10):
            async for event in events:
                if event.kind is trionats.EventKind.LAME_DUCK:
                    break
    await nats_server.kill()  # a server in lame duck mode ignores SIGTERM for a while


async def test_nkeys_seed(tmp_path: Path) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    conf = tmp_path / "nkeys.conf"
    conf.write_text(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    async with trionats.open_nats_server(args=["-c", str(conf)]) as server:
        async with trionats.open_connection(server.url, nkeys_seed_str=seed.decode()) as nc:
            await nc.flush()
        with pytest.raises(trionats.ConnectError):
            async with trionats.open_connection(server.url, connect_timeout=5):
                pass  # pragma: no cover


async def test_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    args = ["--tls", "--tlscert", str(cert_file), "--tlskey", str(key_file)]
    async with trionats.open_nats_server(args=args) as server:
        context = ssl.create_default_context(cafile=str(ca_file))
        async with (
            trionats.open_connection(f"tls://127.0.0.1:{server.port}", tls=context) as nc,
            nc.subscribe("secure") as sub,
        ):
            await nc.publish("secure", b"over tls")
            assert (await sub.next_msg()).data == b"over tls"
        # without trusting the CA the handshake fails, quickly and clearly
        with pytest.raises(trionats.ConnectError):
            async with trionats.open_connection(
                f"tls://127.0.0.1:{server.port}",
                tls=ssl.create_default_context(),
                connect_timeout=5,
            ):
                pass  # pragma: no cover
