"""Split decode: a block unit is decoded a child module (attention, MLP) at a time, so the decode buffer holds the
largest part of a block, not the block; outputs stay torch.equal to BF16 and weights keep fixed addresses."""

from __future__ import annotations

import pytest
import torch

import dfloat
from dfloat.runtime.memory import plan_checkpoint, split_parts
from dfloat.runtime.loader import weight_memory
from tests.runtime.test_chunked import SMALL_BLOCKS, _check_equal, _config
from tests.runtime.test_families import save_bf16


def _buffer(model):
    (buf,) = model._dfloat_buffers.values()
    return buf


def _coded_weight_ptrs(model) -> dict[str, int]:
    buf = _buffer(model)
    start, end = buf.tensor.data_ptr(), buf.tensor.data_ptr() + 2 * buf.tensor.numel()
    return {n: p.data_ptr() for n, p in model.named_parameters() if start <= p.data_ptr() < end}


@pytest.mark.parametrize("family", ["llama-untied", "llama-tied", "qwen2", "gemma2"])
def test_split_decode_is_bit_identical_with_a_smaller_buffer(family, tmp_path):
    config = _config(family)
    ref = save_bf16(config, tmp_path / "src")
    dfloat.compress_model(tmp_path / "src", tmp_path / "out", **SMALL_BLOCKS)
    model = dfloat.load_compressed(tmp_path / "out", device="cpu", chunk_numel=3000)
    layers = {n: ct for n, ct in model._dfloat_units.items() if ".layers." in n}
    block = max(ct.numel for ct in layers.values())
    sizes = {u.name: u for u in model._dfloat_plan.units}
    assert all(sizes[n].decode_numel > 0 for n in layers)  # every block unit is split
    mlp = 3 * config.hidden_size * config.intermediate_size
    buf = _buffer(model)
    assert mlp <= buf.numel < block  # the MLP part (plus a block of windows at each end), not the block
    assert buf.numel == plan_checkpoint(tmp_path / "out", chunk_numel=3000).buffers["device"]
    assert weight_memory(model)["decode_buffers"] == 2 * buf.numel == model._dfloat_plan.buffer_bytes
    before = _coded_weight_ptrs(model)
    assert any(".self_attn." in n for n in before) and any(".mlp." in n for n in before)
    _check_equal(model, ref, config.vocab_size)
    assert _coded_weight_ptrs(model) == before  # bound once: a captured graph stays valid
    decodes = buf.decodes
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))
    n_layers = config.num_hidden_layers
    assert buf.decodes - decodes >= 2 * n_layers  # attention and MLP parts decoded separately


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
