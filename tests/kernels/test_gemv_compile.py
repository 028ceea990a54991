"""kernels/cuda/gemv.cu through nvcc for an H100 (no GPU needed): it compiles, the batch-1 kernels do not spill, the
batch 8/16 kernels fit 3 blocks of 128 threads per SM without local memory in their loop, and the hot loop stays
inside the issue's instruction budget (the SASS proxy of benchmarks/gemv_sass_proxy.py).

Skipped without nvcc (and, for the budget, cuobjdump; DFLOAT_CUOBJDUMP may point at one).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gemv_sass_proxy as proxy  # noqa: E402

from dfloat.kernels import cuda_gemv  # noqa: E402

INSTANCES = [("fused", 8, 1), ("fused", 2, 1), ("fused", 8, 8), ("fused", 4, 16), ("twin", 8, 1)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if shutil.which("nvcc") is None and not Path("/usr/local/bin/nvcc").is_file():
        pytest.skip("nvcc is not installed")
    return proxy.compile_instances(tmp_path_factory.mktemp("gemv_sass"), "sm_90", INSTANCES)


def test_compiles_and_batch_1_does_not_spill(built):
    _, log = built
    for kind, r, nb in INSTANCES:
        info = proxy.ptxas_info(log, proxy.mangled(kind, r, nb))
        if nb == 1:
            assert info["spill_store_bytes"] == 0 and info["spill_load_bytes"] == 0, (kind, r, info)
        assert info["registers"] <= 255


def test_hot_loop_inside_the_budget(built):
    try:
        proxy.find_tool("cuobjdump")
    except SystemExit:
        pytest.skip("cuobjdump is not installed")
    cubin, _ = built
    body = proxy.hot_loop(proxy.sass(cubin, proxy.mangled("fused", 8, 1)))
    parts = proxy.classify(body)
    always = [i for a, i in body if a not in parts["refill"] and a not in parts["scalar_x"]]
    refill = [i for a, i in body if a in parts["refill"]]
    weights = 4 * 8
    assert sum("FFMA" in i for i in always) == weights  # one FMA per weight at batch 1
    assert not any("LDL" in i or "STL" in i for i in always)
    worst = (len(always) + len(refill)) / weights  # every refill taken: an upper bound
    assert worst * 64 / 128 <= proxy.BREAK_EVEN_CLOCKS, f"{worst:.2f} instructions per weight"


def test_batch_8_and_16_kernels_leave_room_for_3_blocks_per_sm(built):
    # 176-209 registers gave 2 blocks of 128 threads per SM: too few loads in flight at batch 8 and 16
    cubin, log = built
    for r, nb in ((8, 8), (4, 16)):
        assert cuda_gemv.min_blocks(r, nb, 128) == 3
        info = proxy.ptxas_info(log, proxy.mangled("fused", r, nb))
        assert info["registers"] <= 65536 // (128 * 3), (r, nb, info)
        assert proxy.blocks_per_sm(info["registers"]) >= 3
        try:
            proxy.find_tool("cuobjdump")
        except SystemExit:
            continue
        body = proxy.hot_loop(proxy.sass(cubin, proxy.mangled("fused", r, nb)))
        assert not any("LDL" in i or "STL" in i for _, i in body), (r, nb)
