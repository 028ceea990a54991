"""Decode before use: one reusable BF16 buffer per device, and the forward hooks that decode a coded unit into it
right before the module that uses its weights runs.

Each coded unit keeps only its compressed arrays; its weights are fixed views of the buffer, set once at attach time
(so a CUDA graph records stable addresses), and forward pre-hooks on the modules that own them decode the unit (or,
split decode, the part a child module uses) when the buffer does not hold it already.

Autograd: when a module's forward may save weights for a backward pass (grad mode on and one of its parameters,
e.g. a LoRA adapter, or one of its inputs requires grad; train or eval mode alike), its pre-hook decodes the unit
(or split-decode part) into a tensor of its own instead, which autograd may keep while later units reuse the
buffer; its forward hook points the weights back at the buffer views, so only autograd holds the copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dfloat.codec import decompress_tensor
from dfloat.format import CompressedTensor


@dataclass
class Slot:
    """Where one member lives in the model: every (module, attribute) that shares the tensor (tied weights)."""

    places: list[tuple[torch.nn.Module, str]]
    offset: int
    shape: tuple[int, ...]


@dataclass
class UnitPart:
    """Split decode: the members of a block unit that one child module (attention, MLP) uses, decoded right
    before that module runs: runs of blocks ``(b0, b1, base)`` (`dfloat.runtime.memory.part_layout`), each
    decoded to buffer element ``base``; ``starts[i]`` is where ``slots[i]``'s weight starts in the buffer."""

    key: str
    runs: list[tuple[int, int, int]]
    need: int  # buffer elements
    slots: list[Slot]
    starts: list[int]
    module: torch.nn.Module  # the child module whose pre-hook decodes the part
    subs: list[CompressedTensor] | None = None  # the runs as sub-units, for non-CPU decoders (made once)
    private_by: torch.nn.Module | None = None  # autograd: the module running on a private decode of the part


@dataclass
class AttachedUnit:
    """A coded unit attached to a model: its compressed arrays, where its members live, and its parts."""

    name: str
    ct: CompressedTensor  # on the execution device, or pinned on the host with cpu_offload
    device: torch.device
    slots: list[Slot]
    parts: list[UnitPart] | None = None  # split decode (None: the unit is decoded whole)
    private_by: torch.nn.Module | None = None  # autograd: the module running on a private decode of the unit


@dataclass
class DecodeBuffer:
    """One BF16 buffer per device, sized to the largest unit on it; remembers which unit it holds."""

    device: torch.device
    numel: int
    backend: str | None = None
    tensor: torch.Tensor | None = None
    current: str | None = None
    decodes: int = 0

    def scratch(self) -> torch.Tensor:
        """The whole buffer, for a partial decode (runtime/chunked.py): it then holds no unit."""
        if self.tensor is None:
            self.tensor = torch.empty(self.numel, dtype=torch.bfloat16, device=self.device)
        self.current = None
        return self.tensor

    def bind(self, unit: AttachedUnit, part: UnitPart | None = None) -> None:
        """Point the unit's (or only ``part``'s) weights at fixed views of the buffer: at attach time, and after
        a forward that ran on a private decode. The views are the same every time, so a forward captured in a
        CUDA graph records stable addresses, and the hook only has to decode."""
        if self.tensor is None:
            self.tensor = torch.empty(self.numel, dtype=torch.bfloat16, device=self.device)
        if part is not None:
            placed = list(zip(part.starts, part.slots))
        elif unit.parts:
            placed = [z for p in unit.parts for z in zip(p.starts, p.slots)]
        else:
            placed = [(slot.offset, slot) for slot in unit.slots]
        _point_weights(self.tensor, placed)

    def ensure_part(self, unit: AttachedUnit, part: UnitPart) -> None:
        if self.current == part.key:
            return
        _decode_part(unit, part, self.tensor, self.backend)
        self.current = part.key
        self.decodes += 1

    def ensure(self, unit: AttachedUnit) -> None:
        if self.current == unit.name:
            return
        ct = unit.ct
        if ct.device != self.device:  # cpu_offload: copy the compressed arrays in, then decode
            ct = ct.to(self.device, non_blocking=True)
        decompress_tensor(ct, device=self.device, backend=self.backend, out=self.tensor)
        self.current = unit.name
        self.decodes += 1


def _decode_part(unit: AttachedUnit, part: UnitPart, out: torch.Tensor, backend: str | None) -> None:
    """Decode the blocks of ``part`` into their places in ``out`` (flat BF16 on the execution device)."""
    from dfloat.blocks import block_range, decompress_blocks

    ct = unit.ct
    for i, (b0, b1, base) in enumerate(part.runs):
        if ct.device == out.device and out.device.type == "cpu" and backend in (None, "auto", "cpu"):
            decompress_blocks(ct, b0, b1, out[base:], backend)
            continue
        from dfloat.kernels import registry

        sub = part.subs[i] if part.subs is not None else block_range(ct, b0, b1)
        if sub.device != out.device:  # cpu_offload: bring only these blocks over
            sub = sub.to(out.device, non_blocking=True)
        registry.decode_into(sub, out[base : base + sub.numel], backend)


def make_hooks(
    entries: list[tuple[AttachedUnit, UnitPart | None]], buffers: dict[torch.device, DecodeBuffer]
):
    """The pre-hook and forward hook of one module. ``entries``: (unit, part or None for the whole unit).

    Pre-hook: when the forward may save weights for a backward pass (`_saves_weights`), the unit or part is
    decoded into a private tensor, unless an enclosing module already did that (a private decode is right for
    any use); else into the shared buffer (once: the buffer remembers what it holds). Forward hook: the module
    that made a private decode points the weights back at the buffer views (even if the forward raised)."""
    unique = list({(u.name, None if p is None else p.key): (u, p) for u, p in entries}.values())

    def pre(module, args, kwargs):
        saving = None
        for unit, part in unique:
            holder = unit if part is None else part
            if holder.private_by is not None:  # an enclosing module runs on a private decode
                continue
            buf = buffers[unit.device]
            if saving is None:
                saving = _saves_weights(module, args, kwargs)
            if saving:
                _decode_for_autograd(unit, buf, part)
                holder.private_by = module
                continue
            if part is None:
                buf.ensure(unit)
            else:
                buf.ensure_part(unit, part)
            # The decoders write without telling autograd: mark the buffer changed, so a weight view saved for a
            # backward pass that `_saves_weights` did not foresee makes autograd raise instead of silently using
            # the next unit's weights.
            if torch.is_grad_enabled() and not buf.tensor.is_inference():
                torch.autograd.graph.increment_version(buf.tensor)

    def post(module, args, output):
        for unit, part in unique:
            holder = unit if part is None else part
            if holder.private_by is module:
                buffers[unit.device].bind(unit, part)
                holder.private_by = None

    return pre, post


def _saves_weights(module: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether autograd may keep ``module``'s weights for a backward pass: grad mode is on and a parameter of the
    module (a LoRA adapter, say) or an input tensor requires grad. Weights used by an op none of whose operands
    requires grad are not saved."""
    if not torch.is_grad_enabled():
        return False
    if any(p.requires_grad for p in module.parameters()):
        return True
    return _requires_grad(args) or _requires_grad(kwargs)


def _requires_grad(x) -> bool:
    """A tensor that requires grad in ``x`` (a tensor, or tensors in tuples, lists and dicts)."""
    if isinstance(x, torch.Tensor):
        return x.requires_grad
    if isinstance(x, (tuple, list)):
        return any(_requires_grad(v) for v in x)
    if isinstance(x, dict):
        return any(_requires_grad(v) for v in x.values())
    return False


def _decode_for_autograd(unit: AttachedUnit, buf: DecodeBuffer, part: UnitPart | None = None) -> None:
    """Decode into a tensor of its own, which autograd may keep for the backward pass while later units reuse the
    shared buffer (split units: only the part), and point the weights at it."""
    if part is None:
        flat = decode_copy(unit.ct, buf.device, buf.backend)
        starts, slots = [s.offset for s in unit.slots], unit.slots
    else:
        flat = torch.empty(part.need, dtype=torch.bfloat16, device=buf.device)
        _decode_part(unit, part, flat, buf.backend)
        starts, slots = part.starts, part.slots
    _point_weights(flat, zip(starts, slots))


def decode_copy(ct: CompressedTensor, device: torch.device, backend: str | None) -> torch.Tensor:
    """``ct`` decoded flat into a tensor of its own, which autograd may keep (no later decode overwrites it)."""
    if ct.device != device:  # cpu_offload: an asynchronous copy of the compressed arrays
        ct = ct.to(device, non_blocking=True)
    return decompress_tensor(ct, device=device, backend=backend).reshape(-1)


def _point_weights(flat: torch.Tensor, placed) -> None:
    """Make each slot's weights views of ``flat``: ``placed`` is (start element, slot) pairs."""
    for start, slot in placed:
        view = flat[start : start + math.prod(slot.shape)].view(slot.shape)
        for module, attr in slot.places:
            module._parameters[attr] = torch.nn.Parameter(view, requires_grad=False)
