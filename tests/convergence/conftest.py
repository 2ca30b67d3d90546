"""Convergence tests: one torch thread per test and the ``adapterhub`` marker."""

from __future__ import annotations

import pytest

from .training import one_thread  # noqa: F401 (autouse fixture)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "adapterhub: compares against AdapterHub's adapters package (skipped without it)")
