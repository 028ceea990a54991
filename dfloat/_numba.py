"""numba, imported only by the modules with compiled loops (it is slow to import, so never at `import dfloat`)."""

from __future__ import annotations

try:
    from numba import get_num_threads, njit, prange
except ImportError as e:  # pragma: no cover - numba is a declared dependency
    from dfloat.errors import BackendUnavailableError

    raise BackendUnavailableError(f"dfloat's CPU codec needs numba: pip install numba ({e})") from None

__all__ = ["get_num_threads", "njit", "prange"]
