"""On a GPU: the CUDA-graph decode path gives the tokens of the eager BF16 model, and a captured step's logits
equal the same step run eagerly, for BF16 and compressed weights (decode kernels inside the graph)."""

import copy

import pytest
import torch

import dfloat
from dfloat.runtime.generate import _Session, generate_ids, release_graphs
from dfloat.testing import save_random_model

pytestmark = pytest.mark.gpu

TINY = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("gen") / "src"
    save_random_model(folder, trained_scale=True, **TINY)
    dfloat.compress_model(folder, folder.parent / "out")
    bf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to("cuda").eval()
    return bf16, dfloat.load_compressed(folder.parent / "out", device="cuda")


def _prompts():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 512, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids.masked_fill(mask == 0, 0).cuda(), mask.cuda()


@pytest.mark.parametrize("rows", [1, 3])
def test_graph_tokens_equal_eager_bf16_tokens(models, rows):
    bf16, compressed = models
    ids, mask = _prompts()
    ids, mask = ids[:rows], mask[:rows]
    eager = generate_ids(bf16, ids, mask, max_new_tokens=24, stop_token_ids=[], graphs=False)
    assert eager.path == "static"
    for model in (bf16, compressed):
        graph = generate_ids(model, ids, mask, max_new_tokens=24, stop_token_ids=[], graphs=True)
        assert graph.path == "graph"
        assert graph.tokens == eager.tokens
        again = generate_ids(model, ids, mask, max_new_tokens=24, stop_token_ids=[])  # the graph is reused
        assert again.capture_s == 0 and again.tokens == eager.tokens
        release_graphs(model)

    # and transformers' eager generate, on a float32 copy (in BF16 a near-tie can round differently between a
    # static and a dynamic cache, see tests/runtime/test_generate.py)
    f32 = copy.deepcopy(bf16).float()
    ref = f32.generate(ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    graph = generate_ids(f32, ids, mask, max_new_tokens=24, stop_token_ids=[], graphs=True)
    assert graph.path == "graph" and graph.tokens == ref[:, ids.shape[1] :].tolist()


@pytest.mark.parametrize("which", ["bf16", "dfloat"])
def test_captured_step_logits_equal_eager_step(models, which):
    model = models[0] if which == "bf16" else models[1]
    ids, mask = _prompts()
    sessions = []
    with torch.inference_mode():
        for capture in (True, False):
            s = _Session(model, "hf", 4, 256, torch.device("cuda"))
            if capture:
                s.capture()
            s.reset()
            rows_ids = torch.cat([ids, ids[-1:]])
            rows_mask = torch.cat([mask, mask[-1:]])
            s.valid[:, : ids.shape[1]] = rows_mask.bool()
            pos = (rows_mask.cumsum(-1) - 1).clamp(min=0)
            first = s.forward(rows_ids, pos)
            s.pos.copy_(pos[:, -1:] + 1)
            s.slot.fill_(ids.shape[1])
            sessions.append((s, first))
        (graph, first_g), (eager, first_e) = sessions
        assert torch.equal(first_g, first_e)
        token = first_e.argmax(-1)
        for _ in range(6):
            graph.ids.copy_(token[:, None])
            eager.ids.copy_(token[:, None])
            a, b = graph.replay().clone(), eager.step()
            assert torch.equal(a, b)
            token = b.argmax(-1)


def test_checked_decodes_run_the_steps_without_capture(models, monkeypatch):
    # DFLOAT_CHECK=1 reads each decode's status on the host: no graph, the same tokens, no capture error
    bf16, compressed = models
    ids, mask = _prompts()
    eager = generate_ids(bf16, ids, mask, max_new_tokens=12, stop_token_ids=[], graphs=False)
    monkeypatch.setenv("DFLOAT_CHECK", "1")
    checked = generate_ids(compressed, ids, mask, max_new_tokens=12, stop_token_ids=[])
    assert checked.path == "static" and "DFLOAT_CHECK" in checked.reason
    assert checked.tokens == eager.tokens
    release_graphs(compressed)
