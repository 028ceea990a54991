"""What integrity on by default costs: seconds per GB of checkpoint to check checksums, and the decode hot path.

Rows:
  load           `load_compressed_tensors` of one file, verify=True vs verify=False (the extra is the cost)
  checksum       the CRC-32 of a unit's stored arrays alone (parallel threads), and `check_unit` (structure +
                 checksums) that the first decode of an unchecked in-memory unit runs
  first decode   the first decode of an unchecked unit vs a later one (same unit, `out=`)
  hot path       host time per `decompress_tensor(..., out=)` of a tiny checked unit (2000 calls), and of the
                 per-call verdict lookup alone
With --device cuda the checksum, first-decode and hot-path rows run on the GPU too (arrays copied to the host for
the CRC once per unit object).

python benchmarks/integrity.py [--weights 50000000] [--device cpu|cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import median_time, print_table, write_result  # noqa: E402

import dfloat  # noqa: E402
from dfloat.format import is_trusted  # noqa: E402
from dfloat.integrity import array_crcs, check_unit  # noqa: E402
from dfloat.testing import weights_like  # noqa: E402


def s_per_gb(seconds: float, nbytes: int) -> float:
    return round(seconds / (nbytes / 1e9), 4)


def fresh(ct):
    """The same unit as a new, unchecked object (what `dataclasses.replace` gives)."""
    return replace(ct, _cache=ct._cache)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=int, default=50_000_000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    w = weights_like(args.weights, seed=0)
    ct = dfloat.compress_tensor(w)
    stored = ct.nbytes
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unit.safetensors"
        dfloat.save_compressed_tensors({"w": ct}, path)
        file_bytes = path.stat().st_size
        t_on = median_time(lambda: dfloat.load_compressed_tensors(path, verify=True), args.repeats)
        t_off = median_time(lambda: dfloat.load_compressed_tensors(path, verify=False), args.repeats)
    rows.append(
        {
            "step": "load verify=True (cpu)",
            "device": "cpu",
            "bytes": file_bytes,
            "seconds": round(t_on, 4),
            "s_per_GB": s_per_gb(t_on, file_bytes),
        }
    )
    rows.append(
        {
            "step": "load verify=False (cpu)",
            "device": "cpu",
            "bytes": file_bytes,
            "seconds": round(t_off, 4),
            "s_per_GB": s_per_gb(t_off, file_bytes),
        }
    )
    rows.append(
        {
            "step": "load: cost of verify",
            "device": "cpu",
            "bytes": file_bytes,
            "seconds": round(t_on - t_off, 4),
            "s_per_GB": s_per_gb(t_on - t_off, file_bytes),
        }
    )

    on_dev = ct.to(dev)
    sync()
    t_crc = median_time(lambda: array_crcs(on_dev.stored_tensors()), args.repeats)
    rows.append(
        {
            "step": "array CRC-32s",
            "device": str(dev),
            "bytes": stored,
            "seconds": round(t_crc, 4),
            "s_per_GB": s_per_gb(t_crc, stored),
        }
    )
    t_check = median_time(lambda: check_unit(fresh(on_dev)), args.repeats)
    rows.append(
        {
            "step": "check_unit (structure + sums)",
            "device": str(dev),
            "bytes": stored,
            "seconds": round(t_check, 4),
            "s_per_GB": s_per_gb(t_check, stored),
        }
    )

    out = torch.empty(ct.numel, dtype=torch.bfloat16, device=dev)

    def decode(unit):
        dfloat.decompress_tensor(unit, out=out)
        sync()

    t_later = median_time(lambda: decode(on_dev), args.repeats)
    t_first = median_time(lambda: decode(fresh(on_dev)), args.repeats)
    rows.append(
        {
            "step": "decode, checked unit",
            "device": str(dev),
            "bytes": stored,
            "seconds": round(t_later, 4),
            "s_per_GB": s_per_gb(t_later, stored),
        }
    )
    rows.append(
        {
            "step": "first decode, unchecked unit",
            "device": str(dev),
            "bytes": stored,
            "seconds": round(t_first, 4),
            "s_per_GB": s_per_gb(t_first, stored),
        }
    )

    tiny = dfloat.compress_tensor(weights_like(8192, seed=1), allow_raw=False).to(dev)
    tiny_out = torch.empty(tiny.numel, dtype=torch.bfloat16, device=dev)
    dfloat.decompress_tensor(tiny, out=tiny_out)
    sync()
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        dfloat.decompress_tensor(tiny, out=tiny_out)
    host = (time.perf_counter() - t0) / n
    sync()
    t0 = time.perf_counter()
    for _ in range(100_000):
        is_trusted(tiny)
    lookup = (time.perf_counter() - t0) / 100_000
    rows.append(
        {
            "step": "hot path: decompress_tensor(out=) host time",
            "device": str(dev),
            "bytes": tiny.nbytes,
            "seconds": round(host, 7),
            "us_per_call": round(1e6 * host, 2),
        }
    )
    rows.append(
        {
            "step": "hot path: verdict lookup alone",
            "device": str(dev),
            "bytes": 0,
            "seconds": round(lookup, 9),
            "us_per_call": round(1e6 * lookup, 3),
        }
    )
    print_table(rows, ["step", "device", "bytes", "seconds", "s_per_GB", "us_per_call"])
    write_result(f"integrity_{dev.type}", rows, weights=args.weights, stored_bytes=stored)


if __name__ == "__main__":
    main()
