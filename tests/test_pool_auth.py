"""The pool's authentication and TLS options, and redaction of secrets on every pool surface.

Against real nats-servers on 127.0.0.1 started with authentication or TLS.
"""

from __future__ import annotations

import logging
import ssl
import traceback
from typing import TYPE_CHECKING

import pytest
import trio
import trustme

import trionats
from trionats._config import PoolConfig
from trionats._pool import open_pool
from trionats._server import free_port

if TYPE_CHECKING:
    from pathlib import Path

# Secrets the test greps for; module constants so no traceback line spells them.
PASSWORD = "pw-" + "Zq81xK"
WRONG_PASSWORD = "bad-" + "Lm42vN"
TOKEN = "tok-" + "Hy77pQ"
SECRETS = (PASSWORD, WRONG_PASSWORD, TOKEN)


async def test_pool_with_user_and_password() -> None:
    async with trionats.open_nats_server(args=["--user", "alice", "--pass", PASSWORD]) as server:
        config = PoolConfig(servers=[server.url], user="alice", password=PASSWORD)
        async with open_pool(config) as pool:
            async with pool.borrow(timeout=10) as nc, nc.subscribe("auth.pool") as sub:
                await nc.publish("auth.pool", b"hi")
                with trio.fail_after(5):
                    assert (await sub.next_msg()).data == b"hi"
            assert pool.stats().created == 1
        bad = PoolConfig(
            servers=[server.url], user="alice", password=WRONG_PASSWORD, dial_timeout=5
        )
        async with open_pool(bad) as pool:
            with pytest.raises(trionats.PoolTimeoutError) as info:
                async with pool.borrow(timeout=2):
                    pass  # pragma: no cover
            assert isinstance(info.value.__cause__, trionats.ConnectError)
            assert "authorization" in str(info.value).lower()


async def test_pool_with_token() -> None:
    async with trionats.open_nats_server(args=["--auth", TOKEN]) as server:
        config = PoolConfig(servers=[server.url], token=TOKEN)
        async with open_pool(config) as pool, pool.borrow(timeout=10) as nc:
            await nc.flush(timeout=5)
            assert nc.is_connected
        async with open_pool(PoolConfig(servers=[server.url], dial_timeout=5)) as pool:
            with pytest.raises(trionats.PoolTimeoutError):
                async with pool.borrow(timeout=2):
                    pass  # pragma: no cover


async def test_pool_with_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    args = ["--tls", "--tlscert", str(cert_file), "--tlskey", str(key_file)]
    async with trionats.open_nats_server(args=args) as server:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        url = f"tls://127.0.0.1:{server.port}"
        config = PoolConfig(servers=[url], tls=context, tls_hostname="127.0.0.1")
        async with (
            open_pool(config) as pool,
            pool.borrow(timeout=10) as nc,
            nc.subscribe("tls.pool") as sub,
        ):
            await nc.publish("tls.pool", b"secure")
            with trio.fail_after(5):
                assert (await sub.next_msg()).data == b"secure"
        # without the CA the handshake fails: the pool reports a dial failure
        untrusted = PoolConfig(servers=[url], tls=ssl.create_default_context(), dial_timeout=5)
        async with open_pool(untrusted) as pool:
            with pytest.raises(trionats.PoolTimeoutError):
                async with pool.borrow(timeout=2):
                    pass  # pragma: no cover
            assert pool.stats().dial_failures >= 1


def _exception_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc)


async def test_no_secret_on_any_pool_surface(caplog: pytest.LogCaptureFixture) -> None:
    """Credentials in server URLs show on no surface of the pool: config repr, stats, log
    records (dial failures, leaks), errors (a failed dial, a pool timeout, their chains)."""
    caplog.set_level(logging.DEBUG, logger="trionats")
    texts: list[str] = []
    async with trionats.open_nats_server(args=["--user", "alice", "--pass", PASSWORD]) as server:
        good = f"nats://alice:{PASSWORD}@127.0.0.1:{server.port}"
        wrong = f"nats://alice:{WRONG_PASSWORD}@127.0.0.1:{server.port}"
        dead = f"nats://{TOKEN}@127.0.0.1:{free_port()}"

        options = PoolConfig(servers=[good, dead], user="alice", password=PASSWORD, token=TOKEN)
        texts += [repr(options), str(options), repr(options.servers)]
        config = PoolConfig(servers=[good], leak_timeout=0.05)
        texts += [repr(config), str(config)]
        async with open_pool(config) as pool:
            async with pool.borrow(timeout=10) as nc:
                await nc.flush(timeout=5)
                texts += [repr(pool.stats()), str(pool.stats().servers)]
                with trio.fail_after(10):  # bounded: the leak sweep runs at leak_timeout
                    while pool.stats().leaks_detected == 0:  # noqa: ASYNC110
                        await trio.sleep(0.01)
            texts.append(repr(pool.stats()))
        assert pool.stats().servers[0].url == f"nats://***@127.0.0.1:{server.port}"

        for servers in ([wrong], [dead], [dead, wrong]):
            bad = PoolConfig(servers=servers, dial_timeout=2, backoff_min=5, backoff_max=5)
            texts += [repr(bad), str(bad)]
            async with open_pool(bad) as pool:
                with pytest.raises(trionats.PoolTimeoutError) as info:
                    async with pool.borrow(timeout=1):
                        pass  # pragma: no cover
                texts += [_exception_text(info.value), repr(pool.stats())]
                assert info.value.__cause__ is not None
                texts.append(_exception_text(info.value.__cause__))
    records = [r for r in caplog.records if r.name.startswith("trionats")]
    assert any("dial" in r.getMessage() for r in records)  # the dial failures were logged
    assert any("held for" in r.getMessage() for r in records)  # and the leak
    for record in records:
        texts.append(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            texts.append(_exception_text(record.exc_info[1]))
    text = "\n".join(texts)
    for secret in SECRETS:
        assert secret not in text, secret
    assert "nats://***@127.0.0.1" in text
