"""`dfloat compress / inspect / verify / decompress` on a diffusers pipeline, and on official DFloat11
diffusion checkpoints; bad input is one error line and exit 1."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from dfloat.cli.main import main

pytest.importorskip("diffusers")
from dfloat.testing_diffusers import save_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-diffusion")
    save_tiny_pipeline("unet", root / "bf16")
    r = CliRunner().invoke(main, ["compress", str(root / "bf16"), "-o", str(root / "dfloat")])
    assert r.exit_code == 0, r.output
    return root, r.output


def test_compress_prints_each_component(pipeline):
    _, output = pipeline
    lines = output.splitlines()
    assert any(line.split()[:2] == ["unet", "compressed:"] for line in lines), output
    assert any(line.split()[:2] == ["tokenizer", "copied:"] for line in lines), output
    assert "verified  yes" in output


def test_progress_bars_keep_their_totals_across_components(pipeline):
    """The coding bar counts every unit of the pipeline; the checking bar each component's units and tensors:
    no bar runs past its total (tqdm then drops the total: "verify: 27unit [...")."""
    import re

    _, output = pipeline
    assert not re.search(r"(compress|verify): +\d+unit \[", output), output[-3000:]
    counts = re.findall(r"(compress|verify): +\d+%\|[^|]*\| *(\d+)/(\d+)", output)
    assert {bar for bar, _, _ in counts} == {"compress", "verify"}
    assert len({total for bar, _, total in counts if bar == "compress"}) == 1  # one count over all components
    assert len({total for bar, _, total in counts if bar == "verify"}) > 1  # one per component
    assert all(int(n) <= int(total) for _, n, total in counts)


def test_inspect_shows_components_and_the_pipeline_plan(pipeline):
    root, _ = pipeline
    r = CliRunner().invoke(main, ["inspect", str(root / "dfloat")])
    assert r.exit_code == 0, r.output
    assert "== unet" in r.output and "== vae" in r.output and "== text_encoder" in r.output
    assert "down_blocks.1.attentions.0.transformer_blocks.0" in r.output
    assert "pipeline weight memory" in r.output and "model CPU offload" in r.output
    r = CliRunner().invoke(main, ["inspect", str(root / "dfloat"), "--json"])
    data = json.loads(r.output)
    assert set(data["components"]) == {"unet", "vae", "text_encoder"}
    plan = data["memory_plan"]
    assert plan["offload_peak_bytes"] <= plan["total_bytes"]
    assert plan["total_bytes"] == sum(c["total_bytes"] for c in plan["components"].values()) + sum(
        plan["copied_bytes"].values()
    )
    r = CliRunner().invoke(main, ["inspect", str(root / "dfloat" / "unet")])  # one component
    assert r.exit_code == 0 and "memory plan" in r.output


def test_verify_and_decompress_round_trip(pipeline, tmp_path):
    root, _ = pipeline
    r = CliRunner().invoke(main, ["verify", str(root / "dfloat"), "--against", str(root / "bf16")])
    assert r.exit_code == 0 and r.output.startswith("OK"), r.output
    r = CliRunner().invoke(main, ["decompress", str(root / "dfloat"), "-o", str(tmp_path / "back")])
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    for name in ("unet", "vae"):
        a = load_file(str(root / "bf16" / name / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(tmp_path / "back" / name / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(
            torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)) for k in a
        )
        config = json.loads((tmp_path / "back" / name / "config.json").read_text())
        assert "_dfloat" not in config and "quantization_config" not in config
    a = load_file(str(root / "bf16" / "text_encoder" / "model.safetensors"))
    b = load_file(str(tmp_path / "back" / "text_encoder" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_component_is_named(pipeline, tmp_path):
    import shutil

    root, _ = pipeline
    shutil.copytree(root / "dfloat", tmp_path / "bad")
    shard = next((tmp_path / "bad" / "unet").glob("diffusion_pytorch_model-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "bad")])
    assert r.exit_code == 1 and "unet" in r.output


def test_bad_diffusion_sources_are_one_line(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2, 2, dtype=torch.bfloat16)}, str(tmp_path / "plain.safetensors"))
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "plain.safetensors"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "is a file" in r.output and "Traceback" not in r.output
    (tmp_path / "df11").mkdir()
    (tmp_path / "df11" / "config.json").write_text(
        json.dumps({"dfloat11_config": {"pattern_dict": {r"transformer_blocks\.\d+": ["attn.to_q"]}}})
    )
    save_file(
        {"transformer_blocks.0.attn.to_q.bias": torch.zeros(2)}, str(tmp_path / "df11" / "a.safetensors")
    )
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "df11"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "--config-from" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_compressing_a_compressed_pipeline_or_model_says_so(pipeline, tmp_path):
    """Not "the index is damaged": a compressed component's index names units, which are no tensors."""
    root, _ = pipeline
    for source in (root / "dfloat", root / "dfloat" / "unet"):
        r = CliRunner().invoke(main, ["compress", str(source), "-o", str(tmp_path / "again")])
        assert r.exit_code == 1 and "damaged" not in r.output, r.output
        assert "already compressed" in r.output or "no component has BF16 weights" in r.output, r.output
    from dfloat.runtime.pipeline import plan_component

    for name, library in (("unet", "diffusers"), ("vae", "diffusers"), ("text_encoder", "transformers")):
        assert plan_component(name, root / "dfloat" / name, library, "block") == "copied: already compressed"
