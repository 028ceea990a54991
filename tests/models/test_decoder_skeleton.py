"""The shared decoder: Llama-like names, the Auto registration, KV-cache decoding, and the runtime's hook contract."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

import dfloat.models as dm
from dfloat.models.skeleton import CACHE_FIELD, RMSNorm, rotary_cos_sin
from dfloat.models.testing import ARCHS, prompt, tiny_config, tiny_model

LAYER_PARAM = re.compile(
    r"model\.layers\.\d+\.("
    r"self_attn\.[qkvo]_proj\.weight|input_layernorm\.weight|post_attention_layernorm\.weight"
    r"|mlp\.(gate|up|down)_proj\.weight|mlp\.act_fn\.(weight|bias))"
)
OUTSIDE_LAYERS = {
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
}
EXTRA_PREFIX = {"nextlat": "latent_head.", "bottlenecked": "cache_processor."}


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_names_are_llama_like(arch):
    model = tiny_model(arch)
    for name, _ in model.named_parameters():
        if name in OUTSIDE_LAYERS or LAYER_PARAM.fullmatch(name):
            continue
        assert arch in EXTRA_PREFIX and name.startswith(EXTRA_PREFIX[arch]), name
    layers = {int(n.split(".")[2]) for n, _ in model.named_parameters() if n.startswith("model.layers.")}
    assert layers == set(range(model.config.num_hidden_layers))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_matrix_is_a_linear_or_embedding_weight(arch):
    model = tiny_model(arch)
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        if param.dim() != 2:
            continue
        owner, attr = name.rsplit(".", 1)
        assert attr == "weight" and isinstance(modules[owner], (nn.Linear, nn.Embedding)), name
    assert not list(model.buffers())  # nothing derived from weights is kept


def test_auto_classes_resolve_and_registration_is_idempotent():
    dm.register_auto_classes()
    dm.register_auto_classes()
    for model_type, (config_cls, model_cls, lm_cls) in dm.ARCHITECTURES.items():
        values = {k: v for k, v in tiny_config(model_type).to_dict().items() if k != "model_type"}
        cfg = AutoConfig.for_model(model_type, **values)
        assert type(cfg) is config_cls and cfg.model_type == model_type
        assert type(AutoModelForCausalLM.from_config(cfg)) is lm_cls
        assert type(AutoModel.from_config(cfg)) is model_cls


def test_outputs_use_this_transformers_cache_field():
    assert CACHE_FIELD in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    out = tiny_model("polycom")(prompt())
    assert isinstance(getattr(out, CACHE_FIELD), DynamicCache)


def test_rmsnorm_and_rope_follow_llama():
    x = torch.randn(2, 5, 32).to(torch.bfloat16)
    norm = RMSNorm(32)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 32))
        h = x.float()
        expected = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
        assert torch.equal(norm(x), expected)
    cos, sin = rotary_cos_sin(torch.arange(4)[None], 8, 10000.0, torch.float32)
    inv = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    angles = torch.arange(4).float()[:, None] * inv
    assert torch.equal(cos[0], torch.cat([angles, angles], -1).cos())
    assert torch.equal(sin[0], torch.cat([angles, angles], -1).sin())


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_decoding_equals_full_recompute(arch):
    """Cached one-token steps give a full forward's logits, and cached generate() its tokens exactly."""
    model = tiny_model(arch, use_cache_processor=False) if arch == "bottlenecked" else tiny_model(arch)
    ids = prompt(seed=1, length=12)
    cache = DynamicCache()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        steps = [model(ids[:, :4], cache=cache).logits]
        steps += [model(ids[:, i : i + 1], cache=cache).logits for i in range(4, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    short = ids[:, :5]
    cached = model.generate(short, max_new_tokens=10, do_sample=False)
    assert torch.equal(cached, model.generate(short, max_new_tokens=10, do_sample=False, use_cache=False))


def test_eager_and_sdpa_backends_agree():
    """Both backends on every mask form: causal prefill, explicit sliding masks, unmasked one-token decode."""
    ids = prompt(length=10)
    sdpa = tiny_model("masformer", attention_backend="sdpa")
    eager = tiny_model("masformer", attention_backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(eager(ids).logits, sdpa(ids).logits, rtol=0, atol=1e-5)
    assert torch.equal(
        eager.generate(ids, max_new_tokens=8, do_sample=False),
        sdpa.generate(ids, max_new_tokens=8, do_sample=False),
    )


def _guard_weights(model):
    """Poison every 2-D weight with NaN except while its own module runs, as a runtime decoding into a shared
    buffer would: any read outside the module's forward (a cached copy, a direct .weight use) turns into NaN."""
    handles = []
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is None or weight.dim() != 2:
            continue
        real = weight.detach().clone()
        weight.data.fill_(float("nan"))

        def restore(mod, args, real=real):
            mod.weight.data.copy_(real)

        def poison(mod, args, output):
            mod.weight.data.fill_(float("nan"))

        handles.append(module.register_forward_pre_hook(restore))
        handles.append(module.register_forward_hook(poison))
    return handles


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_are_read_only_inside_their_modules_forward(arch):
    ref = tiny_model(arch)
    guarded = tiny_model(arch)
    _guard_weights(guarded)
    ids = prompt(seed=0, length=6)
    with torch.no_grad():
        assert torch.equal(guarded(ids).logits, ref(ids).logits)
    assert torch.equal(
        guarded.generate(ids, max_new_tokens=12, do_sample=False),
        ref.generate(ids, max_new_tokens=12, do_sample=False),
    )
    if arch == "nextlat":
        assert torch.equal(guarded.generate_speculative(ids, 12, 3), ref.generate_speculative(ids, 12, 3))
    if arch == "bottlenecked":
        assert ref.rewrite_log and guarded.rewrite_log == ref.rewrite_log
