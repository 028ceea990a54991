"""Official DFloat11 diffusion checkpoints, built here the way the official tools write them: the diffusers
naming of the FLUX.1 release (a file per block, config.json with only dfloat11_config; or one
model.safetensors) and ComfyUI-DFloat11's single FLUX file (Black Forest Labs' names, fused qkv). Both load as
diffusers models with outputs equal to the BF16 model's, and ``dfloat compress`` converts them to dfloat
checkpoints."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import dfloat
from dfloat.errors import ModelSourceError

diffusers = pytest.importorskip("diffusers")
from dfloat.runtime.official_diffusion import (  # noqa: E402
    FLUX_PATTERN,
    infer_flux_config,
    write_comfyui_flux,
    write_official_diffusers,
)
from dfloat.testing_diffusers import PIPELINE_CALLS, flux_inputs, save_tiny_pipeline  # noqa: E402

FLUX = diffusers.FluxTransformer2DModel


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny FLUX pipeline with FLUX's own head size (128, rotary axes 16/56/56), and its transformer's output."""
    root = tmp_path_factory.mktemp("flux")
    save_tiny_pipeline(
        "flux",
        root / "bf16",
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        axes_dims_rope=[16, 56, 56],
    )
    ref = FLUX.from_pretrained(root / "bf16" / "transformer", dtype=torch.bfloat16)
    with torch.no_grad():
        want = ref(**_inputs()).sample
    return root, want


def _inputs():
    return flux_inputs(
        SimpleNamespace(in_channels=16, joint_attention_dim=32, pooled_projection_dim=32), 16, 8
    )


def _out(model):
    with torch.no_grad():
        return model(**_inputs()).sample


@pytest.mark.parametrize("single_file", [False, True])
def test_diffusers_naming_loads_and_converts(flux, tmp_path, single_file):
    root, want = flux
    df11 = tmp_path / "FLUX-DF11"
    write_official_diffusers(root / "bf16" / "transformer", df11, FLUX_PATTERN, single_file=single_file)
    names = sorted(p.name for p in df11.iterdir())
    if single_file:
        assert names == ["config.json", "model.safetensors"]
    else:
        assert (
            "transformer_blocks_0.safetensors" in names and "single_transformer_blocks_0.safetensors" in names
        )
    assert list(json.loads((df11 / "config.json").read_text())) == [
        "dfloat11_config"
    ]  # as the Hub's releases

    with pytest.raises(ModelSourceError, match="config_from"):
        dfloat.load_compressed(df11, device="cpu")
    model = dfloat.load_compressed(df11, config_from=root / "bf16", device="cpu")
    assert isinstance(model, FLUX) and model._dfloat_units
    assert next(iter(model._dfloat_units.values())).code_kind == "df11-lut"  # used as stored
    assert torch.equal(_out(model), want)

    report = dfloat.compress_model(df11, tmp_path / "dfloat", config_from=root / "bf16" / "transformer")
    assert report.ratio < 0.8
    converted = FLUX.from_pretrained(tmp_path / "dfloat", dtype=torch.bfloat16)
    assert torch.equal(_out(converted), want)
    dfloat.verify_checkpoint(tmp_path / "dfloat", against=root / "bf16" / "transformer")


def test_comfyui_single_file_loads_and_converts(flux, tmp_path):
    root, want = flux
    file = tmp_path / "flux1-tiny-DF11.safetensors"
    write_comfyui_flux(root / "bf16" / "transformer", file)
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        keys = set(f.keys())
    assert {"double_blocks.0.encoded_exponent", "single_blocks.0.luts", "img_in.weight"} <= keys
    assert "double_blocks.0.img_attn.qkv.bias" in keys and not any(
        k.startswith("transformer_blocks") for k in keys
    )

    model = dfloat.load_compressed(file, device="cpu")  # config inferred from the tensors
    assert torch.equal(_out(model), want)
    members = {m.name for m in model._dfloat_units["transformer_blocks.0"].members}
    assert {"transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.add_v_proj.weight"} <= members

    ref = diffusers.DiffusionPipeline.from_pretrained(root / "bf16", dtype=torch.bfloat16)
    pipe = diffusers.DiffusionPipeline.from_pretrained(root / "bf16", transformer=model, dtype=torch.bfloat16)
    for output_type in ("latent", "pt"):
        a = ref(
            "a cat",
            generator=torch.Generator().manual_seed(0),
            output_type=output_type,
            **PIPELINE_CALLS["flux"],
        )
        b = pipe(
            "a cat",
            generator=torch.Generator().manual_seed(0),
            output_type=output_type,
            **PIPELINE_CALLS["flux"],
        )
        assert torch.equal(a.images, b.images)

    dfloat.compress_model(file, tmp_path / "converted")
    converted = FLUX.from_pretrained(tmp_path / "converted", dtype=torch.bfloat16)
    assert torch.equal(_out(converted), want)
    dfloat.verify_checkpoint(tmp_path / "converted", against=root / "bf16" / "transformer")


def test_flux_config_is_inferred_or_asked_for(flux):
    root, _ = flux
    config = json.loads((root / "bf16" / "transformer" / "config.json").read_text())
    tensors = {
        "img_in.weight": torch.empty(256, 16),
        "txt_in.weight": torch.empty(256, 32),
        "vector_in.in_layer.weight": torch.empty(256, 32),
        "final_layer.linear.weight": torch.empty(16, 256),
        "double_blocks.0.img_attn.norm.query_norm.scale": torch.empty(128),
        "single_blocks.0.norm.query_norm.scale": torch.empty(128),
    }
    got = infer_flux_config(tensors, "x")
    for k in (
        "in_channels",
        "num_layers",
        "num_single_layers",
        "attention_head_dim",
        "num_attention_heads",
        "joint_attention_dim",
        "pooled_projection_dim",
        "guidance_embeds",
        "axes_dims_rope",
    ):
        assert got[k] == config[k], k
    tensors["double_blocks.0.img_attn.norm.query_norm.scale"] = torch.empty(64)
    with pytest.raises(ModelSourceError, match="config_from"):
        infer_flux_config(tensors, "x")


WAN_PATTERN = {  # the per-block layers of a Wan transformer, as the official Wan release codes them
    r"blocks\.\d+": [
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
        "ffn.net.0.proj",
        "ffn.net.2",
    ]
}


def test_wan_diffusers_naming_keeps_float32_modules_as_diffusers_does(tmp_path):
    """Wan keeps its time embedder and modulation tables in float32: loaded from an official checkpoint they
    are upcast as diffusers upcasts them, so the output equals from_pretrained's."""
    save_tiny_pipeline("wan", tmp_path / "bf16")
    cls = diffusers.WanTransformer3DModel
    ref = cls.from_pretrained(tmp_path / "bf16" / "transformer", dtype=torch.bfloat16)
    write_official_diffusers(tmp_path / "bf16" / "transformer", tmp_path / "df11", WAN_PATTERN)
    model = dfloat.load_compressed(tmp_path / "df11", config_from=tmp_path / "bf16", device="cpu")
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 2, 4, 4, generator=g).bfloat16(),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 6, 32, generator=g).bfloat16(),
    )
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, ref(**inputs).sample)


def test_config_from_the_hub_fails_fast_and_says_why(monkeypatch):
    """A Hub that cannot be reached is one attempt (huggingface_hub already retried it), not one per place the
    config could be, and the error says why; a missing config at one place tries the next."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from dfloat.runtime.official_diffusion import model_config

    calls = []

    def unreachable(repo, filename, **kw):
        calls.append(filename)
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(ModelSourceError, match="could not fetch its config.json from the Hub"):
        model_config("black-forest-labs/FLUX.1-dev")
    assert calls == ["transformer/config.json"]

    calls.clear()

    def missing(repo, filename, **kw):
        calls.append(filename)
        raise EntryNotFoundError(f"{filename}: 404")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    with pytest.raises(ModelSourceError, match="no diffusers model config found on the Hub"):
        model_config("someone/model")
    assert calls == ["transformer/config.json", "unet/config.json", "config.json"]
