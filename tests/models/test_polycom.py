"""PolyNorm / PolyReLU against formulas written out here, and the MLP wiring they sit in."""

from __future__ import annotations

import pytest
import torch

from dfloat.models import PolyNorm, PolyReLU
from dfloat.models.polycom import PolyComMLP
from dfloat.models.testing import prompt, tiny_model


def hand_rms(u, eps=1e-6):
    return u * torch.rsqrt((u**2).mean(dim=-1, keepdim=True) + eps)


def hand_polynorm(x, w, b):
    return w[0] * hand_rms(x**3) + w[1] * hand_rms(x**2) + w[2] * hand_rms(x) + b


def hand_polyrelu(x, w, b):
    r = torch.clamp(x, min=0)
    return w[0] * r**3 + w[1] * r**2 + w[2] * r + b


def _randomised(module):
    with torch.no_grad():
        module.weight.copy_(torch.tensor([0.7, -0.2, 0.45]))
        module.bias.copy_(torch.tensor([0.05]))
    return module


@pytest.mark.parametrize("cls,formula", [(PolyNorm, hand_polynorm), (PolyReLU, hand_polyrelu)])
def test_activation_matches_hand_formula_float32(cls, formula):
    act = _randomised(cls())
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(act(x), formula(x, act.weight, act.bias))


@pytest.mark.parametrize("cls,formula", [(PolyNorm, hand_polynorm), (PolyReLU, hand_polyrelu)])
def test_activation_dtype_conventions_bf16(cls, formula):
    """The "activation" mode computes in BF16 (reference); "float32" upcasts and casts back (Motif): other bits."""
    x = torch.randn(4, 7, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    in_act = _randomised(cls(activation_dtype="activation")).to(torch.bfloat16)
    in_f32 = _randomised(cls(activation_dtype="float32")).to(torch.bfloat16)
    w, b = in_act.weight.detach(), in_act.bias.detach()
    with torch.no_grad():
        y_act, y_f32 = in_act(x), in_f32(x)
    assert y_act.dtype == y_f32.dtype == torch.bfloat16
    assert torch.equal(y_act, formula(x, w, b))
    assert torch.equal(y_f32, formula(x.float(), w.float(), b.float()).to(torch.bfloat16))
    assert not torch.equal(y_act, y_f32)


def test_polynorm_normalises_each_power():
    """With one coefficient at a time, the output is the RMS-normalised power: mean square 1 over the last dim."""
    act = PolyNorm()
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    for i in range(3):
        with torch.no_grad():
            act.weight.zero_()
            act.weight[i] = 1.0
            y = act(x)
        torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(2), rtol=0, atol=1e-4)


@pytest.mark.parametrize("hidden_act", ["polynorm", "polyrelu"])
def test_reference_initialisation(hidden_act):
    model = tiny_model("polycom", hidden_act=hidden_act)
    for layer in model.model.layers:
        act = layer.mlp.act_fn
        assert isinstance(act, PolyNorm if hidden_act == "polynorm" else PolyReLU)
        assert act.weight.shape == (3,) and act.bias.shape == (1,)
        assert torch.equal(act.weight, torch.full((3,), 1.0 / 3.0))
        assert torch.equal(act.bias, torch.zeros(1))
        assert act.eps == 1e-6


@pytest.mark.parametrize("gated", [False, True])
def test_mlp_wiring(gated):
    model = tiny_model("polycom", mlp_gated=gated)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, PolyComMLP)
    assert hasattr(mlp, "gate_proj") == gated
    _randomised(mlp.act_fn)
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        w, b = mlp.act_fn.weight, mlp.act_fn.bias
        if gated:
            expected = mlp.down_proj(hand_polynorm(mlp.gate_proj(x), w, b) * mlp.up_proj(x))
        else:
            expected = mlp.down_proj(hand_polynorm(mlp.up_proj(x), w, b))
        assert torch.equal(mlp(x), expected)


def test_activation_coefficients_reach_the_logits():
    model = tiny_model("polycom")
    ids = prompt()
    with torch.no_grad():
        before = model(ids).logits
        model.model.layers[1].mlp.act_fn.weight[0] += 0.5
        after = model(ids).logits
    assert not torch.equal(before, after)


def test_config_rejects_unknown_values():
    from dfloat.models import PolyComConfig

    with pytest.raises(ValueError, match="hidden_act"):
        PolyComConfig(hidden_act="gelu")
    with pytest.raises(ValueError, match="activation_dtype"):
        PolyComConfig(activation_dtype="bf16")


def test_reference_preset_matches_the_reference_script():
    """Vocab 32000 padded to a multiple of 128 (Megatron), RMSNorm eps 1e-5, the 1.3B shape, untied."""
    from dfloat.models import PolyComConfig
    from dfloat.models.polycom import padded_vocab_size

    assert (
        padded_vocab_size(32000) == 32000
        and padded_vocab_size(32001) == 32128
        and padded_vocab_size(50257) == 50304
    )
    cfg = PolyComConfig.reference_preset()
    assert (cfg.vocab_size, cfg.rms_norm_eps, cfg.activation_eps) == (32000, 1e-5, 1e-6)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (
        2048, 8256, 24, 16,
    )  # fmt: skip
    assert cfg.tie_word_embeddings is False
    assert PolyComConfig.reference_preset(tokenizer_vocab=32003).vocab_size == 32128
    default = PolyComConfig()
    assert (default.vocab_size, default.rms_norm_eps) == (32000, 1e-5)
