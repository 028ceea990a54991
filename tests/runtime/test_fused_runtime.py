"""load_compressed(..., matmul="fused"): the plumbing, on the CPU.

The fused kernel needs a GPU (tests/kernels/test_gpu_gemv.py); here `FusedLinear` runs its CPU reference path
(the GEMV layout decoded, then F.linear), which is the BF16 model's own math: logits must be identical, which
proves every linear layer got its own matrix back through the re-layout, biases included.
"""

from __future__ import annotations

import pytest
import torch

import dfloat
from dfloat.runtime import fused
from dfloat.testing import save_random_model

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("fused") / "src"
    save_random_model(folder, trained_scale=True, attention_bias=True, **TINY)
    dfloat.compress_model(folder, folder.parent / "out")
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    return folder.parent / "out", ref


def test_fused_needs_a_gpu(saved):
    with pytest.raises(dfloat.errors.BackendUnavailableError, match="CUDA"):
        dfloat.load_compressed(saved[0], device="cpu", matmul="fused")
    with pytest.raises(dfloat.errors.DFloatError, match="matmul"):
        dfloat.load_compressed(saved[0], device="cpu", matmul="fast")


def test_linear_layers_are_fused_and_exact(saved, monkeypatch):
    out, ref = saved
    monkeypatch.setattr(fused, "check_mode", lambda matmul, device: None)  # let the CPU reference path run
    model = dfloat.load_compressed(out, device="cpu", matmul="fused")
    layers = [m for m in model.modules() if isinstance(m, fused.FusedLinear)]
    assert len(layers) == 7 * TINY["num_hidden_layers"] + 1  # q k v o gate up down, and the untied lm_head
    assert sum(m.bias is not None for m in layers) == 4 * TINY["num_hidden_layers"]  # attention_bias: q k v o
    assert not any(isinstance(m, torch.nn.Linear) and m.weight.device.type == "meta" for m in model.modules())
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)  # rows <= 16 and > 16 both take the reference
    for m in layers:
        n, k = m.gm.shape
        assert torch.equal(
            m.decoded_weight().view(torch.int16),
            ref.get_submodule(m.name[: -len(".weight")]).weight.view(torch.int16),
        )
    assert model._dfloat_prefill.numel == max(m.gm.shape[0] * m.gm.shape[1] for m in layers)
