"""On a GPU: the fused decode-GEMV equals its twin bit for bit, decodes exactly, stays close to cuBLAS, replays in a
CUDA graph, and load_compressed(matmul="fused") runs a model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dfloat.testing import weights_like

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("cupy") is None,
        reason="needs a CUDA GPU and CuPy",
    ),
]


def _rand(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).to(torch.bfloat16).cuda()


# the full Llama-3.1-8B shapes are checked (fused == twin) by benchmarks/gpu_gemv.py
SHAPES = [(1, 1), (3, 5), (37, 131), (300, 517), (1000, 4097), (1024, 4096), (4096, 4096)]


@pytest.mark.parametrize("n,k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_fused_equals_twin_and_is_close_to_cublas(n, k):
    from dfloat.kernels import cuda_gemv, gemv_layout

    w = weights_like(n * k, seed=n).view(n, k)
    gm = gemv_layout.encode(w).to("cuda")
    wc = w.cuda()
    assert torch.equal(cuda_gemv.decode_matrix(gm).view(torch.int16), wc.view(torch.int16))
    for rows in (1, 2, 3, 7, 8, 9, 12, 16):
        x = _rand(rows, k, seed=rows)
        y = cuda_gemv.gemv(gm, x)
        t = cuda_gemv.twin(wc, x, gm.rows_per_tile, gm.threads)
        assert torch.equal(y.view(torch.int16), t.view(torch.int16)), f"rows={rows}"
        ref = x.float() @ wc.float().T
        assert torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()) + 1e-6)
    x = _rand(3, k + 1, seed=0)[:, 1:]  # unaligned rows: the scalar path
    assert torch.equal(
        cuda_gemv.gemv(gm, x).view(torch.int16),
        cuda_gemv.twin(wc, x, gm.rows_per_tile, gm.threads).view(torch.int16),
    )


def test_graph_replay_is_exact():
    from dfloat.kernels import cuda_gemv, gemv_layout

    w = weights_like(512 * 1024, seed=3).view(512, 1024)
    gm = gemv_layout.encode(w).to("cuda")
    x = _rand(4, 1024, seed=1)
    eager = cuda_gemv.gemv(gm, x).clone()
    out = torch.empty_like(eager)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cuda_gemv.gemv(gm, x, out=out)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        cuda_gemv.gemv(gm, x, out=out)
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.view(torch.int16), eager.view(torch.int16))


def test_fused_model(tmp_path):
    from transformers import AutoModelForCausalLM

    import dfloat
    from dfloat.runtime import fused
    from dfloat.testing import save_random_model

    folder = tmp_path / "src"
    save_random_model(
        folder,
        trained_scale=True,
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        attention_bias=True,
    )
    dfloat.compress_model(folder, tmp_path / "out")
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to("cuda").eval()
    model = dfloat.load_compressed(tmp_path / "out", device="cuda", matmul="fused")
    assert any(isinstance(m, fused.FusedLinear) for m in model.modules())
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        # 40 rows: prefill decodes then calls cuBLAS, the BF16 model's own math: identical logits
        assert torch.equal(model(ids).logits, ref(ids).logits)
        one = model(ids[:, :1]).logits  # 1 row: the fused kernel
        want = ref(ids[:, :1]).logits.float()
        assert float((one.float() - want).abs().max()) <= 0.03 * float(want.abs().max()) + 0.05
    g = model.generate(ids[:, :8], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert g.shape == (1, 16)


def test_fused_model_in_the_cuda_graph_generation_path(tmp_path):
    """dfloat.generate's captured decode step with fused linears gives the tokens of the same loop uncaptured."""
    import dfloat
    from dfloat.runtime.generate import generate_ids
    from dfloat.testing import save_random_model

    folder = tmp_path / "bf16"
    save_random_model(
        folder, trained_scale=True, vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    dfloat.compress_model(folder, tmp_path / "out")
    model = dfloat.load_compressed(tmp_path / "out", device="cuda", matmul="fused")
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2)).cuda()
    plain = generate_ids(model, ids, max_new_tokens=12, stop_token_ids=[], graphs=False)
    graph = generate_ids(model, ids, max_new_tokens=12, stop_token_ids=[], graphs=True)
    assert graph.path == "graph"
    assert graph.tokens == plain.tokens


@pytest.mark.parametrize("threads", [128, 256])
@pytest.mark.parametrize("r", [8, 4])
def test_register_capped_and_wide_builds_equal_the_twin(r, threads):
    # batch 8/16 launch __launch_bounds__(128, 3) builds for blocks of <= 128 threads, unbounded ones for 256
    from dfloat.kernels import cuda_gemv, gemv_layout

    w = weights_like(2048 * 2048, seed=r).view(2048, 2048)
    gm = gemv_layout.encode(w, rows_per_tile=r, threads=threads).to("cuda")
    for rows in (8, 16):
        kernel = cuda_gemv.plan("fused", r, threads, gm.n_tiles, gm.peek, rows).kernel
        assert kernel.endswith(", 3>") == (
            threads <= 128 and r * min(rows, cuda_gemv.MAX_ROWS_PER_PASS[r]) > 48
        )
        x = _rand(rows, 2048, seed=rows)
        y = cuda_gemv.gemv(gm, x)
        t = cuda_gemv.twin(w.cuda(), x, r, threads)
        assert torch.equal(y.view(torch.int16), t.view(torch.int16)), (r, threads, rows)
