"""Both GPU decoders (CUDA through CuPy, Triton) against the originals and the reference, on a CUDA device.

Skipped without a GPU (tests/conftest.py); run them with benchmarks/gpu_check.sh on a GPU machine.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import dfloat
from dfloat.errors import CorruptStreamError
from dfloat.reference import reference_decode
from dfloat.testing import all_bf16_patterns, bits, fibonacci_exponents, weights_like, with_exponent_counts

sys.path.insert(0, str(Path(__file__).parent))
from kernel_cases import flip_bytes, staircase, with_positions  # noqa: E402

pytestmark = pytest.mark.gpu

BACKENDS = [
    pytest.param("cuda", marks=pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="no CuPy")),
    pytest.param("triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no Triton")),
]
GUARD = 64
FILL = 0x5A5A


def _module(backend):
    from dfloat.kernels import cuda_decode, triton_decode

    return cuda_decode if backend == "cuda" else triton_decode


def gpu_decode(ct, backend, offset: int = GUARD, check: bool = True) -> torch.Tensor:
    """Decode on the GPU into the middle of a guarded buffer; check nothing outside the output changed."""
    ct = ct.to("cuda")
    buf = torch.full((ct.numel + offset + GUARD,), FILL, dtype=torch.int16, device="cuda")
    out = buf[offset:offset + ct.numel].view(torch.bfloat16)
    _module(backend).decode(ct, out, check=check)
    torch.cuda.synchronize()
    assert bool((buf[:offset] == FILL).all()) and bool((buf[offset + ct.numel:] == FILL).all()), \
        "wrote outside out"
    return out.cpu()


def exact(backend, t, ct=None, **opts):
    ct = ct if ct is not None else dfloat.compress_tensor(t, allow_raw=False, **opts)
    for offset in (GUARD, GUARD + 3):  # aligned (16-byte stores) and misaligned output
        assert torch.equal(bits(gpu_decode(ct, backend, offset)), bits(t)), f"mismatch (offset {offset})"
    return ct


LAYOUTS = [{}, dict(bytes_per_window=8, windows_per_block=512), dict(bytes_per_window=4, windows_per_block=4),
           dict(bytes_per_window=32, windows_per_block=40), dict(bytes_per_window=5, windows_per_block=64),
           dict(bytes_per_window=4, windows_per_block=2050)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", LAYOUTS, ids=["w32-t256", "w8-t512", "w4-t4", "w32-t40", "w5-t64", "w4-t2050"])
def test_all_65536_patterns(backend, opts):
    t = all_bf16_patterns()
    ct = exact(backend, t, **opts)
    if not opts:
        assert torch.equal(bits(reference_decode(ct)), bits(t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_codes_of_32_bits_and_length_limits(backend):
    for opts in ({}, dict(bytes_per_window=4, windows_per_block=32), dict(bytes_per_window=8, windows_per_block=512)):
        t, ct = staircase(**opts)
        exact(backend, t, ct=ct)
    t = with_exponent_counts(fibonacci_exponents(26))
    for limit in (9, 24, 32):
        ct = exact(backend, t, max_code_length=limit, bytes_per_window=4, windows_per_block=8)
        assert int(ct.code.max()) == min(limit, 25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_awkward_sizes(backend):
    for n in (0, 1, 2, 31, 32, 33, 127, 128, 129, 4095, 4097, 100_003):
        exact(backend, weights_like(n, seed=n), bytes_per_window=4, windows_per_block=4)
        exact(backend, weights_like(n, seed=n))
    for n in (31, 32, 33, 127, 128, 129, 255, 257):  # 1-bit codes: a window is 32 weights, a block 128
        exact(backend, with_exponent_counts({120: n // 2, 121: n - n // 2}), bytes_per_window=4, windows_per_block=4)
    exact(backend, with_exponent_counts({127: 300_000, 126: 3}, seed=1))  # 1-bit codes: staging in rounds


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_beyond_48k_of_shared_memory(backend):
    """192-byte windows: the CUDA kernel's slots alone exceed 48 KiB, so it opts in to more (the only test that
    sets max_dynamic_shared_size_bytes; the emulator never does)."""
    t = weights_like(300_000, seed=11)
    ct = exact(backend, t, bytes_per_window=192, windows_per_block=256)
    if backend == "cuda":
        from dfloat.kernels import cuda_decode

        p = cuda_decode._plan_for(ct, len(cuda_decode.host_tables(ct)[0]), torch.device("cuda", 0))
        assert p.smem > cuda_decode.SMEM_DEFAULT, p


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_member_and_official_units(backend):
    parts = {"a": weights_like(1000, 1).view(10, 100), "b": weights_like(37, 2), "c": weights_like(50_000, 3)}
    ct = dfloat.compress_tensors(parts, allow_raw=False)
    exact(backend, torch.cat([p.reshape(-1) for p in parts.values()]), ct=ct)
    df11 = pytest.importorskip("dfloat.df11")
    t = weights_like(300_000, seed=9)
    off = df11.from_official_unit(df11.to_official_unit(dfloat.compress_tensor(t)), [("w", tuple(t.shape))])
    exact(backend, t, ct=off)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_streams(backend):
    t = weights_like(200_000, seed=3)
    ct = dfloat.compress_tensor(t, allow_raw=False, bytes_per_window=8, windows_per_block=64)
    raised = 0
    for trial in range(6):
        bad = flip_bytes(ct, 12, trial)
        gpu_decode(bad, backend, check=False)  # guard checked inside
        try:
            gpu_decode(bad, backend, check=True)
        except CorruptStreamError as e:
            raised += 1
            assert "block" in str(e)
    assert raised > 0
    pos = ct.output_positions.clone()
    pos[4] += 7
    with pytest.raises(CorruptStreamError, match="block [34] "):
        gpu_decode(with_positions(ct, pos), backend)
    pos = ct.output_positions.clone()
    pos[4] = 10**12
    with pytest.raises(CorruptStreamError, match="out of order or out of range"):
        gpu_decode(with_positions(ct, pos), backend)
    gpu_decode(replace(ct, encoded_exponent=torch.full_like(ct.encoded_exponent, 0xFF), _cache={}), backend,
               check=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decodes_on_the_current_stream(backend):
    t = weights_like(1_000_000, seed=7)
    ct = dfloat.compress_tensor(t).to("cuda")
    out = torch.empty(ct.numel, dtype=torch.bfloat16, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        _module(backend).decode(ct, out)
    s.synchronize()
    assert torch.equal(bits(out.cpu()), bits(t))


def test_auto_backend_picks_cuda_on_a_gpu():
    from dfloat.kernels import registry

    want = registry.Backend.CUDA if importlib.util.find_spec("cupy") else registry.Backend.TRITON
    assert registry.resolve(None, "cuda") is want
    t = weights_like(50_000, seed=8).view(250, 200)
    got = dfloat.decompress_tensor(dfloat.compress_tensor(t), device="cuda")
    assert got.device.type == "cuda" and got.shape == t.shape and torch.equal(bits(got.cpu()), bits(t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_minilm_weights(backend, minilm_bf16):
    t = minilm_bf16
    ct = dfloat.compress_tensor(t).to("cuda")
    out = torch.empty(ct.numel, dtype=torch.bfloat16, device="cuda")
    _module(backend).decode(ct, out, check=True)
    assert torch.equal(out.view(torch.int16), t.to("cuda").view(torch.int16))
    df11 = pytest.importorskip("dfloat.df11")
    off = df11.from_official_unit(df11.to_official_unit(dfloat.compress_tensor(t)), [("w", tuple(t.shape))])
    out.zero_()
    _module(backend).decode(off.to("cuda"), out, check=True)
    assert torch.equal(out.view(torch.int16), t.to("cuda").view(torch.int16))
