"""Run the tiny-model tests on one torch thread (tests/conftest.py `one_torch_thread`); other test folders are
unaffected."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    yield
