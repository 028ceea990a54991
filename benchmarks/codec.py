"""CPU codec: stored size vs the entropy bound, encode and decode throughput (issue targets in README).

python benchmarks/codec.py [--synthetic-weights 100000000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import median_time, print_table, trained_weights, write_result  # noqa: E402

import dfloat  # noqa: E402


def entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def measure(name: str, w: torch.Tensor, repeats: int) -> dict:
    words = w.view(torch.int16).numpy().view(np.uint16)
    h16 = entropy_bits(np.bincount(words, minlength=65536))
    h_exp = entropy_bits(np.bincount((words >> 7) & 0xFF, minlength=256))
    ct = dfloat.compress_tensor(w)
    out = torch.empty_like(w)
    t_enc = median_time(lambda: dfloat.compress_tensor(w), repeats)
    t_dec = median_time(lambda: dfloat.decompress_tensor(ct, out=out, backend="cpu"), repeats)
    assert torch.equal(out.view(torch.int16), w.view(torch.int16)), "decode is not bit-exact"
    n = w.numel()
    return {
        "data": name,
        "weights": n,
        "stored_pct_of_bf16": round(100 * ct.nbytes / (2 * n), 3),
        "bound_pct_order0_16bit": round(100 * h16 / 16, 3),
        "exponent_entropy_bits": round(h_exp, 3),
        "bits_per_weight": round(8 * ct.nbytes / n, 3),
        "encode_Mw_per_s": round(n / t_enc / 1e6, 1),
        "decode_Mw_per_s": round(n / t_dec / 1e6, 1),
        "encode_s": round(t_enc, 4),
        "decode_s": round(t_dec, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic-weights", type=int, default=100_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--name", default="codec_cpu")
    args = ap.parse_args()
    trained, label = trained_weights()
    rows = [measure(f"{label} (BF16)", trained, args.repeats)]
    g = torch.Generator().manual_seed(0)
    synth = (torch.randn(args.synthetic_weights, generator=g) * 0.02).to(torch.bfloat16)
    rows.append(measure(f"synthetic N(0, 0.02) x {args.synthetic_weights / 1e6:.0f}M", synth, args.repeats))
    print_table(
        rows,
        [
            "data",
            "weights",
            "stored_pct_of_bf16",
            "bound_pct_order0_16bit",
            "bits_per_weight",
            "encode_Mw_per_s",
            "decode_Mw_per_s",
        ],
    )
    import numba

    write_result(
        args.name,
        rows,
        threads=numba.get_num_threads(),
        targets={"stored_pct_minilm_max": 67.3, "encode_Mw_per_s_min": 250, "decode_Mw_per_s_min": 300},
    )


if __name__ == "__main__":
    main()
