#!/usr/bin/env python3
"""PolyCom vs Llama on the demo recipe at a fixed step count, several seeds each: mean and spread of val loss.

Why: a single run per architecture with different step counts (the first demo comparison) cannot tell an
architecture difference from seed noise. Each run is ``scripts/train_demo_model.py`` in a subprocess with the
same ``--steps``, batch and context, differing only in ``--arch`` (and the MLP width, as the demo doc states) and
``--seed``. The seed fixes the weight init and the data order.

Usage::

    python benchmarks/demo_arch_seeds.py --steps 60 --seeds 1 2 3 --deb /tmp/r-cran-janeaustenr_1.0.0-1_all.deb
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FFN = {"llama": 768, "polycom": 1152}  # the demo doc's widths: PolyCom's non-gated MLP is 1.5x SwiGLU's


def run_one(arch: str, seed: int, args, work: Path) -> dict:
    out = work / f"{arch}_s{seed}"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "train_demo_model.py"),
        "--arch", arch, "--ffn", str(FFN[arch]), "--seed", str(seed),
        "--steps", str(args.steps), "--budget-min", "0", "--warmup", str(args.warmup),
        "--batch", str(args.batch), "--ctx", str(args.ctx), "--out", str(out),
    ]  # fmt: skip
    if args.deb:
        cmd += ["--deb", str(args.deb)]
    t0 = time.time()
    with open(work / f"{arch}_s{seed}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    info = json.loads((out / "training_info.json").read_text())
    return {
        "arch": arch,
        "seed": seed,
        "steps": info["steps"],
        "val_loss_fp32": info["val_loss_fp32"],
        "val_loss_bf16": info["val_loss_bf16"],
        "final_train_loss": info["final_train_loss"],
        "train_cpu_minutes": info["train_cpu_minutes"],
        "wall_s": round(time.time() - t0, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--archs", nargs="+", default=["llama", "polycom"], choices=list(FFN))
    ap.add_argument("--deb", type=Path, default=None, help="r-cran-janeaustenr .deb (else apt-get download)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the trained checkpoints and logs here")
    args = ap.parse_args(argv)

    runs = []
    with tempfile.TemporaryDirectory(prefix="dfloat_arch_seeds_") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            for arch in args.archs:
                r = run_one(arch, seed, args, work)
                print(f"{arch:8s} seed {seed}: val loss {r['val_loss_fp32']:.4f}  ({r['wall_s']:.0f} s)", flush=True)
                runs.append(r)
    summary = []
    for arch in args.archs:
        vals = [r["val_loss_fp32"] for r in runs if r["arch"] == arch]
        summary.append(
            {
                "arch": arch,
                "runs": len(vals),
                "mean_val_loss": round(statistics.mean(vals), 4),
                "stdev": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0,
                "min": min(vals),
                "max": max(vals),
            }
        )
    print()
    print_table(summary, ["arch", "runs", "mean_val_loss", "stdev", "min", "max"])
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("deb", "keep")}
    write_result("demo_arch_seeds", summary, settings=settings, ffn=FFN, runs=runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
