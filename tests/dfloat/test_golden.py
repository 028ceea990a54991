"""Format drift fails here: the encoder must reproduce the stored golden unit byte for byte."""

import importlib.util
from pathlib import Path

import torch

import dfloat
from dfloat.testing import bits

DATA = Path(__file__).parents[1] / "data"


def _maker():
    spec = importlib.util.spec_from_file_location("make_golden", DATA / "make_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_encoder_reproduces_the_golden_unit_byte_for_byte():
    maker = _maker()
    units, extra = dfloat.load_compressed_tensors(maker.GOLDEN)
    golden = units["golden"]
    inputs = maker.golden_input()
    for name, t in inputs.items():
        assert torch.equal(bits(extra[f"input.{name}"]), bits(t))
    again = dfloat.compress_tensors(inputs, **maker.OPTIONS)
    sums = ("array_crc32", "meta_crc32")  # format 1.1 adds checksums; the golden file is a 1.0 file
    assert golden.array_crc32 is None
    assert {k: v for k, v in again.metadata().items() if k not in sums} == golden.metadata()
    for key, stored in golden.stored_tensors().items():
        assert torch.equal(again.stored_tensors()[key], stored), key


def test_every_cpu_backend_decodes_the_golden_unit():
    maker = _maker()
    units, extra = dfloat.load_compressed_tensors(maker.GOLDEN)
    views = units["golden"].split(dfloat.decompress_tensor(units["golden"], backend="cpu"))
    for name, v in views.items():
        assert torch.equal(bits(v), bits(extra[f"input.{name}"]))
