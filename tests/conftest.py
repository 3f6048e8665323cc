"""Shared test set-up. The nats_server / nats_url fixtures come from trionats.testing."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """Make a leaked socket or unclosed resource fail the test that leaked it (with
    filterwarnings=error its ResourceWarning is raised here), not a later one."""
    yield
    gc.collect()
