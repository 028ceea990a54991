"""Diffusion models through diffusers: pipelines and models compress component by component, load with
``from_pretrained`` (no ``import dfloat`` needed), and with a fixed generator give latents and pixels
``torch.equal`` to the BF16 pipeline's, for tiny FLUX, SD3, Wan and Stable Diffusion (UNet) pipelines on the
CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dfloat
from dfloat.errors import DFloatError, ModelSourceError, OutputExistsError, UnsupportedDtypeError

diffusers = pytest.importorskip("diffusers")
from dfloat.testing_diffusers import (  # noqa: E402
    KINDS,
    PIPELINE_CALLS,
    build_tiny_pipeline,
    flux_inputs,
    save_tiny_pipeline,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """Each kind saved in BF16 and compressed: {kind: root} with root/"bf16" and root/"dfloat"."""
    out = {}
    for kind in KINDS:
        root = tmp_path_factory.mktemp(kind)
        save_tiny_pipeline(kind, root / "bf16")
        dfloat.compress_model(root / "bf16", root / "dfloat")
        out[kind] = root
    return out


def _run(pipe, kind, output_type, **extra):
    out = pipe(
        "a cat",
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
        **{**PIPELINE_CALLS[kind], **extra},
    )
    return out.frames if hasattr(out, "frames") else out.images


def _load(folder, **kw):
    return diffusers.DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_latents_and_pixels_equal_bf16(pipelines, kind):
    root = pipelines[kind]
    ref, pipe = _load(root / "bf16"), _load(root / "dfloat")
    denoiser = pipe.unet if kind == "unet" else pipe.transformer
    assert denoiser.is_quantized and denoiser._dfloat_units  # really the compressed model
    for output_type in ("latent", "pt"):
        want, got = _run(ref, kind, output_type), _run(pipe, kind, output_type)
        assert got.dtype == want.dtype and torch.equal(got, want), (kind, output_type)


def test_every_bf16_component_compressed_the_rest_copied(pipelines):
    root = pipelines["flux"]
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        # every compressed component names its index copy and shards as diffusers does (what its Hub
        # downloader fetches), none as transformers reads by itself
        folder = root / "dfloat" / name
        index = (folder / "dfloat.safetensors.index.json").read_bytes()
        assert (folder / "diffusion_pytorch_model.safetensors.index.json").read_bytes() == index
        shards = set(json.loads(index)["weight_map"].values())
        assert (
            shards
            == {p.name for p in folder.glob("*.safetensors")}
            == {"diffusion_pytorch_model-00001-of-00001.safetensors"}
        )
        assert not list(folder.glob("model*"))
    for name in ("transformer", "vae"):
        config = json.loads((root / "dfloat" / name / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "dfloat" and "_dfloat" in config
        assert config["_dfloat"]["source"].endswith(f"bf16/{name}")
    for name in ("text_encoder", "text_encoder_2"):
        config = json.loads((root / "dfloat" / name / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "dfloat" and "dfloat" in config
        assert config["quantization_config"]["index"] == "diffusion_pytorch_model.safetensors.index.json"
    for name in ("tokenizer", "tokenizer_2", "scheduler"):
        for f in (root / "bf16" / name).iterdir():
            assert (root / "dfloat" / name / f.name).read_bytes() == f.read_bytes()
    index = json.loads((root / "dfloat" / "model_index.json").read_text())
    assert index == json.loads((root / "bf16" / "model_index.json").read_text())
    # conv weights are coded too (the VAE is all convolutions but its attention)
    layout = dfloat.runtime.checkpoint.describe_unit_layout(root / "dfloat" / "vae")
    assert "encoder.down_blocks.0.resnets.0" in layout and "encoder.conv_in" in layout


def test_units_follow_the_blocks(pipelines):
    from dfloat.runtime.checkpoint import describe_unit_layout

    flux = describe_unit_layout(pipelines["flux"] / "dfloat" / "transformer")
    assert {
        "transformer_blocks.0",
        "transformer_blocks.1",
        "single_transformer_blocks.1",
        "x_embedder",
    } <= set(flux)
    assert "transformer_blocks.0.attn.to_out.0.weight" in flux["transformer_blocks.0"]
    unet = describe_unit_layout(pipelines["unet"] / "dfloat" / "unet")
    assert "down_blocks.1.attentions.0.transformer_blocks.0" in unet
    assert "down_blocks.1.attentions.0" in unet and "down_blocks.0.resnets.0" in unet
    wan = describe_unit_layout(pipelines["wan"] / "dfloat" / "transformer")
    assert "blocks.0" in wan and "patch_embedding" in wan  # a Conv3d
    # Wan keeps its time embedder and scale_shift_table in float32: those stay plain, as diffusers upcasts
    # them
    members = {m for names in wan.values() for m in names}
    assert not any("time_embedder" in m or "scale_shift_table" in m for m in members)
    sd3 = describe_unit_layout(pipelines["sd3"] / "dfloat" / "transformer")
    assert not any("pos_embed.pos_embed" in m for names in sd3.values() for m in names)  # a buffer


def test_model_from_pretrained_holds_no_bf16_copy(pipelines):
    from dfloat.runtime.loader import weight_memory

    root = pipelines["flux"]
    cls = diffusers.FluxTransformer2DModel
    model = cls.from_pretrained(root / "dfloat" / "transformer", dtype=torch.bfloat16, device_map="cpu")
    ref = cls.from_pretrained(root / "bf16" / "transformer", dtype=torch.bfloat16)
    buffer = next(iter(model._dfloat_buffers.values())).tensor
    coded = {m.name for ct in model._dfloat_units.values() for m in ct.members}
    params = dict(model.named_parameters())
    for name in coded:  # every coded weight is a view of the one decode buffer
        assert params[name].untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr(), name
    bf16 = sum(p.numel() * 2 for p in ref.parameters())
    assert weight_memory(model)["total"] < bf16
    inputs = flux_inputs(ref.config, image_tokens=16, text_tokens=8)
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, ref(**inputs).sample)


def test_device_map_and_model_cpu_offload(pipelines):
    root = pipelines["flux"]
    want = _run(_load(root / "bf16"), "flux", "latent")
    assert torch.equal(_run(_load(root / "dfloat", device_map="cpu"), "flux", "latent"), want)
    pipe = _load(root / "dfloat")
    pipe.enable_model_cpu_offload(device="cpu")  # model.to(device) before each component runs
    assert torch.equal(_run(pipe, "flux", "latent"), want)
    assert torch.equal(_run(pipe, "flux", "latent"), want)


def test_sequential_cpu_offload_is_refused(pipelines):
    """accelerate's weight offloading would swap the coded weights for stale copies: refused, not wrong images."""
    pipe = _load(pipelines["unet"] / "dfloat")
    pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(DFloatError, match="enable_model_cpu_offload"):
        _run(pipe, "unet", "latent")


def test_model_to_moves_units_and_refuses_a_dtype(pipelines):
    root = pipelines["unet"]
    ref, pipe = _load(root / "bf16"), _load(root / "dfloat")
    want = _run(ref, "unet", "latent")
    pipe.to("cpu")
    pipe.unet.to(torch.device("cpu"))
    assert torch.equal(_run(pipe, "unet", "latent"), want)
    with pytest.raises((DFloatError, ValueError)):
        pipe.unet.float()
    with pytest.raises(DFloatError, match="BF16 only"):
        torch.nn.Module.to(pipe.unet, torch.float16)
    assert torch.equal(_run(pipe, "unet", "latent"), want)  # a refused cast leaves the model as it was


def test_lora_on_a_compressed_base(pipelines, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = pipelines["flux"]
    model = build_tiny_pipeline("flux").transformer
    torch.manual_seed(1)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"]
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    layers = {k: v.to(torch.bfloat16) for k, v in get_peft_model_state_dict(model).items()}
    diffusers.FluxPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=layers)
    ref, pipe = _load(root / "bf16"), _load(root / "dfloat")
    plain = _run(ref, "flux", "latent")
    for p in (ref, pipe):
        p.load_lora_weights(tmp_path / "lora", adapter_name="style")
    want = _run(ref, "flux", "latent")
    assert not torch.equal(want, plain)  # the LoRA does something
    assert torch.equal(_run(pipe, "flux", "latent"), want)
    with pytest.raises(DFloatError, match="cannot be fused"):
        pipe.fuse_lora()
    assert torch.equal(_run(pipe, "flux", "latent"), want)


def test_single_model_folder(pipelines, tmp_path):
    root = pipelines["sd3"]
    report = dfloat.compress_model(root / "bf16" / "transformer", tmp_path / "t")
    assert report.units > 0 and report.ratio < 0.8
    card = (tmp_path / "t" / "README.md").read_text()
    assert card.count("SD3Transformer2DModel") >= 2 and 'from_pretrained("t"' in card
    assert str(tmp_path) not in card and str(root) not in card  # a published card names no local paths
    assert str(tmp_path) not in (root / "dfloat" / "README.md").read_text()
    dfloat.verify_checkpoint(tmp_path / "t")
    cls = diffusers.SD3Transformer2DModel
    model = cls.from_pretrained(tmp_path / "t", dtype=torch.bfloat16)
    ref = cls.from_pretrained(root / "bf16" / "transformer", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 8, 8, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, 6, 32, generator=g).bfloat16(),
        pooled_projections=torch.randn(1, 64, generator=g).bfloat16(),
        timestep=torch.tensor([3.0]),
    )
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, ref(**inputs).sample)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "again")


def test_load_compressed_on_diffusers_folders(pipelines):
    root = pipelines["unet"]
    pipe = dfloat.load_compressed(root / "dfloat", device="cpu")
    assert isinstance(pipe, diffusers.StableDiffusionPipeline) and pipe.unet._dfloat_units
    assert torch.equal(_run(pipe, "unet", "latent"), _run(_load(root / "bf16"), "unet", "latent"))
    unet = dfloat.load_compressed(root / "dfloat" / "unet", device="cpu", verify=False)
    assert isinstance(unet, diffusers.UNet2DConditionModel) and unet._dfloat_units
    with pytest.raises(ModelSourceError, match="not a compressed model"):
        dfloat.load_compressed(root / "bf16" / "unet")
    with pytest.raises(ModelSourceError, match="no component is compressed"):
        dfloat.load_compressed(root / "bf16")


def test_loads_without_import_dfloat(pipelines):
    """What a user's script sees: a fresh interpreter; the .pth hook registers dfloat with diffusers."""
    folder = pipelines["flux"] / "dfloat" / "transformer"
    code = (
        "import sys, torch\n"
        "from diffusers import FluxTransformer2DModel\n"
        f"m = FluxTransformer2DModel.from_pretrained({str(folder)!r}, dtype=torch.bfloat16)\n"
        "print(type(m.hf_quantizer).__module__, bool(m._dfloat_units))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.stdout.split() == ["dfloat.runtime.diffusers_quantizer", "True"], run.stderr[-2000:]


def _serve_as_hub(monkeypatch, repo: Path, cache: Path) -> list[str]:
    """diffusers' Hub functions answered from the folder ``repo``: what they fetch lands in an HF-cache-like
    snapshot (files are links to blobs, as huggingface_hub makes them); returns the fetched names."""
    import shutil
    from types import SimpleNamespace

    from diffusers import configuration_utils
    from diffusers.pipelines import pipeline_utils
    from diffusers.utils import hub_utils
    from huggingface_hub.errors import EntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
    snapshot, fetched = cache / "snapshot", []

    def fetch(name):
        if name not in fetched:
            blob = cache / "blobs" / str(len(fetched))
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, blob)
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).symlink_to(os.path.relpath(blob, (snapshot / name).parent))
            fetched.append(name)
        return str(snapshot / name)

    def hf_hub_download(repo_id, filename, subfolder=None, **kw):
        name = f"{subfolder}/{filename}" if subfolder else filename
        if name not in files:
            raise EntryNotFoundError(f"{name}: not in the repository")
        return fetch(name)

    def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **kw):
        for name in filter_repo_objects(
            files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns
        ):
            fetch(name)
        return str(snapshot)

    info = SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in files], sha="0" * 40)
    fakes = dict(
        model_info=lambda *a, **k: info, hf_hub_download=hf_hub_download, snapshot_download=snapshot_download
    )
    for module in (pipeline_utils, hub_utils, configuration_utils):
        for name, fake in fakes.items():
            if hasattr(module, name):
                monkeypatch.setattr(module, name, fake)
    return fetched


def test_pipeline_and_model_from_the_hub(pipelines, tmp_path, monkeypatch):
    """From the Hub diffusers' pipeline downloader fetches only config.json and the files named as diffusers or
    transformers name weights from a model folder, and a model's download only its index and the shards it
    lists: both must find everything the compressed components need."""
    root = pipelines["flux"]
    want = _run(_load(root / "bf16"), "flux", "pt")
    fetched = _serve_as_hub(monkeypatch, root / "dfloat", tmp_path / "pipe")
    pipe = _load("someone/flux-dfloat")
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert getattr(pipe, name)._dfloat_units, name
        assert f"{name}/diffusion_pytorch_model-00001-of-00001.safetensors" in fetched
    assert torch.equal(_run(pipe, "flux", "pt"), want)

    fetched = _serve_as_hub(monkeypatch, root / "dfloat", tmp_path / "model")
    model = diffusers.FluxTransformer2DModel.from_pretrained(
        "someone/flux-dfloat", subfolder="transformer", dtype=torch.bfloat16
    )
    assert model._dfloat_units and "transformer/dfloat.safetensors.index.json" not in fetched


def test_float32_component_is_copied_and_float32_model_refused(tmp_path):
    pipe = build_tiny_pipeline("flux")
    pipe.vae.to(torch.float32)
    pipe.save_pretrained(tmp_path / "mixed")
    report = dfloat.compress_model(tmp_path / "mixed", tmp_path / "out")
    assert report.components["vae"].startswith("copied: F32 weights")
    assert report.components["transformer"].startswith("compressed")
    src = tmp_path / "mixed" / "vae" / "diffusion_pytorch_model.safetensors"
    assert (tmp_path / "out" / "vae" / src.name).read_bytes() == src.read_bytes()
    with pytest.raises(UnsupportedDtypeError, match="F32"):
        dfloat.compress_model(tmp_path / "mixed" / "vae", tmp_path / "vae-out")
    assert not (tmp_path / "vae-out").exists()
    with pytest.raises(OutputExistsError):
        dfloat.compress_model(tmp_path / "mixed", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ModelSourceError, match="no component"):
        dfloat.compress_model(tmp_path / "empty", tmp_path / "nothing")
    assert not list(tmp_path.glob(".nothing*")) and not list(tmp_path.glob(".out*"))


def test_memory_plan_of_a_pipeline_equals_the_loaded_one(pipelines):
    from dfloat.runtime.pipeline import plan_pipeline

    root = pipelines["flux"]
    plan = plan_pipeline(root / "dfloat")
    assert set(plan.plans) == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    assert set(plan.copied) == {"scheduler", "tokenizer", "tokenizer_2"} and not any(plan.copied.values())
    pipe = _load(root / "dfloat")
    for name, expected in plan.plans.items():
        loaded = getattr(pipe, name)._dfloat_plan.as_dict()
        expected = expected.as_dict()
        assert list(loaded.pop("decode_buffers").values()) == list(expected.pop("decode_buffers").values())
        assert loaded == expected, name
    assert plan.offload_peak_bytes == max(p.total_bytes for p in plan.plans.values())


@pytest.mark.gpu
def test_on_cuda_and_with_model_cpu_offload(pipelines):
    root = pipelines["flux"]
    want = _run(_load(root / "bf16").to("cuda"), "flux", "pt")
    assert torch.equal(_run(_load(root / "dfloat").to("cuda"), "flux", "pt"), want)
    assert torch.equal(_run(_load(root / "dfloat", device_map="cuda"), "flux", "pt"), want)
    pipe = _load(root / "dfloat")
    pipe.enable_model_cpu_offload()
    assert torch.equal(_run(pipe, "flux", "pt"), want)
    assert torch.equal(_run(pipe, "flux", "pt"), want)  # the components went back to the CPU and came again
    assert pipe.transformer._dfloat_buffers.keys() == {torch.device("cpu")}


def test_readme_diffusion_figures_come_from_the_benchmark_json():
    from pathlib import Path

    root = Path(__file__).parents[2]
    doc = json.loads((root / "benchmarks" / "results" / "diffusion_cpu.json").read_text())
    readme = (root / "README.md").read_text()
    for r in doc["rows"]:  # every figure of the row, from the weight count on
        if r["part"] == "stored_size":
            cell = (
                f"| {r['weights'] / 1e6:.1f}M | {r['pct_of_bf16']:.2f}% | {r['bits_per_weight']:.3f} | "
                f"{r['bound_bits_per_weight']:.3f} |"
            )
        else:
            assert r["equal_outputs"]
            cell = (
                f"| {r['model']} | {r['weights'] / 1e6:.1f}M | {r['decodes_per_step']} | "
                f"{r['bf16_ms_per_step']} ({r['best_bf16_ms']}) | {r['dfloat_ms_per_step']} ({r['best_dfloat_ms']})"
                f" | {r['decode_ms_per_step']} ({r['best_decode_ms']}) | "
                f"{r['bf16_weight_MiB']} -> {r['dfloat_weight_MiB']} |"
            )
        assert cell in readme, cell
