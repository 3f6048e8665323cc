"""Every code block of the README and of docs/ runs, against a real nats-server.

A ```python block runs as a program in a child process, with ``NATS_URL`` set to the
``nats_server`` fixture's URL (the docs read it, falling back to the
``trionats server --port 4222`` of the README). A block after ``<!-- run-as-pytest -->``
is a test file: it runs with pytest (and pytest-trio's ``trio_mode``) in a temporary
directory. A block after ``<!-- not-run -->`` is deliberately partial; there are few.

Also: the documentation site builds with ``mkdocs build --strict`` (when mkdocs is
installed: the ``docs`` extra, part of ``dev``), its API reference leaves out
``Subscription``'s queue internals, and every public name has a docstring.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import trionats
import trionats.testing

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_BLOCK = re.compile(r"(?:(<!-- [a-z-]+ -->)\n)?```python\n(.*?)```", re.DOTALL)


def _blocks() -> list[tuple[str, str, str]]:
    """(where, marker, code) for every ```python block of the pages."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start(2))
            found.append((f"{page.relative_to(ROOT)}:{line}", match.group(1) or "", match.group(2)))
    return found


BLOCKS = _blocks()


def test_the_pages_have_code_and_few_partial_blocks() -> None:
    assert len(BLOCKS) >= 12
    markers = {marker for _, marker, _ in BLOCKS}
    assert markers <= {"", "<!-- run-as-pytest -->", "<!-- not-run -->"}, markers
    assert sum(marker == "<!-- not-run -->" for _, marker, _ in BLOCKS) <= 2


def test_the_readme_keeps_its_quick_start_and_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e '.[test]' && python -m pytest" in readme  # what .ci/run runs
    assert "trionats demo" in readme
    assert "mkdocs serve" in readme


async def _run(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    with trio.fail_after(90):
        done = await trio.run_process(
            command,
            cwd=cwd,
            env={**os.environ, **env},
            capture_stdout=True,
            stderr=subprocess.STDOUT,
            check=False,
            stdin=b"",
        )
    return done.returncode, done.stdout.decode(errors="replace")


@pytest.mark.parametrize(
    ("where", "code"),
    [(where, code) for where, marker, code in BLOCKS if marker == ""],
    ids=[where for where, marker, _ in BLOCKS if marker == ""],
)
async def test_code_block_runs(where: str, code: str, nats_url: str, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(code)
    rc, out = await _run(
        [sys.executable, str(script)], tmp_path, {"NATS_URL": nats_url, "PYTHONUNBUFFERED": "1"}
    )
    assert rc == 0, f"{where}:\n{out[-3000:]}"
    assert "Traceback" not in out, f"{where}:\n{out[-3000:]}"


@pytest.mark.parametrize(
    ("where", "code"),
    [(where, code) for where, marker, code in BLOCKS if marker == "<!-- run-as-pytest -->"],
    ids=[where for where, marker, _ in BLOCKS if marker == "<!-- run-as-pytest -->"],
)
async def test_test_file_block_passes(where: str, code: str, tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
    (tmp_path / "test_from_docs.py").write_text(code)
    rc, out = await _run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        tmp_path,
        {},
    )
    assert rc == 0, f"{where}:\n{out[-3000:]}"
    tests = len(re.findall(r"^async def test_", code, re.MULTILINE))
    assert f"{tests} passed" in out, out[-2000:]


def _public_members(obj: object) -> list[tuple[str, object]]:
    members = []
    for name, attr in vars(obj).items():
        if name.startswith("_"):
            continue
        if isinstance(attr, property):
            members.append((name, attr.fget))
        elif inspect.isfunction(attr) or isinstance(attr, staticmethod | classmethod):
            members.append((name, attr))
    return members


# Public names without a docstring in modules another part of the project owns; each is
# in the report that came with this test. Do not add to this list: write the docstring.
_KNOWN_GAPS: set[str] = set()


def test_every_public_name_has_a_docstring() -> None:
    missing = []
    for module in (trionats, trionats.testing):
        for name in module.__all__:
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue  # type aliases: documented where they are defined
            if not (obj.__doc__ or "").strip():
                missing.append(name)
            if inspect.isclass(obj) and not issubclass(obj, BaseException):
                for member, function in _public_members(obj):
                    if not (getattr(function, "__doc__", None) or "").strip():
                        missing.append(f"{name}.{member}")
    assert set(missing) - _KNOWN_GAPS == set()


def test_the_site_builds_strict_and_hides_queue_internals(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]')")
    pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reference = (site / "reference" / "connection" / "index.html").read_text()
    for public in ("trionats.open_connection", "trionats.Connection.publish", "next_msg"):
        assert public in reference
    for internal in ("put_nowait", "qsize", "Subscription.empty"):
        assert internal not in reference
    assert "trionats.testing.nats_server" in (site / "reference/testing/index.html").read_text()
