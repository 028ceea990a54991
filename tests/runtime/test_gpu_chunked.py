"""On a GPU: big embedding / lm_head units used piecewise stay bit-identical to BF16 (every backend, with and
without cpu_offload, inside a CUDA graph), the row-chunked matmul is exact at real vocabulary shapes, and the
memory the model holds matches its plan."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import dfloat
from dfloat.runtime.loader import weight_memory
from dfloat.testing import save_random_model

pytestmark = pytest.mark.gpu

BACKENDS = [b for b, mod in (("cuda", "cupy"), ("triton", "triton")) if importlib.util.find_spec(mod)]
TINY = dict(
    vocab_size=8192,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


@pytest.mark.parametrize("cols,chunk", [(2048, 29_568), (2048, 8_064), (4096, 53_120), (4096, 14_208)])
def test_row_chunked_linear_is_exact_at_vocab_shapes(cols, chunk):
    """128256-row lm_heads of Llama-3.2-1B / 3.1-8B with the chunk sizes their plans pick (default / per-matrix,
    benchmarks/results/memory_plan.json)."""
    g = torch.Generator(device="cuda").manual_seed(cols + chunk)
    w = (torch.randn(128256, cols, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    for m in (1, 16, 512):
        x = torch.randn(m, cols, device="cuda", generator=g).to(torch.bfloat16)
        parts = torch.cat([F.linear(x, w[r : r + chunk]) for r in range(0, w.shape[0], chunk)], dim=-1)
        assert torch.equal(parts, F.linear(x, w)), (cols, chunk, m)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def saved(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("gpu_chunked") / "src"
    save_random_model(folder, trained_scale=True, tie_word_embeddings=request.param, **TINY)
    dfloat.compress_model(folder, folder.parent / "out")
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to("cuda").eval()
    return folder.parent / "out", ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offload", [False, True])
def test_chunked_logits_and_generation_equal_on_gpu(saved, backend, offload):
    out, ref = saved
    model = dfloat.load_compressed(out, device="cuda", backend=backend, cpu_offload=offload)
    assert "model.embed_tokens" in model._dfloat_plan.chunked  # 8192 x 128 is bigger than a block here
    # the blocks are split-decoded (attention / MLP parts as sub-units), so the buffer is smaller than a block
    assert all(0 < u.decode_numel < u.numel for u in model._dfloat_plan.units if ".layers." in u.name)
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1)).to("cuda")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    g = model.generate(ids[:1, :8], max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(g, ref.generate(ids[:1, :8], max_new_tokens=20, min_new_tokens=20, do_sample=False))


def test_memory_held_matches_the_plan(saved):
    import gc

    out, _ = saved
    gc.collect()  # models of earlier tests (hooks make cycles) must not be freed while this one is measured
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model = dfloat.load_compressed(out, device="cuda", backend=BACKENDS[0] if BACKENDS else None)
    ids = torch.randint(0, TINY["vocab_size"], (1, 16), device="cuda")
    with torch.no_grad():
        model(ids)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    plan = model._dfloat_plan
    assert weight_memory(model)["decode_buffers"] == plan.buffer_bytes
    # the plan's weights plus what is not a weight: rotary tables, decode tables, status words, positions
    assert plan.total_bytes <= held <= plan.total_bytes + (4 << 20), (held, plan.as_dict())


@pytest.mark.skipif("cuda" not in BACKENDS, reason="needs CuPy")
def test_chunked_forward_replays_in_a_cuda_graph(saved):
    out, _ = saved
    model = dfloat.load_compressed(out, device="cuda", backend="cuda")
    ids = torch.randint(0, TINY["vocab_size"], (1, 1), device="cuda")  # one token, as in the H100 graph run
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            model(ids, use_cache=False)  # warm-up: sub-units, tables and plans made outside the capture
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(ids, use_cache=False).logits  # the embedding scans its chunks while capturing
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(captured, eager)
