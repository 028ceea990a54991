"""Split decode: a block unit is decoded a child module (attention, MLP) at a time, so the decode buffer holds the
largest part of a block, not the block. The bit-identity of logits and 20 greedy tokens with split decode active
(tied / untied Llama, Qwen2, Gemma2), buffer = plan and fixed weight addresses are checked in
tests/runtime/test_chunked.py::test_chunked_model_is_bit_identical (split decode is on by default)."""

from __future__ import annotations

import pytest
import torch

import dfloat
from dfloat.runtime.memory import plan_checkpoint, split_parts
from tests.runtime.test_chunked import SMALL_BLOCKS, _config
from tests.runtime.test_families import save_bf16


def _buffer(model):
    (buf,) = model._dfloat_buffers.values()
    return buf


def test_split_decode_off_and_the_plan_agree(tmp_path):
    config = _config("llama-tied")
    ref = save_bf16(config, tmp_path / "src")
    dfloat.compress_model(tmp_path / "src", tmp_path / "out", **SMALL_BLOCKS)
    whole = dfloat.load_compressed(tmp_path / "out", device="cpu", chunk_numel=3000, split_decode=False)
    block = max(ct.numel for n, ct in whole._dfloat_units.items() if ".layers." in n)
    assert _buffer(whole).numel == block
    assert plan_checkpoint(tmp_path / "out", chunk_numel=3000, split=False).buffers == {"device": block}
    ids = torch.randint(3, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    split = dfloat.load_compressed(tmp_path / "out", device="cpu", chunk_numel=3000)
    with torch.no_grad():
        assert torch.equal(whole(ids).logits, ref(ids).logits)
        assert torch.equal(split(ids).logits, ref(ids).logits)


def test_split_parts_follow_the_child_modules():
    block = [f"model.layers.3.self_attn.{p}.weight" for p in "qkvo"] + [
        f"model.layers.3.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")
    ]
    assert split_parts(block) == [[0, 1, 2, 3], [4, 5, 6]]
    assert split_parts(block[:4]) is None  # one child (its matrices are leaves the owner may read)
    assert split_parts(["m.attn.weight", "m.mlp.fc.weight"]) is None
    assert split_parts(["model.layers.0.mlp.up.weight", "model.layers.1.mlp.up.weight"]) is None  # a list
    assert split_parts(["m.a.weight", "m.b.weight", "m.weight"]) is None  # a member on the owner itself
    assert split_parts(["lm_head.weight"]) is None


def test_lora_training_with_split_decode(tmp_path):
    """Training decodes each part into a private tensor (gradients equal BF16's) that only autograd keeps: after
    the step the weights are the fixed buffer views again, and the logits are unchanged."""
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from dfloat.testing import save_random_model
    from tests.runtime.test_peft import _batch, _lora, _step

    save_random_model(tmp_path / "bf16", trained_scale=True, seed=3)
    dfloat.compress_model(tmp_path / "bf16", tmp_path / "dfloat", **SMALL_BLOCKS)
    base = _lora(AutoModelForCausalLM.from_pretrained(tmp_path / "dfloat"))
    plan = base.base_model.model._dfloat_plan
    assert all(0 < u.decode_numel < u.numel for u in plan.units if ".layers." in u.name)  # split decode is on
    ref = _lora(AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16))
    ids = _batch()
    base.eval()
    with torch.no_grad():
        want = base(ids).logits
    ptrs = _coded_weight_ptrs(base.base_model.model)
    during = []
    mlp = base.base_model.model.model.layers[0].mlp
    mlp.register_forward_pre_hook(lambda m, args: during.append(m.up_proj.weight.data_ptr()))
    for m in (base, ref):
        m.train()
        with torch.no_grad():  # non-zero B so every adapter matrix gets a gradient
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
    assert torch.equal(_step(base, ids), _step(ref, ids))
    ref_params = dict(ref.named_parameters())
    trainable = {n: p for n, p in base.named_parameters() if p.requires_grad}
    assert trainable and all(torch.equal(p.grad, ref_params[n].grad) for n, p in trainable.items())
    assert during and during[-1] not in ptrs.values()  # a private copy while the MLP ran
    assert _coded_weight_ptrs(base.base_model.model) == ptrs
    base.eval()
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "lora_B" in n:
                p.zero_()
        assert torch.equal(base(ids).logits, want)
    assert _coded_weight_ptrs(base.base_model.model) == ptrs


def _coded_weight_ptrs(model) -> dict[str, int]:
    buf = _buffer(model)
    start, end = buf.tensor.data_ptr(), buf.tensor.data_ptr() + 2 * buf.tensor.numel()
    return {n: p.data_ptr() for n, p in model.named_parameters() if start <= p.data_ptr() < end}
