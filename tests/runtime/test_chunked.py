"""Big embedding / lm_head units used piecewise, and block units split-decoded: logits and 20 greedy tokens stay
torch.equal to BF16 while the decode buffer is smaller than those units (so they are never decoded whole)."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import dfloat
from dfloat.runtime import chunked
from dfloat.runtime.loader import weight_memory
from dfloat.runtime.memory import MIN_CHUNK_ROWS, plan_checkpoint
from tests.runtime.test_families import COMMON, save_bf16

SMALL_BLOCKS = dict(bytes_per_window=8, windows_per_block=4)  # blocks of ~100 weights: real partial decodes
DEMO = Path(dfloat.__file__).parent / "demo" / "model"
VOCAB = {**COMMON, "vocab_size": 1024}  # 1024 x 64: 8 chunks of the minimum 128 rows with chunk_numel=3000


def _config(family: str):
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    return {
        "llama-untied": LlamaConfig(**VOCAB, tie_word_embeddings=False),
        "llama-tied": LlamaConfig(**VOCAB, tie_word_embeddings=True),
        "qwen2": Qwen2Config(**VOCAB, tie_word_embeddings=True),
        "gemma2": Gemma2Config(**VOCAB, head_dim=16, sliding_window=8),  # scaled embedding, tied
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
    assert (
        mlp <= buf.numel == max(sizes[n].decode_numel for n in layers) < min(c.numel for c in layers.values())
    )
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
    "cols,rows,chunk,m", list(itertools.product([64, 2048], [5000], [128, 1024], [1, 7, 33, 64]))
)
def test_self_check_says_what_the_gemm_does(cols, rows, chunk, m):
    """The CPU is checked, not assumed exact: the self-check's verdict for ``m`` input rows is what F.linear over
    row chunks does against the whole matrix here, with other random values (an Intel AVX-512 CPU gives other bits
    from 33 rows on, this suite's AMD and AVX2 machines none)."""
    g = torch.Generator().manual_seed(rows + chunk + m)
    w = (torch.randn(rows, cols, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(m, cols, generator=g).to(torch.bfloat16)
    parts = torch.cat([F.linear(x, w[r : r + chunk]) for r in range(0, rows, chunk)], dim=-1)
    assert chunked.self_check(torch.device("cpu"), rows, cols, chunk, inputs=(m,)) == torch.equal(
        parts, F.linear(x, w)
    )
    assert not chunked.tested_exact(torch.device("cpu"))


def _chunked_demo(**kw):
    model = dfloat.load_compressed(DEMO, device="cpu", chunk_numel=100_000, **kw)
    unit = model.get_output_embeddings()._dfloat_chunked  # tied: the embedding's unit
    assert len(unit.chunks) >= 10
    return model, unit


@pytest.mark.parametrize("threads", [1, 2])
def test_chunked_linear_equals_the_whole_matmul_for_any_input_rows(threads):
    """Whatever runs (the chunks where the check passed, the whole matrix where it did not) gives the bits of
    F.linear with the whole matrix, for decode-step, prefill and odd sizes, per thread count."""
    _, unit = _chunked_demo()
    whole = dfloat.decompress_tensor(unit.ct).reshape(4096, 256)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in (1, 3, 16, 33, 64, 200):
            x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
            for _ in range(2):  # the first call checks, the second runs what the check chose
                with torch.no_grad():
                    assert torch.equal(unit.linear(x, None), F.linear(x, whole)), m
    finally:
        torch.set_num_threads(before)
    assert {k[0] for k in unit.exact} >= {1, 3, 16, 33, 64, 200}


def test_run_time_check_takes_nan_rows_and_empty_inputs():
    """A NaN input row gives NaN in both results: bit-identical, not a failed check; an empty input is no check."""
    _, unit = _chunked_demo()
    whole = dfloat.decompress_tensor(unit.ct).reshape(4096, 256)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x[2] = float("nan")
    with torch.no_grad():
        got = unit.linear(x, None)
        assert chunked.same_bits(got, F.linear(x, whole)) and got[2].isnan().all()
        assert unit.exact == {(5, True, False, torch.get_num_threads()): True}
        assert unit.linear(x[:0], None).shape == (0, 4096) and len(unit.exact) == 1
    zero = torch.zeros(2, dtype=torch.bfloat16)
    assert not chunked.same_bits(zero, -zero) and chunked.same_bits(zero.float(), zero.float())  # bits


def test_a_failing_run_time_check_decodes_whole_for_that_size(monkeypatch, caplog):
    """A CPU like the Intel one of issue 19, emulated: chunks of the matrix give other bits from 33 input rows
    on. The load-time check (one row) passes, the first call with 33+ rows finds the difference, logs it and
    uses the whole matrix for that size from then on; smaller inputs keep the chunks. Logits equal BF16's."""
    model, unit = _chunked_demo()
    ref = dfloat.load_compressed(DEMO, device="cpu", chunking=False)
    real, chunk_calls = F.linear, []

    def intel_like(x, w, bias=None):
        y = real(x, w, bias)
        if w.shape[0] < unit.plan.total_rows:  # a chunk
            chunk_calls.append(x.numel() // x.shape[-1])
            if x.numel() // x.shape[-1] >= 33:
                y = torch.nextafter(y, torch.full_like(y, float("inf")))
        return y

    monkeypatch.setattr(chunked, "F", SimpleNamespace(linear=intel_like, embedding=F.embedding))
    long_ids = torch.randint(0, 4096, (2, 19), generator=torch.Generator().manual_seed(5))
    short_ids = long_ids[:1, :7]
    with caplog.at_level("WARNING", logger="dfloat.runtime.chunked"), torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(long_ids).logits, ref(long_ids).logits)
            assert torch.equal(model(short_ids).logits, ref(short_ids).logits)
    assert caplog.text.count("not bit-identical") == 1 and "for 38 input rows" in caplog.text
    assert {k[0]: ok for k, ok in unit.exact.items()} == {38: False, 7: True}
    n = len(unit.chunks)
    assert chunk_calls == [38] * n + [7] * 3 * n  # the checks (own input; random rows if equal), then chunks


def test_a_tiny_model_gets_chunks_of_the_minimum_size(tmp_path):
    """Default blocks of windows (~25K weights) are as big as this model's blocks: the chunks' budget leaves room
    for no row beside the blocks around it. Chunks of the minimum size, not of one row; logits still BF16's."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        **{**COMMON, "vocab_size": 2048, "intermediate_size": 128}, tie_word_embeddings=False
    )
    ref = save_bf16(config, tmp_path / "src")
    dfloat.compress_model(tmp_path / "src", tmp_path / "out")
    model = dfloat.load_compressed(tmp_path / "out", device="cpu")
    plan = model._dfloat_plan
    assert set(plan.chunked) == {"model.embed_tokens", "lm_head"}
    assert all(c.rows >= MIN_CHUNK_ROWS and len(c.chunks) >= 2 for c in plan.chunked.values())
    _check_equal(model, ref, config.vocab_size)


def test_per_matrix_units_need_only_one_matrix_of_buffer(tmp_path):
    from transformers import Qwen2Config

    # gate / up / down of 192 x 64 hold more than a chunk of the minimum 128 embedding rows (and its overhang)
    config = Qwen2Config(**{**COMMON, "vocab_size": 4096, "intermediate_size": 192}, tie_word_embeddings=True)
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
