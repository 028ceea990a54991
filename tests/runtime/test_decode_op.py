"""torch.ops.dfloat.decode: the decode as a torch custom op, eager and under torch.compile."""

import pytest
import torch
import torch.nn.functional as F

import dfloat
from dfloat.errors import DFloatError, ShapeMismatchError
from dfloat.runtime.decode_op import chunk_names, register_unit, unregister_unit
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


@pytest.fixture
def chunks():
    """A 300 x 64 matrix registered as three row chunks (an LM head's units), and a bias."""
    w = weights_like(300 * 64, seed=7).view(300, 64)
    names = chunk_names("test/head", 3)
    anchors = [
        register_unit(n, dfloat.compress_tensor(w[r : r + 100].contiguous()))
        for n, r in zip(names, (0, 100, 200))
    ]
    yield w, anchors, "test/head", weights_like(300, seed=8)
    for n in names:
        unregister_unit(n)


@pytest.mark.parametrize("m", [1, 5, 40])
def test_row_chunked_linear_has_the_whole_matrix_bits(chunks, m):
    w, anchors, name, bias = chunks
    x = weights_like(m * 64, seed=m, std=1.0).view(m, 64)
    for b in (None, bias):
        for _ in range(2):  # the first call of a size checks, the next runs what it chose
            got = torch.ops.dfloat.row_chunked_linear(x, anchors, name, b)
            assert torch.equal(bits(got), bits(F.linear(x, w, b)))

    @torch.compile(fullgraph=True)
    def head(x, anchors):
        return torch.ops.dfloat.row_chunked_linear(x, anchors, name, bias)

    assert torch.equal(bits(head(x, anchors)), bits(F.linear(x, w, bias)))


def test_row_chunked_linear_opcheck(chunks):
    _, anchors, name, bias = chunks
    x = weights_like(3 * 64, seed=2, std=1.0).view(3, 64)
    torch.library.opcheck(torch.ops.dfloat.row_chunked_linear.default, (x, anchors, name, bias))


def test_row_chunked_linear_decodes_whole_where_chunks_differ(chunks, monkeypatch, caplog):
    """An Intel AVX-512 CPU emulated (issue 19): products with a chunk give other bits from 33 input rows on.
    The first call with 40 rows finds it, logs it once, and that size takes the whole matrix from then on; 5
    rows keep the chunks. Every result has the whole matrix's bits."""
    from types import SimpleNamespace

    from dfloat.runtime import decode_op

    w, anchors, name, _ = chunks
    real, chunk_rows = F.linear, []

    def intel_like(x, weight, bias=None):
        y = real(x, weight, bias)
        if weight.shape[0] < w.shape[0]:
            chunk_rows.append(x.shape[0])
            if x.shape[0] >= 33:
                y = torch.nextafter(y, torch.full_like(y, float("inf")))
        return y

    monkeypatch.setattr(decode_op, "F", SimpleNamespace(linear=intel_like))
    with caplog.at_level("WARNING", logger="dfloat.runtime.chunked"):
        for m in (40, 5, 40, 5):
            x = weights_like(m * 64, seed=m, std=1.0).view(m, 64)
            got = torch.ops.dfloat.row_chunked_linear(x, anchors, name, None)
            assert torch.equal(bits(got), bits(real(x, w))), m
    assert caplog.text.count("not bit-identical") == 1 and "for 40 input rows" in caplog.text
    assert chunk_rows == [40] * 3 + [5] * 3 * 3  # the 40-row check, then 5 rows: check (own, random), run
