"""The compatibility envelope: what pyproject.toml declares is what the bridge checks.

``_bridge.check_internals`` runs at the first connection; these tests make sure it
passes on the installed (supported) versions, fails with one clear error naming the
versions and the missing piece when an internal goes away, and that its supported range
is the one pyproject.toml declares (and ``.ci/run`` tests at its lowest).
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import nats.aio.client
import nats.protocol.command
import nats.protocol.parser
import pytest
import trio_asyncio._base
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import trionats
from trionats import _bridge

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
BRIDGED = ("nats-py", "trio-asyncio", "trio")


def _declared() -> dict[str, SpecifierSet]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    return {req.name: req.specifier for req in requirements if req.name in BRIDGED}


def _supported() -> dict[str, SpecifierSet]:
    result: dict[str, SpecifierSet] = {}
    for part in _bridge.SUPPORTED.split(";"):
        req = Requirement(part.strip())
        result[req.name] = req.specifier
    return result


@pytest.fixture
def fresh_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the cached outcome, so the next check_internals() looks again."""
    monkeypatch.setattr(_bridge, "_internals_checked", False)
    monkeypatch.setattr(_bridge, "_internals_problem", None)


def test_supported_range_is_the_one_pyproject_declares() -> None:
    assert _supported() == _declared()
    assert set(_declared()) == set(BRIDGED)
    for name, spec in _declared().items():
        assert any(s.operator == ">=" for s in spec), f"{name} has no lower bound: {spec}"


def test_installed_versions_are_in_the_declared_range() -> None:
    for name, spec in _declared().items():
        installed = importlib.metadata.version(name)
        assert spec.contains(installed, prereleases=True), (name, installed, str(spec))


def test_requires_python_and_classifiers_match_what_ci_runs() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    versions = sorted(
        c.rsplit(" ", 1)[1]
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    assert versions == ["3.11", "3.12", "3.13"]
    ci = (PYPROJECT.parent / ".ci" / "run").read_text()
    assert "for minor in 3.11 3.12 3.13" in ci


def test_check_internals_passes_on_the_installed_versions(fresh_check: None) -> None:
    _bridge.check_internals()
    assert _bridge._internals_checked
    assert _bridge._internals_problem is None


def test_check_internals_is_cached(fresh_check: None, monkeypatch: pytest.MonkeyPatch) -> None:
    _bridge.check_internals()
    monkeypatch.delattr(nats.aio.client.Client, "_flush_pending")
    _bridge.check_internals()  # not looked at again: no error


def _expect_problem(*fragments: str) -> str:
    with pytest.raises(trionats.TrionatsError) as info:
        _bridge.check_internals()
    message = str(info.value)
    for dist in BRIDGED:
        assert f"{dist} {importlib.metadata.version(dist)}" in message, message
    assert _bridge.SUPPORTED in message
    for fragment in fragments:
        assert fragment in message, message
    # Cached: the same error again, without looking again.
    with pytest.raises(trionats.TrionatsError, match=re.escape(fragments[0])):
        _bridge.check_internals()
    return message


def test_missing_client_method_is_named(fresh_check: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(nats.aio.client.Client, "_flush_pending")
    message = _expect_problem("Client._flush_pending")
    assert message.startswith("trionats does not support the installed nats-py ")


def test_missing_connect_option_is_named(
    fresh_check: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats-py 2.14 has no lame_duck_mode_cb: a raw TypeError at every connect, before."""

    async def connect_2_14(self: object, servers: object = None, error_cb: object = None) -> None:
        raise AssertionError("not called")  # pragma: no cover

    monkeypatch.setattr(nats.aio.client.Client, "connect", connect_2_14)
    _expect_problem("Client.connect(", "lame_duck_mode_cb=")


def test_changed_behaviour_is_named(fresh_check: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The read loop no longer hands messages to _pending_queue.put_nowait."""

    def process_msg(self: object, *args: object) -> None:
        pass  # pragma: no cover

    monkeypatch.setattr(nats.aio.client.Client, "_process_msg", process_msg)
    _expect_problem("Client._process_msg using _pending_queue, put_nowait")


def test_changed_parser_internals_are_named(
    fresh_check: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast parser subclasses nats-py's and repeats _process_msg's plain case."""

    async def read_loop(self: object) -> None:
        pass  # pragma: no cover

    monkeypatch.setattr(nats.aio.client.Client, "_read_loop", read_loop)
    monkeypatch.delattr(nats.protocol.parser.Parser, "reset")
    _expect_problem("Client._read_loop using _ps, parse", "Parser.reset")


def test_changed_status_constant_and_command_builder_are_named(
    fresh_check: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nats.aio.client.Client, "CONNECTED", 7)
    monkeypatch.setattr(nats.protocol.command, "hpub_cmd", lambda subject, payload: b"")
    _expect_problem("Client.CONNECTED == 1", "hpub_cmd(reply=, hdr=)")


def test_missing_trio_asyncio_internal_is_named(
    fresh_check: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main_loop_one(self: object, no_wait: bool = False) -> None:
        pass  # pragma: no cover

    monkeypatch.setattr(trio_asyncio._base.BaseTrioEventLoop, "_main_loop_one", main_loop_one)
    _expect_problem("BaseTrioEventLoop._main_loop_one using _timers, _q_recv")


async def test_open_connection_raises_the_clear_error(
    fresh_check: None, monkeypatch: pytest.MonkeyPatch, nats_url: str
) -> None:
    """At the first connection, not as a raw AttributeError/TypeError deep in nats-py."""
    monkeypatch.delattr(nats.aio.client.Client, "_flush_pending")
    with pytest.raises(trionats.TrionatsError) as info:
        async with trionats.open_connection(nats_url):
            pass  # pragma: no cover
    assert type(info.value) is trionats.TrionatsError
    message = str(info.value)
    assert "Client._flush_pending" in message
    assert f"nats-py {importlib.metadata.version('nats-py')}" in message
    assert _bridge.SUPPORTED in message
