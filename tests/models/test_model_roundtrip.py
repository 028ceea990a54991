"""save_pretrained -> AutoModelForCausalLM.from_pretrained keeps every weight, the config and the logits (BF16)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import dfloat.models as dm
from dfloat.models.testing import ARCHS, prompt, tiny_model


def _perturb_small_params(model):
    """Move every 1-D parameter off its init value, so a reload that re-initialises instead of loading fails."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() < 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_save_and_auto_load_round_trip(arch, tmp_path):
    model = tiny_model(arch)
    _perturb_small_params(model)
    model.to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()

    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is dm.ARCHITECTURES[arch][0]
    saved, reread = model.config.to_dict(), config.to_dict()
    for values in (saved, reread):
        values.pop("_name_or_path", None)
    assert reread == saved
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert type(loaded) is type(model)

    ref_state, new_state = model.state_dict(), loaded.state_dict()
    assert ref_state.keys() == new_state.keys()
    for name, tensor in ref_state.items():
        assert new_state[name].dtype == torch.bfloat16 and torch.equal(new_state[name], tensor), name

    ids = prompt(length=9)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert torch.equal(
        loaded.generate(ids, max_new_tokens=8, do_sample=False),
        model.generate(ids, max_new_tokens=8, do_sample=False),
    )


def test_tied_embeddings_stay_tied_through_a_round_trip(tmp_path):
    model = tiny_model("polycom", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = prompt(length=5)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
