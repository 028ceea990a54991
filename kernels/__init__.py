"""Decoders for coded units: CPU (numba), Triton, CUDA (CuPy/NVRTC), behind one dispatch point (`registry`).

Importing this package loads no backend; each is imported when first used.
"""

from dfloat.kernels.registry import Backend, available_backends, decode_into

__all__ = ["Backend", "available_backends", "decode_into"]
