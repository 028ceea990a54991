"""The container: save/load, versioning, and clear errors (never a crash or out-of-bounds access) on bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dfloat
from dfloat.errors import ChecksumError, CorruptStreamError, FormatVersionError, ShapeMismatchError
from dfloat.format import CompressedTensor
from dfloat.integrity import check_members, check_structure
from dfloat.testing import bits, weights_like


@pytest.fixture
def unit():
    return dfloat.compress_tensors(
        {"w1": weights_like(30_000, 1).view(100, 300), "w2": weights_like(7_001, 2)},
        bytes_per_window=8,
        windows_per_block=16,
    )


def test_save_load_roundtrip(tmp_path, unit):
    raw = dfloat.store_raw(torch.arange(10, dtype=torch.int64), name="steps")
    path = tmp_path / "u.safetensors"
    dfloat.save_compressed_tensors({"blk": unit, "steps": raw}, path, extra_tensors={"norm": torch.ones(4)})
    units, extra = dfloat.load_compressed_tensors(path)
    assert set(units) == {"blk", "steps"} and torch.equal(extra["norm"], torch.ones(4))
    back = units["blk"]
    assert back.metadata() == unit.metadata() and back.nbytes == unit.nbytes
    assert torch.equal(bits(dfloat.decompress_tensor(back)), bits(dfloat.decompress_tensor(unit)))
    assert torch.equal(dfloat.decompress_tensor(units["steps"]), torch.arange(10))
    assert not list(tmp_path.glob("*.tmp"))


def test_wrong_dtype_is_refused_with_the_reason():
    with pytest.raises(dfloat.UnsupportedDtypeError, match="float32.*not lossless"):
        dfloat.compress_tensor(torch.randn(100))
    with pytest.raises(dfloat.UnsupportedDtypeError, match="'b'"):
        dfloat.compress_tensors({"a": weights_like(10), "b": torch.zeros(3, dtype=torch.float16)})


def _rewrite(path, mutate_tensors=None, mutate_meta=None):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    if mutate_tensors:
        mutate_tensors(tensors)
    if mutate_meta:
        mutate_meta(meta)
    save_file(tensors, str(path), metadata=meta)


def test_newer_major_version_is_refused(tmp_path, unit):
    path = tmp_path / "u.safetensors"
    dfloat.save_compressed_tensors(unit, path)
    _rewrite(path, mutate_meta=lambda m: m.update(format_version="2.0"))
    with pytest.raises(FormatVersionError, match="format 2.0.*upgrade dfloat"):
        dfloat.load_compressed_tensors(path)
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(FormatVersionError, match="not a dfloat file"):
        dfloat.load_compressed_tensors(path)


def test_truncated_stream_is_refused(tmp_path, unit):
    path = tmp_path / "u.safetensors"
    dfloat.save_compressed_tensors(unit, path)
    _rewrite(path, lambda t: t.update({"tensor.encoded_exponent": t["tensor.encoded_exponent"][:-600]}))
    with pytest.raises(ChecksumError, match="array 'encoded_exponent' checksum"):
        dfloat.load_compressed_tensors(path)
    with pytest.raises(CorruptStreamError, match="truncated or mismatched"):
        dfloat.load_compressed_tensors(path, verify=False)


def test_truncated_file_is_refused(tmp_path, unit):
    path = tmp_path / "u.safetensors"
    dfloat.save_compressed_tensors(unit, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptStreamError, match="u.safetensors"):
        dfloat.load_compressed_tensors(path)


def test_member_shape_mismatch_is_refused(tmp_path, unit):
    path = tmp_path / "u.safetensors"
    dfloat.save_compressed_tensors(unit, path)

    def grow(meta):
        units = json.loads(meta["units"])
        units["tensor"]["members"][0]["shape"] = [100, 301]
        meta["units"] = json.dumps(units)

    _rewrite(path, mutate_meta=grow)
    with pytest.raises(ChecksumError, match="unit list .* checksum"):
        dfloat.load_compressed_tensors(path)
    with pytest.raises(ShapeMismatchError, match="'w2' has offset 30000, expected 30100"):
        dfloat.load_compressed_tensors(path, verify=False)


def test_bit_flips_are_caught_by_the_checksum_and_never_crash(unit):
    ref = dfloat.decompress_tensor(unit)
    n_caught = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        enc = unit.encoded_exponent.clone()
        idx = torch.randint(0, enc.numel(), (3,), generator=g)
        enc[idx] ^= torch.randint(1, 256, (3,), generator=g, dtype=torch.int32).to(torch.uint8)
        bad = CompressedTensor(**{**unit.__dict__, "encoded_exponent": enc, "_cache": {}})
        buf = torch.zeros(unit.numel + 64, dtype=torch.bfloat16)
        try:
            out = dfloat.decompress_tensor(bad, out=buf)
            with pytest.raises(ChecksumError, match="w1|w2"):
                check_members(bad, out)
            n_caught += 1
        except CorruptStreamError:
            n_caught += 1
        assert (buf[unit.numel :] == 0).all()  # nothing written past the unit
    assert n_caught == 20
    assert torch.equal(bits(ref), bits(dfloat.decompress_tensor(unit)))


def test_corrupt_positions_are_reported_not_followed(unit):
    pos = unit.output_positions.clone()
    pos[3] = 10**9
    bad = CompressedTensor(**{**unit.__dict__, "output_positions": pos, "_cache": {}})
    with pytest.raises(CorruptStreamError, match="output positions are not"):
        dfloat.decompress_tensor(bad)
    from dfloat.kernels import cpu

    with pytest.raises(CorruptStreamError, match="block 2"):  # the decoder itself refuses them too
        cpu.decode(bad, torch.empty(unit.numel, dtype=torch.bfloat16))

    with pytest.raises(CorruptStreamError, match="output positions"):
        check_structure(bad)


def test_out_buffer_checked(unit):
    with pytest.raises(ShapeMismatchError, match="out must be"):
        dfloat.decompress_tensor(unit, out=torch.empty(10, dtype=torch.bfloat16))


def test_crc32_of_large_tensors_equals_zlib_crc32():
    import zlib

    import numpy as np

    from dfloat.integrity import crc32_combine, crc32_of

    rng = np.random.default_rng(0)
    for n1, n2 in [(1, 1), (7, 1000), (4096, 3)]:
        a, b = rng.integers(0, 256, n1, dtype=np.uint8), rng.integers(0, 256, n2, dtype=np.uint8)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), n2) == zlib.crc32(np.concatenate([a, b]))
    t = weights_like(5_000_001)  # above the two-thread threshold
    assert crc32_of(t) == zlib.crc32(t.view(torch.uint8).numpy())
