"""What the CUDA and Triton launchers share: argument checks before a launch, reading the status word, whether a
decode is checked (never inside CUDA-graph capture), and telling a bug in a kernel's source from an NVRTC that
cannot run here."""

from __future__ import annotations

import logging
import os
import re

import torch

from dfloat.errors import BackendUnavailableError, CorruptStreamError, DFloatError

INT32_MAX = 2**31 - 1
CHECK_ENV = "DFLOAT_CHECK"
log = logging.getLogger(__name__)
_CAPTURE_NOTED: list[bool] = []
# A compiler diagnostic located in the source: "kern.cu(123): error: ..." (NVRTC and nvcc's front end). A
# "catastrophic error" (a missing header, out of memory) or a message from NVRTC itself ("nvrtc: error: invalid
# value for --gpu-architecture") is not one.
_SOURCE_ERROR = re.compile(r"\(\d+\): error\b")


def launch_arrays(ct, out: torch.Tensor):
    """The unit's stream arrays, flat and contiguous on ``out``'s device; None when there is nothing to decode."""
    device = out.device
    if out.dtype != torch.bfloat16 or not out.is_contiguous() or out.numel() < ct.numel:
        raise ValueError(
            f"out must be a contiguous bfloat16 tensor of >= {ct.numel} elements, "
            f"got {out.dtype}[{out.numel()}]"
        )
    if ct.numel == 0 or ct.n_blocks == 0:
        return None
    arrays = [ct.encoded_exponent, ct.sign_mantissa, ct.gaps, ct.output_positions]
    if any(t.device != device for t in arrays):
        raise ValueError(f"the unit's arrays must be on {device} (use ct.to(device))")
    return tuple(t.reshape(-1).contiguous() for t in arrays)


def capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def wants_check(check: bool) -> bool:
    """Whether this decode is checked: ``check=True``, or ``DFLOAT_CHECK=1`` in the environment.

    A checked decode copies a status word to the device and reads it back on the host, which a CUDA graph cannot
    capture. Under capture, DFLOAT_CHECK is skipped (logged once; the runtime's graph path does not capture when
    it is set) and an explicit ``check=True`` is an error.
    """
    if not check and os.environ.get(CHECK_ENV) != "1":
        return False
    if capturing():
        if check:
            raise DFloatError(
                "check=True waits for the decode on the host, which CUDA-graph capture cannot "
                "record: check outside the capture"
            )
        if not _CAPTURE_NOTED:
            _CAPTURE_NOTED.append(True)
            log.warning(
                "%s=1: decodes captured in a CUDA graph are not checked (a graph cannot read the status "
                "word back on the host)",
                CHECK_ENV,
            )
        return False
    return True


def new_status(device: torch.device) -> torch.Tensor:
    """[flags, first bad block] for a checked launch."""
    return torch.tensor([0, INT32_MAX], dtype=torch.int32, device=device)


def raise_if_flagged(ct, status: torch.Tensor, explain, backend: str) -> None:
    flags, block = status.tolist()
    if flags:
        raise CorruptStreamError(
            f"unit {ct.members[0].name if ct.members else '?'}: block {block} of {ct.n_blocks} is corrupt: "
            f"{explain(flags)} ({backend} decoder)"
        )


def is_source_error(e: BaseException) -> bool:
    """A CuPy ``CompileException`` whose log points at a line of the source: a bug in the kernel, not the setup."""
    return type(e).__name__ == "CompileException" and bool(_SOURCE_ERROR.search(str(e)))


def build_failure(e: Exception, what: str, remedy: str) -> Exception:
    """What to raise when CuPy could not build ``what``.

    A compiler error in the source is a bug: the ``CompileException`` itself, log and all. Anything else is the
    environment (no NVRTC, an NVRTC too old for this GPU, no CUDA toolkit, a cache folder it cannot write; NVRTC
    reports some of these as a ``CompileException`` too): a `BackendUnavailableError`, so that ``backend='auto'``
    moves on to the next decoder and a named backend fails with one line saying what to do.
    """
    if is_source_error(e):
        return e
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    first = lines[0][:200] if lines else "no message"
    return BackendUnavailableError(f"CuPy could not build {what} ({type(e).__name__}: {first}); {remedy}")
