"""Security against real nats-servers: every auth method (user/password, token, nkeys
seed, a ``.creds`` file whose JWTs are built here with the nkeys library and a memory
resolver), TLS (verified, untrusted, hostname mismatch, mutual TLS with certificates made
by trustme), permission violations, and no secret in any log record, repr, exception text
or stat."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import ssl
import time
import traceback
from pathlib import Path
from typing import Any

import nkeys
import pytest
import trio
import trustme

import trionats

# Secrets the tests grep for, built so no source line spells them whole.
PASSWORD = "pw-" + "Kq93zT"
TOKEN = "tok-" + "Rb58wS"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _new_key(prefix: int) -> tuple[bytes, str]:
    """(seed, public key) of a new nkey of the given kind."""
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    return seed, public


def _jwt(issuer_seed: bytes, issuer: str, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS v2 JWT (ed25519-nkey), signed by ``issuer_seed``."""
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer,
        "name": name,
        "sub": subject,
        "nats": nats,
    }
    claims["jti"] = (
        base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest())
        .decode()
        .rstrip("=")
    )
    payload = _b64(json.dumps(claims).encode())
    signature = nkeys.from_seed(bytearray(issuer_seed)).sign(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{_b64(signature)}"


def _operator_setup(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """A server config (operator, one account, memory resolver) and a user's creds file."""
    op_seed, op_pub = _new_key(nkeys.PREFIX_BYTE_OPERATOR)
    acc_seed, acc_pub = _new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    user_seed, user_pub = _new_key(nkeys.PREFIX_BYTE_USER)
    operator_jwt = _jwt(op_seed, op_pub, op_pub, "op", {"type": "operator", "version": 2})
    unlimited = {"subs": -1, "data": -1, "payload": -1, "conn": -1, "leaf": -1}
    account_jwt = _jwt(
        op_seed,
        op_pub,
        acc_pub,
        "acc",
        {
            "type": "account",
            "version": 2,
            "limits": {**unlimited, "imports": -1, "exports": -1, "wildcards": True},
        },
    )
    user_jwt = _jwt(
        acc_seed,
        acc_pub,
        user_pub,
        "user",
        {"type": "user", "version": 2, "pub": {}, "sub": {}, **unlimited},
    )
    conf = tmp_path / "operator.conf"
    conf.write_text(
        f"operator: {operator_jwt}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{ {acc_pub}: {account_jwt} }}\n"
    )
    creds = tmp_path / "user.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user_seed.decode()}\n"
        "------END USER NKEY SEED------\n"
    )
    return conf, creds, user_seed


async def test_creds_file_jwt_auth(tmp_path: Path) -> None:
    conf, creds, _ = _operator_setup(tmp_path)
    async with trionats.open_nats_server(args=["-c", str(conf)]) as server:
        async with (
            trionats.open_connection(server.url, user_credentials=str(creds)) as nc,
            nc.subscribe("jwt.>") as sub,
        ):
            await nc.publish("jwt.hello", b"signed in")
            with trio.fail_after(5):
                assert (await sub.next_msg()).data == b"signed in"
        # no credentials: refused, quickly and clearly
        start = trio.current_time()
        with pytest.raises(trionats.ConnectError, match=r"(?i)authori"):
            async with trionats.open_connection(server.url, connect_timeout=5):
                pass  # pragma: no cover
        assert trio.current_time() - start < 5
        # a user signed by another account's key: refused
        (tmp_path / "other").mkdir()
        _, wrong_creds, _ = _operator_setup(tmp_path / "other")
        with pytest.raises(trionats.ConnectError, match=r"(?i)authori"):
            async with trionats.open_connection(
                server.url, user_credentials=str(wrong_creds), connect_timeout=5
            ):
                pass  # pragma: no cover


async def test_creds_through_the_pool(tmp_path: Path) -> None:
    conf, creds, _ = _operator_setup(tmp_path)
    async with trionats.open_nats_server(args=["-c", str(conf)]) as server:
        config = trionats.PoolConfig(servers=[server.url], user_credentials=str(creds))
        async with trionats.open_pool(config) as pool, pool.borrow(timeout=10) as nc:
            await nc.flush(timeout=5)


class _TLS:
    def __init__(self, tmp_path: Path, host: str = "127.0.0.1") -> None:
        self.ca = trustme.CA()
        cert = self.ca.issue_cert(host)
        self.cert, self.key, self.ca_file = (
            tmp_path / "cert.pem",
            tmp_path / "key.pem",
            tmp_path / "ca.pem",
        )
        cert.private_key_and_cert_chain_pem.write_to_path(str(self.cert))
        cert.private_key_pem.write_to_path(str(self.key))
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def server_args(self, *, mutual: bool = False) -> list[str]:
        args = ["--tls", "--tlscert", str(self.cert), "--tlskey", str(self.key)]
        if mutual:
            args += ["--tlsverify", "--tlscacert", str(self.ca_file)]
        return args

    def client_context(self, *, client_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if client_cert:
            self.ca.issue_cert("client.example").configure_cert(context)
        return context


async def test_tls_verified_and_untrusted(tmp_path: Path) -> None:
    tls = _TLS(tmp_path)
    async with trionats.open_nats_server(args=tls.server_args()) as server:
        url = f"tls://127.0.0.1:{server.port}"
        async with trionats.open_connection(url, tls=tls.client_context()) as nc:
            await nc.flush(timeout=5)
        start = trio.current_time()
        with pytest.raises(trionats.ConnectError, match=r"(?i)certificate"):
            async with trionats.open_connection(
                url, tls=ssl.create_default_context(), connect_timeout=5
            ):
                pass  # pragma: no cover
        assert trio.current_time() - start < 5  # fatal at once, not retried


async def test_tls_hostname_mismatch(tmp_path: Path) -> None:
    tls = _TLS(tmp_path, host="nats.example")  # the certificate names another host
    async with trionats.open_nats_server(args=tls.server_args()) as server:
        url = f"tls://127.0.0.1:{server.port}"
        start = trio.current_time()
        with pytest.raises(trionats.ConnectError, match=r"(?i)hostname|match"):
            async with trionats.open_connection(url, tls=tls.client_context(), connect_timeout=5):
                pass  # pragma: no cover
        assert trio.current_time() - start < 5
        # naming the certificate's host explicitly is accepted
        async with trionats.open_connection(
            url, tls=tls.client_context(), tls_hostname="nats.example"
        ) as nc:
            await nc.flush(timeout=5)


async def test_mutual_tls(tmp_path: Path) -> None:
    tls = _TLS(tmp_path)
    async with trionats.open_nats_server(args=tls.server_args(mutual=True)) as server:
        url = f"tls://127.0.0.1:{server.port}"
        async with trionats.open_connection(url, tls=tls.client_context(client_cert=True)) as nc:
            await nc.flush(timeout=5)
        with pytest.raises(trionats.ConnectError):
            async with trionats.open_connection(url, tls=tls.client_context(), connect_timeout=3):
                pass  # pragma: no cover


def _permissions_conf(tmp_path: Path) -> Path:
    conf = tmp_path / "perm.conf"
    conf.write_text(
        "authorization { users = [ { user: alice, password: "
        f'"{PASSWORD}", permissions: {{ publish: {{ deny: ["secret.>"] }}, '
        'subscribe: { deny: ["secret.>"] } } } ] }\n'
    )
    return conf


async def _next_error(events: trionats.EventStream) -> BaseException:
    async for event in events:
        if event.kind is trionats.EventKind.ERROR:
            assert event.error is not None
            return event.error
    raise AssertionError("no error event")  # pragma: no cover


async def test_permission_violations(tmp_path: Path) -> None:
    args = ["-c", str(_permissions_conf(tmp_path))]
    async with (
        trionats.open_nats_server(args=args) as server,
        trionats.open_connection(server.url, user="alice", password=PASSWORD) as nc,
        nc.events() as events,
    ):
        await nc.publish("secret.plans", b"x")
        with trio.fail_after(5):
            error = await _next_error(events)
        assert "permissions violation for publish" in str(error).lower()
        assert "secret.plans" in str(error)
        assert nc.last_error is error
        # a refused subscription ends with the server's reason instead of waiting
        # forever for messages the server will never send
        async with nc.subscribe("secret.inbox") as sub:
            with trio.fail_after(5):
                error = await _next_error(events)
                assert "subscription" in str(error).lower()
                with pytest.raises(trionats.SubscriptionClosedError, match=r"secret\.inbox"):
                    await sub.next_msg()
        # the connection survives both
        assert nc.is_connected
        async with nc.subscribe("public.x") as ok:
            await nc.publish("public.x", b"fine")
            with trio.fail_after(5):
                assert (await ok.next_msg()).data == b"fine"


async def test_denied_queue_subscription_ends(tmp_path: Path) -> None:
    args = ["-c", str(_permissions_conf(tmp_path))]
    async with (
        trionats.open_nats_server(args=args) as server,
        trionats.open_connection(server.url, user="alice", password=PASSWORD) as nc,
        nc.subscribe("secret.q", queue="workers") as sub,
        nc.subscribe("secret.q") as other,  # same subject, no queue: refused too
    ):
        with trio.fail_after(5), pytest.raises(trionats.SubscriptionClosedError):
            await sub.next_msg()
        with trio.fail_after(5), pytest.raises(trionats.SubscriptionClosedError):
            await other.next_msg()


async def test_no_secret_anywhere(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every auth method, failing and succeeding: grep every log record, repr, error and
    stat for the secrets."""
    caplog.set_level(logging.DEBUG)
    conf, creds, user_seed = _operator_setup(tmp_path)
    seed_text = user_seed.decode()
    nkey_seed, nkey_pub = _new_key(nkeys.PREFIX_BYTE_USER)
    nkey_conf = tmp_path / "nkey.conf"
    nkey_conf.write_text(f'authorization {{ users = [ {{ nkey: "{nkey_pub}" }} ] }}\n')
    secrets = [PASSWORD, TOKEN, seed_text, nkey_seed.decode()]
    seen: list[str] = []

    def collect(*things: object) -> None:
        for thing in things:
            seen.append(repr(thing))
            seen.append(str(thing))
            if isinstance(thing, BaseException):
                seen.append("".join(traceback.format_exception(thing)))

    async def attempt(url: str, **kw: Any) -> None:
        try:
            async with (
                trionats.open_connection(url, connect_timeout=3, **kw) as nc,
                nc.events() as events,
            ):
                await nc.publish("secret.denied", b"x")
                await nc.flush(timeout=5)
                collect(nc, nc.stats(), nc.connected_url, nc.last_error)
                with trio.move_on_after(0.5):
                    async for event in events:
                        collect(event, event.error)
        except trionats.TrionatsError as exc:
            collect(exc)
        config = trionats.PoolConfig(servers=[url], dial_timeout=3, **kw)
        collect(config)
        async with trionats.open_pool(config) as pool:
            try:
                async with pool.borrow(timeout=1) as nc:
                    collect(nc, nc.stats())
            except trionats.TrionatsError as exc:
                collect(exc)
            collect(pool.stats())

    perm = _permissions_conf(tmp_path)
    async with trionats.open_nats_server(args=["-c", str(perm)]) as server:
        await attempt(server.url, user="alice", password=PASSWORD)
        await attempt(server.url, user="alice", password=PASSWORD + "x")
        host = f"127.0.0.1:{server.port}"
        await attempt(f"nats://alice:{PASSWORD}@{host}")
    async with trionats.open_nats_server(args=["--auth", TOKEN]) as server:
        await attempt(server.url, token=TOKEN)
        await attempt(server.url, token=TOKEN + "x")
        await attempt(f"nats://{TOKEN}@127.0.0.1:{server.port}")
    async with trionats.open_nats_server(args=["-c", str(nkey_conf)]) as server:
        await attempt(server.url, nkeys_seed_str=nkey_seed.decode())
    async with trionats.open_nats_server(args=["-c", str(conf)]) as server:
        await attempt(server.url, user_credentials=str(creds))
    for record in caplog.records:
        seen.append(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            seen.append("".join(traceback.format_exception(record.exc_info[1])))
    text = "\n".join(seen)
    assert "***" in text  # the redacted URLs were seen
    for secret in secrets:
        assert secret not in text, f"a secret leaked: {secret[:4]}..."
