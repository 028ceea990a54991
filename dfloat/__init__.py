"""dfloat: lossless BF16 weight compression (Huffman-coded exponents) with bit-identical decoding.

Only torch, numpy and safetensors are imported here; numba, Triton, CuPy and transformers load when first used.
"""

from __future__ import annotations

from dfloat.codec import compress_tensor, compress_tensors, decompress_tensor, store_raw
from dfloat.errors import (
    BackendUnavailableError,
    ChecksumError,
    CorruptStreamError,
    DFloatError,
    FormatVersionError,
    GenerationError,
    ModelSourceError,
    OutputExistsError,
    OutputWriteError,
    ShapeMismatchError,
    UnsupportedDtypeError,
)
from dfloat.format import FORMAT_VERSION, CompressedTensor, Member
from dfloat.storage import load_compressed_tensors, save_compressed_tensors

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "BackendUnavailableError",
    "ChecksumError",
    "CompressedTensor",
    "CorruptStreamError",
    "DFloatError",
    "FormatVersionError",
    "GenerationError",
    "Member",
    "ModelSourceError",
    "OutputExistsError",
    "OutputWriteError",
    "ShapeMismatchError",
    "UnsupportedDtypeError",
    "compress_tensor",
    "compress_tensors",
    "decompress_tensor",
    "load_compressed_tensors",
    "save_compressed_tensors",
    "store_raw",
]

_RUNTIME = {
    "compress_model": "dfloat.runtime.compress",
    "decompress_model": "dfloat.runtime.compress",
    "verify_checkpoint": "dfloat.runtime.compress",
    "load_compressed": "dfloat.runtime.loader",
    "generate": "dfloat.runtime.generate",
    "export_merged": "dfloat.runtime.peft_export",
}
__all__ += list(_RUNTIME)


def __getattr__(name: str):
    """Whole-model functions load on first use, keeping `import dfloat` light."""
    if name in _RUNTIME:
        import importlib

        return getattr(importlib.import_module(_RUNTIME[name]), name)
    raise AttributeError(f"module 'dfloat' has no attribute {name!r}")
