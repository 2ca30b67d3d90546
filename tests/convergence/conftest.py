"""Convergence tests: one torch thread per test (the tiny models' eager ops otherwise spend most of
their time synchronising threads on a loaded 2-core machine) and the ``adapterhub`` marker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "adapterhub: compares against AdapterHub's adapters package (skipped without it)")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
