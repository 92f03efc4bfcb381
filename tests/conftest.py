"""Shared fixtures. Tests read data by path from ../shared/data beside the checkout.

This folder goes on ``sys.path`` so that tests in any subfolder can import the shared
helpers beside this file (``from tiny_models import ...``), whatever pytest's import mode.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
DATA = REPO_ROOT.parent / "shared" / "data"

if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"data folder {DATA} is not present")
    return DATA
