"""Big embedding / lm_head units used piecewise, and block units split-decoded: logits and 20 greedy tokens stay
torch.equal to BF16 while the decode buffer is smaller than those units (so they are never decoded whole)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dfloat
from dfloat.runtime import chunked
from dfloat.runtime.loader import weight_memory
from dfloat.runtime.memory import plan_checkpoint
from tests.runtime.test_families import COMMON, save_bf16

SMALL_BLOCKS = dict(bytes_per_window=8, windows_per_block=4)  # blocks of ~100 weights: real partial decodes


def _config(family: str):
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    return {
        "llama-untied": LlamaConfig(**COMMON, tie_word_embeddings=False),
        "llama-tied": LlamaConfig(**COMMON, tie_word_embeddings=True),
        "qwen2": Qwen2Config(**COMMON, tie_word_embeddings=True),
        "gemma2": Gemma2Config(**COMMON, head_dim=16, sliding_window=8),  # scaled embedding, tied
    }[family]


def _check_equal(model, ref, vocab: int):
    ids = torch.randint(3, vocab, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    prompt = ids[:1, :7]
    g_ref = ref.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    g = model.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert g.shape[1] == 27 and torch.equal(g, g_ref)


@pytest.mark.parametrize("family", ["llama-untied", "llama-tied", "qwen2", "gemma2"])
def test_chunked_model_is_bit_identical(family, tmp_path):
    config = _config(family)
    ref = save_bf16(config, tmp_path / "src")
    dfloat.compress_model(tmp_path / "src", tmp_path / "out", **SMALL_BLOCKS)
    model = dfloat.load_compressed(tmp_path / "out", device="cpu", chunk_numel=3000)
    plan = model._dfloat_plan
    vocab_units = {"model.embed_tokens"} | ({"lm_head"} if not config.tie_word_embeddings else set())
    assert set(plan.chunked) == vocab_units
    assert all(len(c.chunks) >= 5 for c in plan.chunked.values())
    embed = model.get_input_embeddings()
    assert isinstance(embed._dfloat_chunked, chunked.ChunkedUnit)
    # Split decode (default): every block unit is decoded an attention / MLP part at a time, so the buffer holds
    # the MLP part (plus a block of windows at each end), and the chunks fit beside nothing bigger.
    layers = {n: ct for n, ct in model._dfloat_units.items() if ".layers." in n}
    sizes = {u.name: u for u in plan.units}
    assert all(0 < sizes[n].decode_numel < ct.numel for n, ct in layers.items())
    buf = model._dfloat_buffers[torch.device("cpu")]
    mlp = 3 * config.hidden_size * config.intermediate_size
    assert mlp <= buf.numel == max(sizes[n].decode_numel for n in layers) < min(c.numel for c in layers.values())
    assert buf.numel == plan_checkpoint(tmp_path / "out", chunk_numel=3000).buffers["device"]
    assert weight_memory(model)["decode_buffers"] == 2 * buf.numel == plan.buffer_bytes
    before = _coded_weight_ptrs(model)
    assert any(".self_attn." in n for n in before) and any(".mlp." in n for n in before)
    decodes = buf.decodes
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))
    assert buf.decodes - decodes >= 2 * config.num_hidden_layers  # attention and MLP parts decoded separately
    _check_equal(model, ref, config.vocab_size)
    assert _coded_weight_ptrs(model) == before  # bound once: a captured CUDA graph stays valid
    embed._dfloat_chunked.scan = True  # the graph-safe lookup gives the same rows
    ids = torch.randint(0, config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def _coded_weight_ptrs(model) -> dict[str, int]:
    """Parameter name -> address, for the weights that are views of the decode buffer."""
    (buf,) = model._dfloat_buffers.values()
    start, end = buf.tensor.data_ptr(), buf.tensor.data_ptr() + 2 * buf.tensor.numel()
    return {n: p.data_ptr() for n, p in model.named_parameters() if start <= p.data_ptr() < end}


def test_default_plan_sizes_the_buffer_to_one_block(tmp_path):
    """With the default threshold the buffer is the largest transformer block, the 4096 x 64 embedding (bigger
    than a block) is used piecewise, and the model still matches BF16. (Small blocks of windows: at this toy
    scale a default block, ~24K weights, is as big as a transformer block; at real scale it is 2500x smaller.)"""
    from transformers import LlamaConfig

    config = LlamaConfig(**{**COMMON, "vocab_size": 4096}, tie_word_embeddings=True)
    ref = save_bf16(config, tmp_path / "src")
    dfloat.compress_model(tmp_path / "src", tmp_path / "out", **SMALL_BLOCKS)
    model = dfloat.load_compressed(tmp_path / "out", device="cpu")
    plan = model._dfloat_plan
    block = max(ct.numel for name, ct in model._dfloat_units.items() if ".layers." in name)
    part = max(u.decode_numel for u in plan.units if ".layers." in u.name)  # split decode: a block's MLP part
    assert 0 < part < block and plan.buffers == {"cpu": part} and set(plan.chunked) == {"model.embed_tokens"}
    mem = weight_memory(model)
    assert mem["decode_buffers"] == 2 * part == plan.buffer_bytes
    computed = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary tables: not weights
    assert mem["compressed"] == plan.compressed_bytes and mem["plain"] == plan.plain_bytes + computed
    _check_equal(model, ref, config.vocab_size)

    mapped = dfloat.load_compressed(tmp_path / "out", device_map={"": "cpu", "model.embed_tokens": "cpu"})
    assert set(mapped._dfloat_plan.chunked) == {"model.embed_tokens"}
    ids = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(mapped(ids).logits, ref(ids).logits)

    whole = dfloat.load_compressed(tmp_path / "out", device="cpu", chunking=False)
    assert whole._dfloat_plan.buffers == {"cpu": 4096 * 64} and not whole._dfloat_plan.chunked


@pytest.mark.parametrize(
    "cols,rows,chunk,m", list(itertools.product([64, 2048], [5000], [128, 1024], [1, 7, 64]))
)
def test_row_chunked_linear_is_exact_on_cpu(cols, rows, chunk, m):
    """The tested-list entry for the CPU: F.linear over row chunks equals the whole matrix, bit for bit."""
    g = torch.Generator().manual_seed(rows + chunk + m)
    w = (torch.randn(rows, cols, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(m, cols, generator=g).to(torch.bfloat16)
    parts = torch.cat([F.linear(x, w[r : r + chunk]) for r in range(0, rows, chunk)], dim=-1)
    assert torch.equal(parts, F.linear(x, w))


def test_self_check_on_cpu():
    assert chunked.self_check(torch.device("cpu"), 3000, 256, 1024)


def test_per_matrix_units_need_only_one_matrix_of_buffer(tmp_path):
    from transformers import Qwen2Config

    config = Qwen2Config(**{**COMMON, "vocab_size": 4096}, tie_word_embeddings=True)
    ref = save_bf16(config, tmp_path / "src")
    report = dfloat.compress_model(tmp_path / "src", tmp_path / "out", unit="matrix", **SMALL_BLOCKS)
    model = dfloat.load_compressed(tmp_path / "out", device="cpu")
    names = set(model._dfloat_units)
    assert "model.layers.0.mlp.down_proj" in names and "model.layers.0" not in names
    assert report.units == 1 + 7 * config.num_hidden_layers  # (the tiny k/v matrices are stored raw)
    biggest = config.intermediate_size * config.hidden_size  # gate / up / down
    assert model._dfloat_plan.buffers == {"cpu": biggest}
    _check_equal(model, ref, config.vocab_size)
    with pytest.raises(dfloat.DFloatError, match="unit="):
        dfloat.compress_model(tmp_path / "src", tmp_path / "bad", unit="layer")


DEMO = Path(dfloat.__file__).parent / "demo" / "model"


def test_lookup_decodes_only_the_blocks_holding_the_rows(monkeypatch):
    from dfloat.blocks import host_positions
    from dfloat.kernels import cpu

    model = dfloat.load_compressed(DEMO, device="cpu")
    embed = model.get_input_embeddings()
    unit = embed._dfloat_chunked
    whole = dfloat.decompress_tensor(unit.ct).reshape(4096, 256)
    decoded = []
    real = cpu.decode_range
    monkeypatch.setattr(
        cpu, "decode_range", lambda ct, b0, b1, out: (decoded.append((b0, b1)), real(ct, b0, b1, out))
    )
    ids = torch.tensor([[7, 4000, 7, 1234]])
    with torch.no_grad():
        got = embed(ids)
    assert torch.equal(got, F.embedding(ids, whole))
    pos = host_positions(unit.ct)
    n_decoded = sum(int(pos[b1] - pos[b0]) for b0, b1 in decoded)
    assert 3 * 256 <= n_decoded <= 3 * (256 + 2 * 30_000) < unit.ct.numel // 4, decoded
    assert embed.weight.shape == (4096, 256)  # the placeholder is back after the call


def test_inexact_chunked_matmul_falls_back_to_whole_decode(monkeypatch, caplog):
    monkeypatch.setattr(chunked, "chunked_linear_is_exact", lambda device, rows, cols, chunk: False)
    model = dfloat.load_compressed(DEMO, device="cpu")
    assert not model._dfloat_plan.chunked and "decoding ['model.embed_tokens'] whole" in caplog.text
    assert model._dfloat_plan.buffers == {"cpu": 4096 * 256}
    chunky = dfloat.load_compressed(DEMO, device="cpu", chunk_numel=100_000)
    assert (
        chunky._dfloat_plan.chunked == {}
    )  # the tied unit also serves the lm_head: whole, as the check said
    monkeypatch.undo()
    ids = torch.randint(0, 4096, (1, 11), generator=torch.Generator().manual_seed(3))
    chunky = dfloat.load_compressed(DEMO, device="cpu", chunk_numel=100_000)
    assert len(chunky._dfloat_plan.chunked["model.embed_tokens"].chunks) >= 10
    with torch.no_grad():
        assert torch.equal(chunky(ids).logits, model(ids).logits)
