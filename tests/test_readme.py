"""The README's Python examples run as written."""

import re
from pathlib import Path

README = (Path(__file__).parents[1] / "README.md").read_text()


def python_block(after_heading: str | None = None) -> str:
    text = README if after_heading is None else README.split(f"\n## {after_heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_readme_minilm_recipe_makes_the_model_of_the_transcript(tmp_path, monkeypatch):
    """The three lines that make ./minilm-bf16, then the transcript's compress and verify figures."""
    from safetensors import safe_open

    import dfloat
    from dfloat.runtime.checkpoint import CompressedCheckpoint

    monkeypatch.chdir(tmp_path)
    exec(compile(python_block("The command"), "README.md (The command)", "exec"), {})
    with safe_open("minilm-bf16/model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    report = dfloat.compress_model("minilm-bf16", "minilm-dfloat")
    assert f"weights   {report.weights:,} in {report.units} units ({report.coded_units} coded)" in README
    dfloat.verify_checkpoint("minilm-dfloat", against="minilm-bf16")
    index = CompressedCheckpoint.open("minilm-dfloat").weight_map
    assert f"OK minilm-dfloat: {len(index)} units and tensors decoded" in README


def test_readme_python_example_runs(tmp_path, monkeypatch):
    block = python_block("Python")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "tiny-back" / "model.safetensors").is_file()


def test_readme_transformers_and_lora_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for heading in ("Use with transformers", "Fine-tune with LoRA"):
        exec(compile(python_block(heading), f"README.md ({heading})", "exec"), {})
    assert (tmp_path / "tiny-lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "tiny-merged" / "dfloat.safetensors.index.json").is_file()


def test_readme_diffusion_example_runs(tmp_path, monkeypatch):
    import pytest

    pytest.importorskip("diffusers")
    monkeypatch.chdir(tmp_path)
    exec(compile(python_block("Diffusion models (diffusers)"), "README.md (Diffusion models)", "exec"), {})
    assert (tmp_path / "flux-dfloat" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
