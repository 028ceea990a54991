"""Fused decode-GEMV vs cuBLAS BF16 on one Llama-3.1-8B layer's 7 matrices, batch 1 / 8 / 16 (needs a GPU).

Weights: Gaussian BF16 (std 0.02, the exponent statistics of trained LLM weights; no checkpoint is downloaded).
Each timed iteration runs the layer's 7 products in order (q, k, v, o, gate, up, down), so every matrix is read
from DRAM (one layer: 436 MB in BF16, 146 MB coded, L2: 50 MB); x rotates over 4 copies. CUDA events around each
matrix and around the whole layer; medians over the repeats; eager launches and one CUDA graph per layer.
Methods: cuBLAS (F.linear on BF16 weights), fused (dfloat's kernel on the coded weights), twin (the same kernel
on the BF16 weights: the fused product's bit-exact reference). Reports the fused / cuBLAS time ratios, max
abs/relative differences to cuBLAS, and whether fused == twin bit for bit.

    python benchmarks/gpu_gemv.py [--repeats 30] [--batches 1 8 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_result  # noqa: E402

LAYER = {  # Llama-3.1-8B: hidden 4096, 32 heads, 8 KV heads of 128, FFN 14336
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}
TARGETS = {1: 0.9, 8: 1.1, 16: 1.3}  # fused / cuBLAS layer time, from the issue


def make_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {
        name: (torch.randn(n, k, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
        for name, (n, k) in LAYER.items()
    }


def encode_layer(weights, rows_per_tile: int | None):
    """The 7 matrices in the GEMV layout (rows_per_tile None: the default per matrix) and the CPU seconds it took."""
    from dfloat.kernels import gemv_layout

    t0 = time.perf_counter()
    coded = {
        name: gemv_layout.encode(w.cpu(), rows_per_tile=rows_per_tile).to("cuda")
        for name, w in weights.items()
    }
    return coded, time.perf_counter() - t0


def run_layer(method, weights, coded, x, outs):
    from dfloat.kernels import cuda_gemv

    for name in LAYER:
        xi = x[LAYER[name][1]]
        if method == "cublas":
            torch.matmul(xi, weights[name].T, out=outs[name])
        elif method == "fused":
            cuda_gemv.gemv(coded[name], xi, out=outs[name])
        else:
            gm = coded[name]
            outs[name].copy_(cuda_gemv.twin(weights[name], xi, gm.rows_per_tile, gm.threads))


def time_eager(method, weights, coded, xs, outs, repeats):
    per = {name: [] for name in LAYER}
    layer = []
    from dfloat.kernels import cuda_gemv

    for it in range(repeats + 3):
        x = xs[it % len(xs)]
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(len(LAYER) + 1)]
        ev[0].record()
        for i, name in enumerate(LAYER):
            xi = x[LAYER[name][1]]
            if method == "cublas":
                torch.matmul(xi, weights[name].T, out=outs[name])
            elif method == "fused":
                cuda_gemv.gemv(coded[name], xi, out=outs[name])
            else:
                gm = coded[name]
                cuda_gemv.twin(weights[name], xi, gm.rows_per_tile, gm.threads)
            ev[i + 1].record()
        torch.cuda.synchronize()
        if it >= 3:
            for i, name in enumerate(LAYER):
                per[name].append(ev[i].elapsed_time(ev[i + 1]) * 1e3)
            layer.append(ev[0].elapsed_time(ev[-1]) * 1e3)
    return statistics.median(layer), {k: statistics.median(v) for k, v in per.items()}


def time_graph(method, weights, coded, xs, outs, repeats):
    """One graph per x copy (rotation), each replaying the 7 products; median layer time of the replays."""
    graphs = []
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for x in xs:
            run_layer(method, weights, coded, x, outs)  # warm-up / compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    for x in xs:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run_layer(method, weights, coded, x, outs)
        graphs.append(g)
    times = []
    for it in range(repeats + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graphs[it % len(graphs)].replay()
        b.record()
        torch.cuda.synchronize()
        if it >= 3:
            times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def bench_batch(batch, layout, weights, coded, n_weights, repeats, per_matrix) -> dict:
    from dfloat.kernels import cuda_gemv

    gen = torch.Generator(device="cuda").manual_seed(batch)
    xs = [
        {k: torch.randn(batch, k, generator=gen, device="cuda").to(torch.bfloat16) for k in (4096, 14336)}
        for _ in range(4)
    ]
    outs = {
        name: torch.empty(batch, n, dtype=torch.bfloat16, device="cuda") for name, (n, _) in LAYER.items()
    }
    # exactness first: fused == twin bit for bit, and the distance to cuBLAS
    exact, max_abs, max_rel = True, 0.0, 0.0
    for name, (_n, k) in LAYER.items():
        x = xs[0][k]
        y = cuda_gemv.gemv(coded[name], x)
        t = cuda_gemv.twin(weights[name], x, coded[name].rows_per_tile, coded[name].threads)
        ref = torch.matmul(x, weights[name].T)
        exact &= bool(torch.equal(y.view(torch.int16), t.view(torch.int16)))
        d = (y.float() - ref.float()).abs()
        max_abs = max(max_abs, float(d.max()))
        max_rel = max(max_rel, float((d / ref.float().abs().clamp_min(1e-3)).max()))
    res = {}
    for method in ("cublas", "fused", "twin"):
        layer_us, per = time_eager(method, weights, coded, xs, outs, repeats)
        graph_us = time_graph(method, weights, coded, xs, outs, repeats)
        res[method] = (layer_us, graph_us, per)
        for name in LAYER:
            per_matrix.append(
                {
                    "layout": layout,
                    "batch": batch,
                    "method": method,
                    "matrix": name,
                    "us": round(per[name], 2),
                }
            )
    cb, fu, tw = res["cublas"], res["fused"], res["twin"]
    return {
        "layout": layout,
        "batch": batch,
        "cublas_us": round(cb[0], 1),
        "fused_us": round(fu[0], 1),
        "twin_us": round(tw[0], 1),
        "cublas_graph_us": round(cb[1], 1),
        "fused_graph_us": round(fu[1], 1),
        "twin_graph_us": round(tw[1], 1),
        "fused/cublas": round(fu[0] / cb[0], 3),
        "fused/cublas_graph": round(fu[1] / cb[1], 3),
        "target": TARGETS.get(batch),
        "fused==twin": exact,
        "max_abs_diff_vs_cublas": max_abs,
        "max_rel_diff_vs_cublas": round(max_rel, 5),
        "fused_G_weights_per_s_graph": round(n_weights / fu[1] / 1e3, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument(
        "--layouts",
        nargs="+",
        default=["auto", "4"],
        help="rows per tile: auto (8 for these shapes) and/or 1, 2, 4, 8",
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    weights = make_weights()
    n_weights = sum(n * k for n, k in LAYER.values())
    rows, per_matrix, layouts = [], [], {}
    for layout in args.layouts:
        coded, enc_s = encode_layer(weights, None if layout == "auto" else int(layout))
        coded_bytes = sum(gm.nbytes for gm in coded.values())
        layouts[layout] = {
            "bits_per_weight": 8 * coded_bytes / n_weights,
            "encode_seconds": enc_s,
            "matrices": {name: repr(gm) for name, gm in coded.items()},
        }
        print(
            f"layout {layout}: {coded_bytes / 2 / n_weights:.2%} of BF16 ({8 * coded_bytes / n_weights:.3f} "
            f"bits/weight), encoded in {enc_s:.1f} s on the CPU"
        )
        for batch in args.batches:
            rows.append(bench_batch(batch, layout, weights, coded, n_weights, args.repeats, per_matrix))
    print_table(rows, list(rows[0]))
    write_result(
        f"gpu_gemv_{torch.cuda.get_device_name().replace(' ', '_')}",
        rows,
        per_matrix=per_matrix,
        weights=n_weights,
        repeats=args.repeats,
        layouts=layouts,
        note="Gaussian BF16 weights (std 0.02); medians of CUDA-event times; layer = 7 products in order",
    )


if __name__ == "__main__":
    main()
