"""Integrity by default (format 1.1): damaged files and units never decode to wrong weights."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dfloat
from dfloat.errors import ChecksumError, CorruptStreamError, ShapeMismatchError
from dfloat.format import is_trusted
from dfloat.testing import bits, weights_like


@pytest.fixture(scope="module")
def units():
    return {
        "a": dfloat.compress_tensors(
            {"w1": weights_like((60, 100), seed=1), "w2": weights_like((60, 100), seed=2)}, allow_raw=False
        ),
        "b": dfloat.compress_tensor(weights_like(9000, seed=3), allow_raw=False, name="w3"),
    }


def _save(path, units):
    dfloat.save_compressed_tensors(units, path, extra_tensors={"norm": torch.ones(16, dtype=torch.bfloat16)})
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    return load_file(str(path)), meta


def _edit_units(path, tensors, meta, edit):
    units = json.loads(meta["units"])
    edit(units)
    save_file(tensors, str(path), metadata={**meta, "units": json.dumps(units, separators=(",", ":"))})


def test_saved_units_carry_checksums_and_load_checked(tmp_path, units):
    path = tmp_path / "u.safetensors"
    _, meta = _save(path, units)
    assert meta["format_version"] == "1.1" and "units_crc32" in meta
    loaded, plain = dfloat.load_compressed_tensors(path)
    assert all(is_trusted(ct) for ct in loaded.values())
    for name, ct in loaded.items():
        assert torch.equal(bits(dfloat.decompress_tensor(ct)), bits(dfloat.decompress_tensor(units[name])))
    assert torch.equal(plain["norm"], torch.ones(16, dtype=torch.bfloat16))


@pytest.mark.parametrize(
    "array", ["encoded_exponent", "sign_mantissa", "gaps", "output_positions", "code_lengths"]
)
def test_a_flipped_byte_in_any_array_names_file_unit_and_array(tmp_path, units, array):
    path = tmp_path / "u.safetensors"
    tensors, meta = _save(path, units)
    t = tensors[f"b.{array}"].view(torch.uint8)
    t[len(t) // 2] ^= 0x01
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ChecksumError, match=rf"u.safetensors: unit 'b': array '{array}' checksum"):
        dfloat.load_compressed_tensors(path)
    if array in ("encoded_exponent", "sign_mantissa", "gaps"):  # (positions, code: the structure check)
        loaded, _ = dfloat.load_compressed_tensors(path, verify=False)  # the opt-out loads it (and trusts it)
        assert is_trusted(loaded["b"])


def test_a_damaged_plain_tensor_is_caught(tmp_path, units):
    path = tmp_path / "u.safetensors"
    tensors, meta = _save(path, units)
    tensors["norm"][3] = 2.0
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ChecksumError, match="tensor 'norm' checksum"):
        dfloat.load_compressed_tensors(path)


def test_swapped_member_names_and_a_dropped_unit_are_caught(tmp_path, units):
    path = tmp_path / "u.safetensors"
    tensors, meta = _save(path, units)

    def swap(u):
        m = u["a"]["members"]
        m[0]["name"], m[1]["name"] = m[1]["name"], m[0]["name"]

    _edit_units(path, tensors, meta, swap)
    with pytest.raises(ChecksumError, match="unit list"):
        dfloat.load_compressed_tensors(path)
    _edit_units(path, tensors, meta, lambda u: u.pop("b"))
    with pytest.raises(ChecksumError, match="unit list"):
        dfloat.load_compressed_tensors(path)
    # even with the header's own checksum patched to match, the unit's metadata checksum catches the swap
    units_json = json.loads(meta["units"])
    swap(units_json)
    text = json.dumps(units_json, separators=(",", ":"))
    import zlib

    save_file(
        tensors, str(path), metadata={**meta, "units": text, "units_crc32": str(zlib.crc32(text.encode()))}
    )
    with pytest.raises(ChecksumError, match="unit 'a': metadata .* checksum"):
        dfloat.load_compressed_tensors(path)


def test_in_memory_units_are_checked_on_their_first_decode(units):
    ct = units["b"]
    enc = ct.encoded_exponent.clone()
    enc[100] ^= 0x40
    with pytest.raises(ChecksumError, match="unit 'w3': array 'encoded_exponent'"):
        dfloat.decompress_tensor(replace(ct, encoded_exponent=enc))
    ms = units["a"].members
    swapped = replace(units["a"], members=(replace(ms[0], name=ms[1].name), replace(ms[1], name=ms[0].name)))
    with pytest.raises(ChecksumError, match="metadata"):
        dfloat.decompress_tensor(swapped)
    moved = ct.to("cpu")  # a faithful copy keeps the verdict: no second check on the hot path
    assert is_trusted(ct) and is_trusted(moved) and not is_trusted(replace(ct))


def test_wrong_numel_never_writes_outside_out(units):
    ct = units["b"]
    bad = replace(
        ct, numel=ct.numel - 500, array_crc32=None
    )  # no checksums: the structure check must catch it
    buf = torch.full((ct.numel + 64,), 7.0, dtype=torch.bfloat16)
    with pytest.raises((CorruptStreamError, ShapeMismatchError)):
        dfloat.decompress_tensor(bad, out=buf[: ct.numel - 500])
    assert (buf[ct.numel - 500 :] == 7.0).all()
    from dfloat.kernels import cpu

    out = buf[: ct.numel - 500]  # the decoder itself, handed the bad unit directly, stays inside out
    with pytest.raises(CorruptStreamError):
        cpu.decode(bad, out)
    assert (buf[ct.numel - 500 :] == 7.0).all()


def test_format_1_0_units_are_checked_against_member_crcs_on_first_decode(units):
    ct = replace(units["b"], array_crc32=None, meta_crc32=-1)  # what a 1.0 file gives
    sm = ct.sign_mantissa.clone()
    sm[5] ^= 0x01
    with pytest.raises(ChecksumError, match="member 'w3'"):
        dfloat.decompress_tensor(replace(ct, sign_mantissa=sm))
    assert torch.equal(bits(dfloat.decompress_tensor(ct)), bits(dfloat.decompress_tensor(units["b"])))
    assert is_trusted(ct)


def test_damaged_model_folder_fails_to_load_unless_verify_is_off(tmp_path):
    from dfloat.testing import save_random_model

    src = save_random_model(tmp_path / "src")
    out = tmp_path / "c"
    dfloat.compress_model(src, out)
    shard = next(out.glob("dfloat-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-50] ^= 0x08
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=shard.name):
        dfloat.load_compressed(out, device="cpu")
    dfloat.load_compressed(out, device="cpu", verify=False)  # opted out: loads
    index = json.loads((out / "dfloat.safetensors.index.json").read_text())
    index["weight_map"].pop(next(iter(index["weight_map"])))
    (out / "dfloat.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptStreamError, match="other tensors than dfloat.safetensors.index.json lists"):
        dfloat.load_compressed(out, device="cpu", verify=False)
