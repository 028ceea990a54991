"""`dfloat decompress` and `dfloat compress` of an official DFloat11 checkpoint."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dfloat.cli.main import main
from dfloat.runtime.official import write_official
from dfloat.testing import save_random_model

LLAMA_PATTERN = {
    r"model\.layers\.\d+": [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ],
    "lm_head": [],
}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    root = tmp_path_factory.mktemp("df11")
    save_random_model(root / "bf16", trained_scale=True, seed=7)
    write_official(root / "bf16", root / "df11", LLAMA_PATTERN)
    return root


def test_official_checkpoint_converts_loads_and_decompresses_byte_identical(official, tmp_path):
    from transformers import AutoModelForCausalLM

    r = run("compress", official / "df11", "-o", tmp_path / "dfloat")
    assert r.exit_code == 0, r.output
    assert "verified  yes" in r.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dfloat")
    ref = AutoModelForCausalLM.from_pretrained(official / "bf16", dtype=torch.bfloat16)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)

    r = run("decompress", tmp_path / "dfloat", "-o", tmp_path / "back")
    assert r.exit_code == 0, r.output
    want, got = load_file(official / "bf16" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert want.keys() == got.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k].view(torch.int16), v.view(torch.int16)), k
    assert "quantization_config" not in (tmp_path / "back" / "config.json").read_text()

    r = run("decompress", tmp_path / "dfloat", "-o", tmp_path / "back")
    assert r.exit_code == 1 and "already exists" in r.output


def test_decompress_options_are_checked(tmp_path):
    r = run("decompress", tmp_path, "-o", tmp_path / "x", "--compress")
    assert r.exit_code == 2 and "--compress only applies with --adapter" in r.output
    r = run("decompress", tmp_path / "missing", "-o", tmp_path / "x")
    assert r.exit_code == 1 and "error" in r.output
