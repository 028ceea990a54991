"""On a GPU: compressed models give the BF16 model's logits and tokens on the same device, with every backend."""

import importlib.util

import pytest
import torch

import dfloat
from dfloat.testing import save_random_model

pytestmark = pytest.mark.gpu

TINY = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("gpu") / "src"
    save_random_model(folder, trained_scale=True, **TINY)
    dfloat.compress_model(folder, folder.parent / "out")
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to("cuda").eval()
    return folder.parent / "out", ref


BACKENDS = [b for b, mod in (("cuda", "cupy"), ("triton", "triton")) if importlib.util.find_spec(mod)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offload", [False, True])
def test_logits_and_generation_equal_on_gpu(saved, backend, offload):
    out, ref = saved
    model = dfloat.load_compressed(out, device="cuda", backend=backend, cpu_offload=offload)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1)).to("cuda")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    g = model.generate(ids[:1, :8], max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(g, ref.generate(ids[:1, :8], max_new_tokens=20, min_new_tokens=20, do_sample=False))
