"""``load_compressed(..., matmul="fused")``: linear layers that multiply straight from their coded weights.

Each coded unit whose members are all ``nn.Linear`` weights (a transformer block's projections) is re-laid out at
load time in the GEMV layout (kernels/gemv_layout.py), one matrix per layer, and every such ``nn.Linear`` becomes
a `FusedLinear`: inputs of at most 16 rows go through the fused decode-GEMV kernel (W is never written), longer
inputs (prefill) decode W into one shared buffer per device and call cuBLAS. Units with other members stay on the
default decode-before-use path. Everything launches on torch's current stream from fixed buffers, so a forward
can be captured in a CUDA graph.

Exactness: the weights are lossless, and a fused product equals its twin (the same kernel on the BF16 weights) bit
for bit, but not cuBLAS: this path is opt-in; the default path stays bit-identical to the BF16 model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from dfloat.errors import BackendUnavailableError, DFloatError, UnsupportedDtypeError
from dfloat.format import CompressedTensor
from dfloat.kernels import gemv_layout
from dfloat.kernels.gemv_layout import GemvMatrix

log = logging.getLogger(__name__)

MATMUL_MODES = ("decode", "fused")


class PrefillBuffer:
    """One BF16 buffer per device for decoding a whole matrix when an input has more than 16 rows."""

    def __init__(self, device: torch.device):
        self.device = device
        self.numel = 0
        self.tensor: torch.Tensor | None = None

    def view(self, n: int, k: int) -> torch.Tensor:
        if self.tensor is None:
            self.tensor = torch.empty(self.numel, dtype=torch.bfloat16, device=self.device)
        return self.tensor[: n * k].view(n, k)


class FusedLinear(torch.nn.Module):
    """An ``nn.Linear`` whose weight is a GEMV-layout coded matrix: fused kernel for <= 16 rows, else decode+cuBLAS."""

    def __init__(self, gm: GemvMatrix, bias: torch.Tensor | None, prefill: PrefillBuffer, name: str = ""):
        super().__init__()
        self.gm = gm
        self.out_features, self.in_features = gm.shape
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.prefill = prefill
        self.name = name

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.gm!r}"

    def decoded_weight(self) -> torch.Tensor:
        """W as BF16 in the shared prefill buffer (valid until the next layer's prefill)."""
        n, k = self.gm.shape
        if self.gm.device.type == "cuda":
            from dfloat.kernels import cuda_gemv

            return cuda_gemv.decode_matrix(self.gm, out=self.prefill.view(n, k))
        return self.prefill.view(n, k).copy_(gemv_layout.decode(self.gm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            raise UnsupportedDtypeError(f"{self.name}: the fused matmul takes BF16 inputs, got {x.dtype}")
        lead = x.shape[:-1]
        rows = math.prod(lead)
        from dfloat.kernels import cuda_gemv

        if rows > cuda_gemv.MAX_FUSED_ROWS or self.gm.device.type != "cuda":
            return F.linear(x, self.decoded_weight(), self.bias)
        y = cuda_gemv.gemv(self.gm, x.reshape(rows, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)


def _linear_of(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str, torch.nn.Linear] | None:
    """(parent, attribute, module) when ``name`` is the weight of an nn.Linear."""
    if not name.endswith(".weight"):
        return None
    path = name[: -len(".weight")]
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    if not isinstance(module, torch.nn.Linear):
        return None
    parent_path, _, attr = path.rpartition(".")
    return model.get_submodule(parent_path) if parent_path else model, attr, module


def install(
    model: torch.nn.Module, units: Mapping[str, CompressedTensor], device: torch.device
) -> dict[str, CompressedTensor]:
    """Replace the ``nn.Linear`` layers of fusable units by `FusedLinear`; returns the units left to decode.

    A unit is fusable when it is coded and every member is the (untied) weight of an ``nn.Linear``. A bias stays
    a parameter of the same name (an empty placeholder here), so the loader fills it from the checkpoint.
    """
    from dfloat.codec import decompress_tensor
    from dfloat.runtime.attach import aliases_of

    aliases = aliases_of(model)
    rest: dict[str, CompressedTensor] = {}
    prefill = PrefillBuffer(device)
    fused = 0
    for uname, ct in units.items():
        targets = [_linear_of(model, m.name) for m in ct.members] if ct.is_coded else [None]
        if any(t is None for t in targets) or any(len(aliases.get(m.name, [m.name])) > 1 for m in ct.members):
            rest[uname] = ct
            continue
        flat = decompress_tensor(ct, device="cpu").reshape(-1)
        for m, (parent, attr, linear) in zip(ct.members, targets):
            w = flat[m.offset : m.offset + m.numel].view(m.shape)
            gm = gemv_layout.encode(w, name=m.name).to(device)
            bias = (
                None if linear.bias is None else torch.empty(m.shape[0], dtype=torch.bfloat16, device=device)
            )
            setattr(parent, attr, FusedLinear(gm, bias, prefill, name=m.name))
            prefill.numel = max(prefill.numel, m.numel)
            fused += 1
        log.info("unit %s: %d linear layers fused", uname, len(ct.members))
    log.info("fused matmul: %d linear layers, %d units left on the decode path", fused, len(rest))
    model._dfloat_prefill = prefill
    return rest


def check_mode(matmul: str, device: torch.device) -> None:
    """Refuse an unknown mode, and the fused mode off a CUDA device."""
    if matmul not in MATMUL_MODES:
        raise DFloatError(f"matmul must be one of {MATMUL_MODES}, got {matmul!r}")
    if matmul == "fused" and device.type != "cuda":
        raise BackendUnavailableError(
            f"matmul='fused' runs a CUDA kernel: load on a CUDA device (got {device}), or use matmul='decode'"
        )
