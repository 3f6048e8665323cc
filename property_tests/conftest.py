"""Hypothesis profiles for the property suite.

* ``ci`` (the default): fast, the whole suite well under a minute on two cores;
* ``long``: many more and longer runs (about 3 minutes on two cores), so lift the per-test
  timeouts: ``pytest property_tests --hypothesis-profile=long -o timeout=900
  -o faulthandler_timeout=900``.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=2000,
    stateful_step_count=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)


def pytest_configure(config: pytest.Config) -> None:
    # Hypothesis' own plugin loads --hypothesis-profile when given; default to "ci".
    if config.getoption("hypothesis_profile", None) is None:
        settings.load_profile("ci")
