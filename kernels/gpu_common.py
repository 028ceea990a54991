"""What the CUDA and Triton launchers share: argument checks before a launch, and reading the status word."""

from __future__ import annotations

import os

import torch

from dfloat.errors import CorruptStreamError

INT32_MAX = 2**31 - 1


def launch_arrays(ct, out: torch.Tensor):
    """The unit's stream arrays, flat and contiguous on ``out``'s device; None when there is nothing to decode."""
    device = out.device
    if out.dtype != torch.bfloat16 or not out.is_contiguous() or out.numel() < ct.numel:
        raise ValueError(f"out must be a contiguous bfloat16 tensor of >= {ct.numel} elements, "
                         f"got {out.dtype}[{out.numel()}]")
    if ct.numel == 0 or ct.n_blocks == 0:
        return None
    arrays = [ct.encoded_exponent, ct.sign_mantissa, ct.gaps, ct.output_positions]
    if any(t.device != device for t in arrays):
        raise ValueError(f"the unit's arrays must be on {device} (use ct.to(device))")
    return tuple(t.reshape(-1).contiguous() for t in arrays)


def wants_check(check: bool) -> bool:
    return check or os.environ.get("DFLOAT_CHECK") == "1"


def new_status(device: torch.device) -> torch.Tensor:
    """[flags, first bad block] for a checked launch."""
    return torch.tensor([0, INT32_MAX], dtype=torch.int32, device=device)


def raise_if_flagged(ct, status: torch.Tensor, explain, backend: str) -> None:
    flags, block = status.tolist()
    if flags:
        raise CorruptStreamError(
            f"unit {ct.members[0].name if ct.members else '?'}: block {block} of {ct.n_blocks} is corrupt: "
            f"{explain(flags)} ({backend} decoder)")
