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
"""

from __future__ import annotations

import torch

from dfloat.codec import decompress_tensor
from dfloat.errors import DFloatError, ShapeMismatchError
from dfloat.format import CompressedTensor

_UNITS: dict[str, tuple[CompressedTensor, tuple[int, ...]]] = {}


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
    return anchor(ct)


def unregister_unit(name: str) -> None:
    _UNITS.pop(name, None)


def registered(name: str) -> CompressedTensor:
    try:
        return _UNITS[name][0]
    except KeyError:
        raise DFloatError(
            f"unit {name!r} is not registered in this process (dfloat.runtime.decode_op.register_unit)"
        ) from None


@torch.library.custom_op("dfloat::decode", mutates_args=())
def decode(codes: torch.Tensor, name: str) -> torch.Tensor:
    """Decode the unit registered as ``name`` into a new BF16 tensor (``codes``: its `anchor`)."""
    ct = registered(name)
    shape = _UNITS[name][1]
    out = torch.empty(shape, dtype=ct.dtype, device=codes.device)
    decompress_tensor(ct, out=out)
    return out


@decode.register_fake
def _decode_fake(codes: torch.Tensor, name: str) -> torch.Tensor:
    ct = registered(name)
    return codes.new_empty(_UNITS[name][1], dtype=ct.dtype)
