"""torch.ops.dfloat.decode: the decode as a torch custom op, eager and under torch.compile."""

import pytest
import torch
import torch.nn.functional as F

import dfloat
from dfloat.errors import DFloatError, ShapeMismatchError
from dfloat.runtime.decode_op import register_unit, unregister_unit
from dfloat.testing import bits, weights_like


@pytest.fixture
def unit():
    w = weights_like(96 * 64, seed=3).view(96, 64)
    ct = dfloat.compress_tensor(w)
    assert ct.is_coded
    anchor = register_unit("test/w", ct)
    yield w, anchor
    unregister_unit("test/w")


def test_decode_op_gives_the_original_bits(unit):
    w, anchor = unit
    got = torch.ops.dfloat.decode(anchor, "test/w")
    assert got.shape == w.shape and torch.equal(bits(got), bits(w))


def test_raw_units_and_other_shapes():
    w = weights_like(100, seed=1)  # too small to code: a raw unit
    ct = dfloat.compress_tensor(w)
    assert not ct.is_coded
    anchor = register_unit("test/raw", ct, (10, 10))
    try:
        assert torch.equal(bits(torch.ops.dfloat.decode(anchor, "test/raw")), bits(w))
    finally:
        unregister_unit("test/raw")
    with pytest.raises(ShapeMismatchError, match="does not hold"):
        register_unit("test/raw", ct, (10, 11))


def test_unregistered_name_is_a_clear_error(unit):
    _, anchor = unit
    with pytest.raises(DFloatError, match="'test/none' is not registered"):
        torch.ops.dfloat.decode(anchor, "test/none")


def test_opcheck(unit):
    """Schema, fake (meta) implementation and AOT dispatch agree with the real op."""
    _, anchor = unit
    torch.library.opcheck(torch.ops.dfloat.decode.default, (anchor, "test/w"))


def test_compiled_linear_is_exact_and_decodes_every_call(unit):
    """One graph with the decode inside (fullgraph: no break), outputs equal to F.linear on the BF16 weights, and
    the decode runs on every call rather than being folded into a constant at compile time."""
    w, anchor = unit
    x = weights_like(5 * 64, seed=4, std=1.0).view(5, 64)

    @torch.compile(fullgraph=True)
    def layer(x, codes):
        return F.linear(x, torch.ops.dfloat.decode(codes, "test/w"))

    assert torch.equal(layer(x, anchor), F.linear(x, w))
    w2 = weights_like(96 * 64, seed=5).view(96, 64)
    ct2 = dfloat.compress_tensor(w2)
    register_unit("test/w", ct2)  # another unit under the same name
    assert torch.equal(layer(x, anchor), F.linear(x, w2))
