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
    want, got = (
        load_file(official / "bf16" / "model.safetensors"),
        load_file(tmp_path / "back" / "model.safetensors"),
    )
    assert want.keys() == got.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k].view(torch.int16), v.view(torch.int16)), k
    assert "quantization_config" not in (tmp_path / "back" / "config.json").read_text()

    r = run("decompress", tmp_path / "dfloat", "-o", tmp_path / "back")
    assert r.exit_code == 1 and "already exists" in r.output


def test_decompress_options_are_checked(tmp_path):
    r = run("decompress", tmp_path, "-o", tmp_path / "x", "--compress")
    assert r.exit_code == 1 and "--compress only applies with --adapter" in r.output
    r = run("decompress", tmp_path / "missing", "-o", tmp_path / "x")
    assert r.exit_code == 1 and "error" in r.output


@pytest.fixture
def fake_hub(monkeypatch):
    """huggingface_hub with its HTTP client answered in-process: records what `--push-to-hub` sends."""
    import base64
    import json

    import huggingface_hub

    httpx2 = pytest.importorskip("httpx2", reason="huggingface_hub's HTTP client (huggingface_hub >= 2)")
    from huggingface_hub.utils._http import default_client_factory

    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    sent = {"auth": set(), "files": {}}

    def handler(request):
        path = request.url.path
        if path.startswith(("/api/repos/", "/api/models/", "/api/validate-yaml")):
            sent["auth"].add(request.headers.get("authorization"))
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": "https://huggingface.co/someone/tiny-dfloat"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if path.endswith("/preupload/main"):
            files = json.loads(request.content)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return httpx2.Response(200, json={"files": modes})
        if path.endswith("/commit/main"):
            for line in request.content.decode().splitlines():
                op = json.loads(line)
                if op["key"] == "file":
                    sent["files"][op["value"]["path"]] = base64.b64decode(op["value"]["content"])
            oid = "b" * 40
            return httpx2.Response(
                200,
                json={
                    "commitUrl": f"https://huggingface.co/someone/tiny-dfloat/commit/{oid}",
                    "commitOid": oid,
                },
            )
        return httpx2.Response(404, json={"error": "not part of the fake"})

    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handler)))
    yield sent
    huggingface_hub.set_client_factory(default_client_factory)


def test_push_to_hub_uploads_the_folder_with_the_users_token(official, tmp_path, fake_hub):
    r = run("compress", official / "bf16", "-o", tmp_path / "out", "--push-to-hub", "someone/tiny-dfloat")
    assert r.exit_code == 0, r.output
    assert "pushed" in r.output
    local = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert fake_hub["files"] == local
    assert fake_hub["auth"] == {"Bearer hf_fake_token"}


def test_decompress_is_listed():
    r = run("--help")
    assert r.exit_code == 0 and "decompress" in r.output
