"""The CUDA decoder's short launch path (a unit's prepared launch, one cuLaunchKernel) on a real GPU.

Skipped without a GPU (tests/conftest.py); benchmarks/gpu_check.sh runs them. The packing itself is checked
without a GPU in test_cuda_emulated.py (test_packed_launch_arguments_drive_the_kernel).
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch

import dfloat
from dfloat.errors import CorruptStreamError
from dfloat.testing import bits, weights_like

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="no CuPy")]


def _with_gap(ct, window: int, delta: int):
    import numpy as np

    packed = np.unpackbits(ct.gaps.cpu().numpy())
    value = int(
        np.packbits(np.concatenate([packed[5 * window : 5 * window + 5], np.zeros(3, np.uint8)]))[0] >> 3
    )
    packed[5 * window : 5 * window + 5] = np.unpackbits(np.array([((value + delta) % 32) << 3], np.uint8))[:5]
    gaps = torch.from_numpy(np.packbits(packed)[: ct.gaps.numel()].copy()).to(ct.gaps.device)
    return replace(ct, gaps=gaps, _cache={})


def test_repeated_decodes_take_the_short_path_and_stay_exact():
    from dfloat.kernels import cuda_decode

    t = weights_like(300_000, seed=1)
    ct = dfloat.compress_tensor(t, allow_raw=False).to("cuda")
    buf = torch.zeros(ct.numel + 16, dtype=torch.bfloat16, device="cuda")
    for offset in (0, 3, 0, 8, 3):  # the output pointer and its alignment change between calls
        out = buf[offset : offset + ct.numel]
        out.zero_()
        dfloat.decompress_tensor(ct, out=out, backend="cuda")
        torch.cuda.synchronize()
        assert torch.equal(bits(out.cpu()), bits(t)), f"offset {offset}"
    ul = ct._cache[cuda_decode._LAUNCHES][torch.cuda.current_device()]
    assert ul.packed is not None, "the CUDA driver library was not found: decodes go through CuPy's launch"


def test_a_new_copy_of_a_unit_gets_its_own_pointers():
    # cpu_offload copies a unit in for each decode: the copies share the cache but not the arrays
    a, b = weights_like(100_000, seed=2), weights_like(100_000, seed=2)
    ct = dfloat.compress_tensor(a, allow_raw=False)
    out = torch.empty(ct.numel, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        gpu = ct.to("cuda")
        dfloat.decompress_tensor(gpu, out=out, backend="cuda")
        del gpu
        torch.cuda.synchronize()
        assert torch.equal(bits(out.cpu()), bits(b))


def test_short_path_decodes_replay_in_a_cuda_graph():
    t = weights_like(200_000, seed=3)
    ct = dfloat.compress_tensor(t, allow_raw=False).to("cuda")
    out = torch.empty(ct.numel, dtype=torch.bfloat16, device="cuda")
    dfloat.decompress_tensor(ct, out=out, backend="cuda")  # prepare outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dfloat.decompress_tensor(ct, out=out, backend="cuda")
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(bits(out.cpu()), bits(t))


def test_check_after_short_path_decodes_reports_a_damaged_gap():
    t = weights_like(100_000, seed=4)
    ct = dfloat.compress_tensor(t, allow_raw=False, bytes_per_window=8, windows_per_block=16).to("cuda")
    out = torch.empty(ct.numel, dtype=torch.bfloat16, device="cuda")
    bad = _with_gap(ct, 37, 3)
    dfloat.decompress_tensor(bad, out=out, backend="cuda")  # unchecked: no error, no sync
    with pytest.raises(CorruptStreamError, match="block 2 .*window start offsets disagree with the codes"):
        dfloat.decompress_tensor(bad, out=out, backend="cuda", check=True)
    dfloat.decompress_tensor(ct, out=out, backend="cuda", check=True)
    assert torch.equal(bits(out.cpu()), bits(t))


def test_host_cost_per_decode_is_small():
    # a loose bound (the target is 25 us; benchmarks/launch_cost.py measures it): catches a slow path by mistake
    import time

    ct = dfloat.compress_tensor(weights_like(4096, seed=5), allow_raw=False).to("cuda")
    out = torch.empty(ct.numel, dtype=torch.bfloat16, device="cuda")
    for _ in range(50):
        dfloat.decompress_tensor(ct, out=out, backend="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(500):
        dfloat.decompress_tensor(ct, out=out, backend="cuda")
    per_call = (time.perf_counter() - t0) / 500
    torch.cuda.synchronize()
    assert per_call < 60e-6, f"{per_call * 1e6:.1f} us per decode"


def test_capture_with_dfloat_check_set_records_unchecked_decodes(monkeypatch):
    # a checked decode cannot be captured (it reads its status on the host): under capture DFLOAT_CHECK is skipped
    t = weights_like(120_000, seed=5)
    ct = dfloat.compress_tensor(t, allow_raw=False).to("cuda")
    out = torch.empty(ct.numel, dtype=torch.bfloat16, device="cuda")
    dfloat.decompress_tensor(ct, out=out, backend="cuda")
    torch.cuda.synchronize()
    monkeypatch.setenv("DFLOAT_CHECK", "1")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dfloat.decompress_tensor(ct, out=out, backend="cuda")
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(bits(out.cpu()), bits(t))
