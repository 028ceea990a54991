"""benchmarks/diffusion.py measures what it says: one step of a compressed denoiser against the BF16 one (tiny
FLUX here), the decodes it makes and the time they take, and stored sizes (the CRNN row is skipped, with the
reason, where khmer-ocr-ocm is not installed)."""

import runpy
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
SCRIPT = Path(__file__).parents[2] / "benchmarks" / "diffusion.py"


def _tiny_flux(tmp):
    from dfloat.testing_diffusers import build_tiny_pipeline, flux_inputs

    model = build_tiny_pipeline("flux").transformer
    inputs = flux_inputs(model.config, image_tokens=16, text_tokens=8)
    return "tiny FLUX", type(model), model, inputs


def test_step_row_and_size_rows(tmp_path):
    bench = runpy.run_path(str(SCRIPT), run_name="diffusion_benchmark")
    row = bench["step_row"](_tiny_flux, tmp_path, repeats=2)
    assert row["equal_outputs"] is True and row["model"] == "tiny FLUX"
    model = type(_tiny_flux(tmp_path)[2]).from_pretrained(
        tmp_path / "tiny-FLUX" / "dfloat", dtype=torch.bfloat16
    )
    assert row["decodes_per_step"] == len(model._dfloat_units) > 0  # each coded unit decoded once per step
    assert 0 < row["decode_ms_per_step"] and 0 < row["bf16_ms_per_step"] and 0 < row["dfloat_ms_per_step"]
    assert 0 < row["coded_weights"] <= row["weights"] and 0 < row["dfloat_weight_MiB"]
    for r in bench["crnn_rows"]():
        assert "skipped" in r or (
            60 < r["pct_of_bf16"] < 75 and r["bound_bits_per_weight"] < r["bits_per_weight"]
        )
