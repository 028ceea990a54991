"""The core promise, per model family: compress -> load_compressed gives the BF16 model's logits and greedy tokens
bit for bit, and decompress_model gives back the original tensors byte for byte."""

import glob

import pytest
import torch
from safetensors.torch import load_file

import dfloat
from dfloat.runtime.checkpoint import describe_unit_layout
from dfloat.testing import save_random_model

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _configs():
    from transformers import (
        Gemma2Config,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    return {
        "llama": LlamaConfig(**COMMON, tie_word_embeddings=False),
        "qwen2": Qwen2Config(**COMMON, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**COMMON, head_dim=16),
        "mistral": MistralConfig(**COMMON, sliding_window=8),
        "gemma2": Gemma2Config(**COMMON, head_dim=16, sliding_window=8),
        "phi3": Phi3Config(**{**COMMON, "num_key_value_heads": 4}, pad_token_id=0),
    }


def save_bf16(config, folder, seed=0):
    """A random model saved in BF16 as a multi-shard checkpoint; the reference is it loaded back as users do."""
    from transformers import AutoModelForCausalLM

    save_random_model(folder, config, seed=seed, trained_scale=True, max_shard_size="60KB")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()


def all_tensors(folder):
    out = {}
    for f in sorted(glob.glob(f"{folder}/*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3"])
def test_family_is_bit_identical(family, tmp_path):
    config = _configs()[family]
    ref = save_bf16(config, tmp_path / "src")
    assert len(glob.glob(str(tmp_path / "src" / "*.safetensors"))) > 1
    report = dfloat.compress_model(tmp_path / "src", tmp_path / "out")
    assert report.coded_units == report.units and report.ratio < 0.75

    layout = describe_unit_layout(tmp_path / "out")
    coded = {n for names in layout.values() for n in names}
    big = {n for n, t in all_tensors(tmp_path / "src").items() if t.ndim >= 2}
    assert coded == big  # every 2-D weight is in a unit; tied weights are stored once
    assert {u for u in layout if ".layers." in u} == {
        f"model.layers.{i}" for i in range(config.num_hidden_layers)
    }

    model = dfloat.load_compressed(tmp_path / "out", device="cpu")
    ids = torch.randint(3, config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    prompt = ids[:1, :7]
    g_ref = ref.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    g = model.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert g.shape[1] == 27 and torch.equal(g, g_ref)

    dfloat.decompress_model(tmp_path / "out", tmp_path / "back")
    src, back = all_tensors(tmp_path / "src"), all_tensors(tmp_path / "back")
    assert set(src) == set(back)
    for name, t in src.items():
        assert t.dtype == back[name].dtype and t.shape == back[name].shape
        assert torch.equal(t.view(torch.uint8), back[name].view(torch.uint8)), name
