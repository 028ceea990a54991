"""Run the tiny-model tests on one torch thread.

At these sizes a second intra-op thread only adds synchronisation: on a busy 2-core machine a forward took
240 ms with two threads and 9 ms with one. Restored after each test, so other test folders are unaffected.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
