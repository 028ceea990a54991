"""Host CPU time per decode call: what a runtime pays per unit per token, apart from the GPU's own work.

python benchmarks/launch_cost.py [--device cuda] [--calls 2000] [--weights 4096]

For each backend that can run on the device, 2000 back-to-back decodes of one tiny unit (4096 weights: the
kernel's own time is negligible) into the same buffer, timed on the host, at three levels:
``dfloat.decompress_tensor(ct, out=buf, backend=...)`` (what the runtime calls), ``registry.decode_into`` and the
backend module's ``decode``; then the first two again with the decoder stubbed out (the dispatch layers' own
cost). On a GPU the timer stops before the final synchronize, so the figure is host time
only (the GPU keeps up with launches this small). A torch ``copy_`` of the same size gives the floor a single
torch op costs. Prints a table, writes benchmarks/results/launch_cost_<device type>.json.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_result  # noqa: E402

import dfloat  # noqa: E402
from dfloat.kernels import registry  # noqa: E402
from dfloat.testing import weights_like  # noqa: E402

TARGET_US = 25.0  # issue 10: decompress_tensor(..., out=) on a GPU


def per_call_us(fn, calls: int, sync) -> float:
    for _ in range(20):  # compile, build tables, fill caches
        fn()
    sync()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - t0)
        sync()
    return 1e6 * best / calls


def dispatch_overhead(ct, buf, backend, module, calls: int, sync) -> list[dict]:
    """The same calls with the backend's decode replaced by a no-op: what codec.py and the registry cost by
    themselves (the same on every device, so a CPU machine measures the GPU path's share too)."""
    real = module.decode
    module.decode = lambda ct, out, check=False: None
    getattr(registry, "_CHOSEN", {}).clear()  # the registry remembers decode functions
    try:
        fns = {
            "decompress_tensor(out=), decoder stubbed": lambda: dfloat.decompress_tensor(
                ct, backend=backend.value, out=buf
            ),
            "registry.decode_into, decoder stubbed": lambda: registry.decode_into(ct, buf, backend.value),
        }
        return [
            {"backend": backend.value, "call": name, "us_per_call": round(per_call_us(fn, calls, sync), 2)}
            for name, fn in fns.items()
        ]
    finally:
        module.decode = real
        getattr(registry, "_CHOSEN", {}).clear()  # the registry remembers decode functions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--weights", type=int, default=4096)
    args = ap.parse_args()

    device = dfloat.codec.canonical_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    w = weights_like(args.weights, seed=1)
    ct = dfloat.compress_tensor(w, allow_raw=False).to(device)
    buf = torch.empty(ct.numel, dtype=torch.bfloat16, device=device)
    src = torch.empty_like(buf)

    rows = [
        {
            "backend": "-",
            "call": "torch copy_ (floor)",
            "us_per_call": round(per_call_us(lambda: buf.copy_(src), args.calls, sync), 2),
        }
    ]
    for backend in registry.available_backends(device):
        module = importlib.import_module(registry._MODULES[backend])
        calls = {
            "dfloat.decompress_tensor(out=)": lambda b=backend.value: dfloat.decompress_tensor(
                ct, backend=b, out=buf
            ),
            "registry.decode_into": lambda b=backend.value: registry.decode_into(ct, buf, b),
            f"{module.__name__.rsplit('.', 1)[-1]}.decode": lambda m=module: m.decode(ct, buf),
        }
        for name, fn in calls.items():
            rows.append(
                {
                    "backend": backend.value,
                    "call": name,
                    "us_per_call": round(per_call_us(fn, args.calls, sync), 2),
                }
            )
        rows += dispatch_overhead(ct, buf, backend, module, args.calls, sync)
        # each decode must still be exact
        buf.zero_()
        dfloat.decompress_tensor(ct, backend=backend.value, out=buf)
        assert torch.equal(buf.view(torch.int16).cpu(), w.view(torch.int16)), (
            f"{backend.value} decoded wrongly"
        )
    print(
        f"host time per decode of a {args.weights}-weight unit on {device}, {args.calls} calls back to back "
        f"(best of 3)\n"
    )
    print_table(rows, ["backend", "call", "us_per_call"])
    write_result(
        f"launch_cost_{device.type}",
        rows,
        device=str(device),
        calls=args.calls,
        weights=args.weights,
        target_us_gpu=TARGET_US,
    )


if __name__ == "__main__":
    main()
