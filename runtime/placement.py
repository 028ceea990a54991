"""Moving a compressed model between devices: ``model.to("cuda")``, ``.cpu()``, and what calls them
(accelerate's ``cpu_offload_with_hook`` behind diffusers' ``enable_model_cpu_offload``, ``pipe.to(device)``).

A coded weight is a view of its device's decode buffer (runtime/decode_hooks.py). Left to ``nn.Module._apply``,
``.to`` would copy every such view into a tensor of its own (the whole BF16 model on the new device) and the
decode hooks would go on writing into the old buffer, so the copies would keep whatever the buffer held: wrong
weights. So `install` wraps the model's ``_apply``: the coded weights are taken out of their modules while the
model's own ``_apply`` moves the plain tensors, then the compressed units move (their stored bytes, ~70% of
BF16), each device gets a fresh decode buffer, and the weights are put back as views of it. A model loaded
with ``cpu_offload`` keeps its units in host memory. A dtype change is refused: coded weights decode to BF16
only.
"""

from __future__ import annotations

import logging
import types

import torch

from dfloat.errors import DFloatError, ModelSourceError

log = logging.getLogger(__name__)


def install(model: torch.nn.Module, units: list) -> None:
    """Make ``model.to`` / ``.cuda`` / ``.cpu`` move the compressed units (``units``: the `AttachedUnit` list of `dfloat.runtime.attach`)."""
    for unit in units:  # units kept on the host while their decode buffer is on a GPU (cpu_offload)
        unit.host = unit.ct.device.type == "cpu" and unit.device.type != "cpu"
    for cu in _chunked(model):
        cu.host = cu.ct.device.type == "cpu" and cu.buffer.device.type != "cpu"
    model._dfloat_unit_list = units
    first = next(_places(model), None)
    if first is not None and not getattr(model, "_dfloat_guarded", False):
        model.register_forward_pre_hook(_offload_guard(first[0]))
        model._dfloat_guarded = True
    if getattr(model, "_dfloat_moves", False):
        return
    inner = model._apply

    def _apply(self, fn, recurse=True):
        from dfloat.codec import canonical_device

        probe = fn(torch.empty(0, dtype=torch.bfloat16))
        if probe.dtype != torch.bfloat16:
            raise DFloatError(
                f"a dfloat model's coded weights decode to BF16 only; it cannot be cast to {probe.dtype}"
            )
        device = canonical_device(probe.device)
        if getattr(self, "_dfloat_prefill", None) is not None and any(
            u.device != device for u in self._dfloat_unit_list
        ):
            raise DFloatError(
                "a model loaded with matmul='fused' cannot move to another device; load it there"
            )
        hidden = _hide(self)
        try:
            result = inner(fn, recurse)
        except BaseException:
            for (_, attr), (module, param) in hidden.items():
                module._parameters[attr] = param
            raise
        _relocate(self, device, hidden)
        return result

    model._apply = types.MethodType(_apply, model)
    model._dfloat_moves = True


def _offload_guard(module):
    """A forward pre-hook for the model: accelerate's weight offloading (``enable_sequential_cpu_offload``, a
    ``device_map`` with "cpu"/"disk" entries) swaps every module's weights for copies kept elsewhere, so a
    coded weight would be whatever the decode buffer held when the copy was taken. ``module`` (one holding a
    coded weight) would carry such a hook: refused before anything runs."""

    def guard(model, args):
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and any(
            getattr(h, "offload", False) for h in getattr(hook, "hooks", None) or [hook]
        ):
            raise DFloatError(
                "a dfloat model cannot run under accelerate's weight offloading (enable_sequential_cpu_offload, "
                "device_map with cpu/disk entries): its weights are decoded into a shared buffer. Use "
                "enable_model_cpu_offload() or cpu_offload=True instead"
            )

    return guard


def _chunked(model):
    """The piecewise units (runtime/chunked.py), each once (a tied embedding and lm_head share one)."""
    seen = set()
    for module in model.modules():
        cu = getattr(module, "_dfloat_chunked", None)
        if cu is not None and id(cu) not in seen:
            seen.add(id(cu))
            yield cu


def _places(model):
    """(module, attribute) of every coded weight, the placeholders of piecewise units included."""
    for unit in model._dfloat_unit_list:
        for slot in unit.slots:
            yield from slot.places


def _hide(model) -> dict[tuple[int, str], tuple[torch.nn.Module, torch.nn.Parameter]]:
    hidden = {}
    for module, attr in _places(model):
        key = (id(module), attr)
        if key not in hidden and attr in module._parameters:
            hidden[key] = (module, module._parameters.pop(attr))
    return hidden


def _relocate(model, device: torch.device, hidden) -> None:
    """Move every unit to ``device`` (units of a ``cpu_offload`` model stay in host memory), give the device a
    decode buffer as large as the largest old one, and point the weights at it again."""
    from dfloat.blocks import block_range
    from dfloat.runtime.decode_hooks import DecodeBuffer

    buffers = model._dfloat_buffers  # the same dict the decode hooks read
    units = model._dfloat_unit_list
    plan = getattr(model, "_dfloat_plan", None)
    piecewise = set(plan.chunked) if plan is not None else set()
    if any(u.device != device for u in units) or any(d != device for d in buffers):
        numel = max((b.numel for b in buffers.values()), default=0)
        backend = next((b.backend for b in buffers.values()), None)
        buffers.clear()
        buffers[device] = DecodeBuffer(device, numel, backend)
        moved: dict[
            int, object
        ] = {}  # a piecewise unit's arrays are shared by its AttachedUnit and ChunkedUnit

        def move(ct, host: bool):
            if host:
                return ct
            if id(ct) not in moved:
                moved[id(ct)] = ct.to(device)
            return moved[id(ct)]

        for unit in units:
            unit.ct = move(unit.ct, unit.host)
            unit.device = device
            for part in unit.parts or ():
                part.subs = (
                    None
                    if device.type == "cpu"
                    else [block_range(unit.ct, b0, b1) for b0, b1, _ in part.runs]
                )
        for cu in _chunked(model):
            cu.ct = move(cu.ct, cu.host)
            cu.buffer = buffers[device]
            for c in cu.chunks:
                c.sub = None if device.type == "cpu" else block_range(cu.ct, *c.blocks)
        model._dfloat_units = {u.name: u.ct for u in units}
        if plan is not None:
            plan.buffers = {str(device): numel}
        log.info("moved the compressed units to %s (decode buffer %d elements)", device, numel)
    for (_, attr), (module, param) in hidden.items():
        if param.device != device:  # a placeholder (piecewise units): the same object, on the new device
            param.data = torch.empty(1, dtype=torch.bfloat16, device=device).expand(param.shape)
        module._parameters[attr] = param
    for unit in units:
        if unit.name not in piecewise:
            buffers[device].bind(unit)
    buffers[device].current = None


def map_device(d) -> torch.device:
    """One device of a ``from_pretrained`` device_map (transformers' or diffusers'): accelerate's strategies
    ("auto", "balanced", ...) mean the GPU if there is one; "disk" offload is refused (coded units are not
    memory-mapped tensors accelerate can page in)."""
    from dfloat.codec import canonical_device

    if isinstance(d, str) and d in ("auto", "balanced", "balanced_low_0", "sequential"):
        d = "cuda" if torch.cuda.is_available() else "cpu"
    if d == "disk":
        raise ModelSourceError("dfloat checkpoints cannot be offloaded to disk (device_map value 'disk')")
    return canonical_device(d)
