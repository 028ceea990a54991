"""The one place that chooses a decoder: by name, or the fastest one that can run on the output's device."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from enum import Enum

import torch

from dfloat.errors import BackendUnavailableError


class Backend(str, Enum):
    AUTO = "auto"
    CPU = "cpu"
    TRITON = "triton"
    CUDA = "cuda"


log = logging.getLogger(__name__)
_FAILED: set[tuple[Backend, str]] = set()
_CHOSEN: dict[tuple, tuple] = {}  # (backend argument, device, TRITON_INTERPRET) -> (backend, its decode function)

_MODULES = {Backend.CPU: "dfloat.kernels.cpu", Backend.TRITON: "dfloat.kernels.triton_decode",
            Backend.CUDA: "dfloat.kernels.cuda_decode"}


@functools.cache
def _installed(package: str) -> bool:
    """Looked up once: this runs on every decode."""
    return importlib.util.find_spec(package) is not None


def _triton_can_run(device: torch.device) -> bool:
    if not _installed("triton"):
        return False
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return device.type in ("cuda", "xpu")


def _cuda_can_run(device: torch.device) -> bool:
    return device.type == "cuda" and torch.version.hip is None and _installed("cupy")


def _why_not(backend: Backend, device: torch.device) -> str:
    if backend is Backend.CPU:
        return f"the cpu backend decodes into CPU tensors only, not {device}"
    if backend is Backend.TRITON:
        if not _installed("triton"):
            return "triton is not installed: pip install 'dfloat[triton]'"
        if device.type == "cpu":
            return "triton runs on CPU tensors only under TRITON_INTERPRET=1 (slow; for tests)"
        return f"triton cannot decode on {device}"
    if device.type != "cuda":
        return f"the cuda backend needs a CUDA device, got {device}"
    return "CuPy is not installed: pip install 'dfloat[cuda13]' (CUDA 13) or 'dfloat[cuda12]' (CUDA 12)"


def available_backends(device: torch.device | str) -> list[Backend]:
    """Backends that can decode on ``device``, fastest first."""
    device = torch.device(device)
    if device.type == "cpu":
        order = [(Backend.CPU, True), (Backend.TRITON, _triton_can_run(device))]
    else:
        order = [(Backend.CUDA, _cuda_can_run(device)), (Backend.TRITON, _triton_can_run(device))]
    return [b for b, ok in order if ok]


def resolve(backend: str | Backend | None, device: torch.device | str) -> Backend:
    device = torch.device(device)
    try:
        backend = Backend(backend or Backend.AUTO)
    except ValueError:
        raise BackendUnavailableError(f"unknown backend {backend!r}; choose one of cpu, triton, cuda") from None
    usable = available_backends(device)
    if backend is Backend.AUTO:
        if not usable:
            raise BackendUnavailableError(
                f"no decoder can run on {device}: pip install 'dfloat[cuda13]' (or [cuda12]) for CUDA, "
                "or 'dfloat[triton]'")
        return usable[0]
    if backend not in usable:
        raise BackendUnavailableError(f"backend {backend.value!r} is unavailable: {_why_not(backend, device)}")
    return backend


def decode_into(ct, out: torch.Tensor, backend: str | Backend | None = None, check: bool = False) -> None:
    """Decode coded unit ``ct`` into ``out`` (flat BF16, ``ct.numel`` elements, on ct's device).

    ``check`` makes GPU backends wait for the kernel and raise on a corrupt stream (the CPU always checks)."""
    key = (backend, out.device, os.environ.get("TRITON_INTERPRET"))
    chosen = _CHOSEN.get(key)  # the decoder this choice resolved to before: no lookups per call
    if chosen is not None:
        try:
            chosen[1](ct, out, check=check)
            return
        except BackendUnavailableError as e:
            if backend not in (None, Backend.AUTO, "auto"):
                raise
            log.warning("backend %s cannot run on %s, using the next one: %s", chosen[0].value, out.device, e)
            _FAILED.add((chosen[0], out.device.type))
            _CHOSEN.pop(key, None)
    if backend not in (None, Backend.AUTO, "auto"):
        named = resolve(backend, out.device)
        decode = importlib.import_module(_MODULES[named]).decode
        decode(ct, out, check=check)
        _CHOSEN[key] = (named, decode)
        return
    # Automatic choice: a backend that turns out unable to run here (e.g. CuPy finds no CUDA toolkit to compile
    # with) is skipped from then on, and the next fastest one decodes.
    usable = [b for b in available_backends(out.device) if (b, out.device.type) not in _FAILED]
    if not usable:
        resolve(None, out.device)  # nothing installed: raises with what to install
    for chosen in usable:
        decode = importlib.import_module(_MODULES[chosen]).decode
        try:
            decode(ct, out, check=check)
        except BackendUnavailableError as e:
            log.warning("backend %s cannot run on %s, using the next one: %s", chosen.value, out.device, e)
            _FAILED.add((chosen, out.device.type))
            continue
        _CHOSEN[key] = (chosen, decode)
        return
    raise BackendUnavailableError(f"no decoder could run on {out.device}; see the warnings above")
