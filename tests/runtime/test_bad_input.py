"""Bad input gets a clear error and leaves nothing half-written; what was on disk is never lost."""

import json

import pytest
import torch

import dfloat
from dfloat.errors import (
    ChecksumError,
    ModelSourceError,
    OutputExistsError,
    ShapeMismatchError,
    UnsupportedDtypeError,
)
from dfloat.testing import save_random_model


def make(folder, dtype=torch.bfloat16):
    return save_random_model(folder, dtype=dtype)


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_missing_path_and_non_model_folder(tmp_path):
    with pytest.raises(ModelSourceError, match="no such folder"):
        dfloat.compress_model(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="no config.json"):
        dfloat.compress_model(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ModelSourceError, match="not a compressed model"):
        dfloat.load_compressed(make(tmp_path / "plain"))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_unreachable_hub_id_names_offline_options(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE"):
        dfloat.compress_model("no-such-owner/no-such-model", tmp_path / "out")


def test_non_bf16_source_is_refused_with_the_reason(tmp_path):
    with pytest.raises(UnsupportedDtypeError, match="F32.*not BF16.*round away bits"):
        dfloat.compress_model(make(tmp_path / "fp32", torch.float32), tmp_path / "out")
    with pytest.raises(UnsupportedDtypeError, match="F16"):
        dfloat.compress_model(make(tmp_path / "fp16", torch.float16), tmp_path / "out")
    cfg = json.loads((tmp_path / "fp16" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq"}
    (tmp_path / "fp16" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedDtypeError, match="gptq-quantized"):
        dfloat.compress_model(tmp_path / "fp16", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_then_replaced_only_on_request(tmp_path):
    src = make(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="overwrite"):
        dfloat.compress_model(src, out)
    assert (out / "keep.txt").read_text() == "mine"
    dfloat.compress_model(src, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert leftovers(tmp_path) == []


def test_interrupted_compression_leaves_nothing(tmp_path):
    src = make(tmp_path / "src")

    def interrupt(unit, done, total, weights):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dfloat.compress_model(src, tmp_path / "out", progress=interrupt)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    dfloat.compress_model(src, tmp_path / "out")  # a rerun works


def test_corrupt_shard_is_named(tmp_path):
    dfloat.compress_model(make(tmp_path / "src"), tmp_path / "out")
    shard = next((tmp_path / "out").glob("dfloat-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0xFF  # inside the last unit's arrays
    shard.write_bytes(bytes(data))
    with pytest.raises(
        ChecksumError, match=r"dfloat-00001-of-00001.safetensors.*(fails its checksum|corrupt)"
    ):
        dfloat.verify_checkpoint(tmp_path / "out")


def test_missing_shard_and_mismatched_config(tmp_path):
    dfloat.compress_model(make(tmp_path / "src"), tmp_path / "out")
    cfg_path = tmp_path / "out" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = 80
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(
        ShapeMismatchError,
        match=r"is \[32, 64\] in the checkpoint but \[32, 80\] in the model built from config.json",
    ):
        dfloat.load_compressed(tmp_path / "out", device="cpu")
    next((tmp_path / "out").glob("dfloat-*.safetensors")).unlink()
    with pytest.raises(ModelSourceError, match="missing shard"):
        dfloat.load_compressed(tmp_path / "out", device="cpu")
