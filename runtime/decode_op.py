"""``torch.ops.dfloat.decode``: a unit's decode as a registered torch custom op.

torch.compile cannot trace into the decoders (numba loops, CuPy and Triton launches with host-side plans). As a
custom op with a fake implementation (the output's shape and dtype only) the decode is one opaque node of the
compiled graph, and on a GPU its kernels are recorded into CUDA graphs like any other op. vLLM's compiled mode
and CUDA graphs rely on this (`dfloat.runtime.vllm`); any other torch.compile user can too.

A unit is registered once under a name; the op takes that name and one of the unit's stored arrays (its
sign/mantissa bytes, or the raw tensor), so the graph depends on the coded data and no compiler pass can treat
the decode as a constant and fold it. The op is functional: it returns a fresh BF16 tensor, which the caching
allocator (eager) or Inductor's memory planning (compiled) reuses as soon as the product that needed the weight
is done, so only the weights in use at one time are ever decoded. Outputs are the original bits: the decode is
the ordinary `dfloat.decompress_tensor`.

``torch.ops.dfloat.row_chunked_linear`` multiplies by a matrix held as several such units (row chunks of an LM
head), each decoded right before its product. Whether row-chunked products give the whole matrix's bits depends
on the device's GEMM and the number of input rows; the op checks each input size at its first call, as
`dfloat.runtime.chunked` does, which only eager code can do, hence an op of its own rather than a traced loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfloat.codec import decompress_tensor
from dfloat.errors import DFloatError, ShapeMismatchError
from dfloat.format import CompressedTensor

_UNITS: dict[str, tuple[CompressedTensor, tuple[int, ...]]] = {}
_VERDICTS: dict[tuple, dict] = {}  # chunk names -> {input size key: whether the chunks gave the whole's bits}


def anchor(ct: CompressedTensor) -> torch.Tensor:
    """The stored array the op takes as its input: the sign/mantissa bytes of a coded unit, a raw unit's data."""
    return ct.sign_mantissa if ct.is_coded else ct.raw


def register_unit(name: str, ct: CompressedTensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Make ``ct`` decodable as ``torch.ops.dfloat.decode(anchor, name)``, with output ``shape`` (default: the
    unit's own shape); returns the anchor to pass. Registering a name again replaces the unit."""
    shape = tuple(ct.shape if shape is None else shape)
    numel = 1
    for n in shape:
        numel *= n
    if numel != ct.numel:
        raise ShapeMismatchError(f"unit {name!r}: shape {list(shape)} does not hold its {ct.numel} elements")
    _UNITS[name] = (ct, shape)
    _forget_verdicts(name)
    return anchor(ct)


def unregister_unit(name: str) -> None:
    _UNITS.pop(name, None)
    _forget_verdicts(name)


def _entry(name: str) -> tuple[CompressedTensor, tuple[int, ...]]:
    try:
        return _UNITS[name]
    except KeyError:
        raise DFloatError(
            f"unit {name!r} is not registered in this process (dfloat.runtime.decode_op.register_unit)"
        ) from None


def registered(name: str) -> CompressedTensor:
    return _entry(name)[0]


def unit_shape(name: str) -> tuple[int, ...]:
    """The output shape the unit registered as ``name`` decodes to."""
    return _entry(name)[1]


def chunk_names(name: str, n: int) -> list[str]:
    """The names a matrix registered as ``name`` in ``n`` row chunks gives its chunks."""
    return [f"{name}#{i}" for i in range(n)]


def _forget_verdicts(name: str) -> None:
    for names in [k for k in _VERDICTS if name in k]:
        del _VERDICTS[names]


@torch.library.custom_op("dfloat::decode", mutates_args=())
def decode(codes: torch.Tensor, name: str) -> torch.Tensor:
    """Decode the unit registered as ``name`` into a new BF16 tensor (``codes``: its `anchor`)."""
    ct, shape = _entry(name)
    out = torch.empty(shape, dtype=ct.dtype, device=codes.device)
    decompress_tensor(ct, out=out)
    return out


@decode.register_fake
def _decode_fake(codes: torch.Tensor, name: str) -> torch.Tensor:
    ct, shape = _entry(name)
    return codes.new_empty(shape, dtype=ct.dtype)


@torch.library.custom_op("dfloat::row_chunked_linear", mutates_args=())
def row_chunked_linear(
    x: torch.Tensor, codes: list[torch.Tensor], name: str, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``W`` the row chunks registered as ``name#0``, ``name#1``, ... (``codes``:
    their anchors), stacked in order: with the whole matrix's bits (`dfloat.runtime.chunked.checked_linear`)."""
    from dfloat.runtime.chunked import checked_linear

    names = chunk_names(name, len(codes))
    rows = [unit_shape(n)[0] for n in names]
    starts = [sum(rows[:i]) for i in range(len(rows))]

    def chunked(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.cat(
            [
                F.linear(x, decode(c, n), None if bias is None else bias[r0 : r0 + r])
                for c, n, r0, r in zip(codes, names, starts, rows)
            ],
            dim=-1,
        )

    def whole() -> torch.Tensor:
        return torch.cat([decode(c, n) for c, n in zip(codes, names)])

    return checked_linear(x, bias, _VERDICTS.setdefault(tuple(names), {}), name, whole, chunked)


@row_chunked_linear.register_fake
def _row_chunked_linear_fake(
    x: torch.Tensor, codes: list[torch.Tensor], name: str, bias: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], sum(unit_shape(n)[0] for n in chunk_names(name, len(codes))))
