"""The README's Python examples run as written."""

import re
from pathlib import Path

README = (Path(__file__).parents[1] / "README.md").read_text()


def python_block(after_heading: str | None = None) -> str:
    text = README if after_heading is None else README.split(f"\n## {after_heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    block = python_block()
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "tiny-back" / "model.safetensors").is_file()


def test_readme_transformers_and_lora_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for heading in ("Use with transformers", "Fine-tune with LoRA"):
        exec(compile(python_block(heading), f"README.md ({heading})", "exec"), {})
    assert (tmp_path / "tiny-lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "tiny-merged" / "dfloat.index.json").is_file()


def test_readme_diffusion_example_runs(tmp_path, monkeypatch):
    import pytest

    pytest.importorskip("diffusers")
    monkeypatch.chdir(tmp_path)
    exec(compile(python_block("Diffusion models (diffusers)"), "README.md (Diffusion models)", "exec"), {})
    assert (tmp_path / "flux-dfloat" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
