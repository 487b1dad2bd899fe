"""Shared test fixtures.

Tests that need the offline datasets read their folder from the environment variable
``PNN_DATA_DIR`` (CI sets it to ../shared/data). When it is unset or the folder lacks the data,
those tests fail with a message saying what to set; they never skip silently.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

DATA_ENV = "PNN_DATA_DIR"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The folder with ``mnist/`` and ``hillenbrand1995/``, from ``PNN_DATA_DIR``."""
    value = os.environ.get(DATA_ENV)
    if not value:
        pytest.fail(f"{DATA_ENV} is not set; set it to the shared data folder, for example {DATA_ENV}=../shared/data")
    path = Path(value)
    if not (path / "mnist").is_dir():
        pytest.fail(f"{DATA_ENV}={value} has no mnist/ folder; point it at the shared data folder")
    return path


@pytest.fixture(scope="session")
def mnist_dir(shared_data_dir: Path) -> Path:
    """The folder with the four MNIST IDX files."""
    return shared_data_dir / "mnist"


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh seeded generator per test."""
    return np.random.default_rng(1234)


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the fault-injection suite's summary line per fault kind, when its tests ran."""
    module = sys.modules.get("tests.test_faults")
    lines = getattr(module, "FAULT_SUMMARY", [])
    if lines:
        terminalreporter.section("fault-injection suite")
        for line in lines:
            terminalreporter.write_line(line)
