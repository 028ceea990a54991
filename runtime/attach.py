"""Attaching coded units to a model built without weights (`dfloat.runtime.empty_model`), so each is decoded right
before use: plain tensors are loaded as they are; every coded weight becomes a view of its device's decode buffer,
decoded by hooks (`dfloat.runtime.decode_hooks`); big embedding / lm_head units are used piecewise
(`dfloat.runtime.chunked`), block units decoded a child module at a time (split decode), as the memory plan
(`dfloat.runtime.memory`) says; and units go to the devices a device_map names. The math stays the model's own,
so outputs are bit-identical.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from dfloat.codec import canonical_device
from dfloat.errors import ShapeMismatchError
from dfloat.format import CompressedTensor
from dfloat.runtime.decode_hooks import AttachedUnit, DecodeBuffer, Slot, UnitPart, make_hooks

log = logging.getLogger(__name__)


def attach(
    model: torch.nn.Module,
    units: Mapping[str, CompressedTensor],
    plain: Mapping[str, torch.Tensor],
    device: torch.device | str,
    backend: str | None = None,
    cpu_offload: bool = False,
    device_map: Mapping[str, str | torch.device] | None = None,
    chunk_numel: int | None = None,
    chunking: bool = True,
    split: bool = True,
) -> dict[torch.device, DecodeBuffer]:
    """Load plain tensors into ``model`` and hook every coded unit so it is decoded right before use.

    Big embedding / lm_head units are used piecewise (runtime/memory.py, runtime/chunked.py), block units are
    decoded a child module at a time (split decode); ``chunk_numel``, ``chunking`` and ``split`` are
    `load_compressed`'s options."""
    device = canonical_device(device)
    aliases = aliases_of(model)
    expected = dict(model.named_parameters(remove_duplicate=False))
    filled: set[str] = set()

    def check_shape(name, shape):
        if name not in expected:
            raise ShapeMismatchError(
                f"checkpoint tensor {name!r} has no place in the model: the config does not match the tensors"
            )
        if tuple(expected[name].shape) != tuple(shape):
            raise ShapeMismatchError(
                f"tensor {name!r} is {list(shape)} in the checkpoint but "
                f"{list(expected[name].shape)} in the model built from config.json"
            )

    for name, t in plain.items():
        if name in expected:
            check_shape(name, t.shape)
        _set_plain(model, name, t, aliases, _device_for(name, device, device_map))
        filled.update(aliases.get(name, [name]))

    buffers: dict[torch.device, DecodeBuffer] = {}
    hooked: dict[int, list[AttachedUnit]] = {}
    coded: list[AttachedUnit] = []
    raw_bytes = 0
    for uname, ct in units.items():
        udev = _device_for(uname, device, device_map)
        if not ct.is_coded:  # raw units are plain tensors in disguise
            raw_bytes += ct.nbytes
            for m, view in ct.split(ct.raw).items():
                check_shape(m, view.shape)
                _set_plain(model, m, view, aliases, udev)
                filled.update(aliases.get(m, [m]))
            continue
        for m in ct.members:
            check_shape(m.name, m.shape)
        slots = [
            Slot([_place(model, a) for a in aliases.get(m.name, [m.name])], m.offset, m.shape)
            for m in ct.members
        ]
        stored = ct.pin_memory() if (cpu_offload and udev.type == "cuda") else ct.to(udev)
        coded.append(AttachedUnit(uname, stored, udev, slots))
        if split:
            coded[-1].parts = _split_parts(model, coded[-1], aliases, device_map)

    plain_bytes = raw_bytes + sum(t.numel() * t.element_size() for t in plain.values())
    plan = _memory_plan(coded, plain_bytes, chunk_numel, chunking)
    for udev in {u.device for u in coded}:
        buffers[udev] = DecodeBuffer(udev, plan.buffers[str(udev)], backend)
    for unit in coded:
        udev, ct, slots = unit.device, unit.ct, unit.slots
        for slot in slots:
            for module, attr in slot.places:
                module._parameters[attr] = torch.nn.Parameter(
                    torch.empty(1, dtype=torch.bfloat16, device=udev).expand(slot.shape), requires_grad=False
                )
        for m in ct.members:
            filled.update(aliases.get(m.name, [m.name]))
        owner = _owner(model, [m.name for m in ct.members])
        if unit.name in plan.chunked:
            _install_chunked(unit, buffers[udev], plan.chunked[unit.name])
        elif unit.parts:
            for part in unit.parts:  # the child module decodes its part; its leaves too if it is not there
                hooked.setdefault(id(part.module), [part.module, []])[1].append((unit, part))
                for slot in part.slots:
                    for module, _ in slot.places:
                        hooked.setdefault(id(module), [module, []])[1].append((unit, part))
        else:
            for slot in slots:
                for module, _ in slot.places:
                    hooked.setdefault(id(module), [module, []])[1].append((unit, None))
            if owner is not None:
                hooked.setdefault(id(owner), [owner, []])[1].append((unit, None))
        if owner is not None and device_map:  # blocks on different devices: bring their inputs along
            owner.register_forward_pre_hook(_inputs_to(udev), with_kwargs=True)

    missing = [n for n in expected if n not in filled]
    if missing:
        raise ShapeMismatchError(
            f"the checkpoint lacks {len(missing)} weight(s) the model needs, e.g. "
            f"{', '.join(missing[:3])}: the config does not match the tensors"
        )
    for name, buf in list(
        model.named_buffers()
    ):  # buffers computed at construction (rotary tables) start on CPU
        bdev = _device_for(name, device, device_map)
        if buf.device != bdev:
            module, attr = _place(model, name)
            module._buffers[attr] = buf.to(bdev)
    for unit in coded:  # buffers have their final sizes now; piecewise units have no whole view
        if unit.name not in plan.chunked:
            buffers[unit.device].bind(unit)
    for module, unit_list in hooked.values():
        pre, post = make_hooks(unit_list, buffers)
        module.register_forward_pre_hook(pre, with_kwargs=True)
        module.register_forward_hook(post, always_call=True)
    model._dfloat_buffers = buffers
    model._dfloat_units = {u.name: u.ct for u in coded}
    model._dfloat_plan = plan
    from dfloat.runtime import placement, weight_guard

    placement.install(model, coded)  # model.to(device) moves the compressed units (runtime/placement.py)
    # no copies of coded weights, no PEFT set-up that reads them outside a forward (runtime/weight_guard.py)
    weight_guard.install(model, [p for u in coded for slot in u.slots for p in slot.places])
    return buffers


def aliases_of(model: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter name -> every name sharing that parameter (tied embeddings)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n: names for names in by_id.values() for n in names}


def _place(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    try:
        return model.get_submodule(module_name) if module_name else model, attr
    except AttributeError:
        raise ShapeMismatchError(
            f"checkpoint tensor {name!r} has no place in the model: the config does not match the tensors"
        ) from None


def _set_plain(model, name: str, tensor: torch.Tensor, aliases, device) -> None:
    module, attr = _place(model, name)
    tensor = tensor.to(device)
    if attr in module._parameters:
        for alias in aliases.get(name, [name]):
            m, a = _place(model, alias)
            m._parameters[a] = torch.nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise ShapeMismatchError(
            f"checkpoint tensor {name!r} has no place in the model: the config does not match the tensors"
        )


def _memory_plan(coded: list[AttachedUnit], plain_bytes: int, chunk_numel: int | None, chunking: bool):
    """The memory plan for these units; a chunked linear the device's GEMM may not reproduce is decoded whole."""
    from dfloat.blocks import host_positions
    from dfloat.runtime import chunked, memory

    def sizes(excluded: set[str]) -> list[memory.UnitSize]:
        out = []
        for u in coded:
            places = [p for slot in u.slots for p in slot.places]
            shape = u.slots[0].shape if len(u.slots) == 1 else ()
            matrix = (shape[0], shape[1]) if len(shape) == 2 else None
            ok = matrix is not None and u.name not in excluded and chunked.can_chunk(places)
            block = memory.max_block_numel(host_positions(u.ct)) if ok else 0
            split = max(p.need for p in u.parts) if u.parts else 0
            out.append(
                memory.UnitSize(
                    u.name,
                    u.ct.numel,
                    u.ct.nbytes,
                    True,
                    matrix,
                    ok,
                    block,
                    str(u.device),
                    decode_numel=split,
                )
            )
        return out

    excluded: set[str] = set()
    while True:
        plan = memory.plan_memory(sizes(excluded), plain_bytes, chunk_numel, chunking)
        inexact = {
            name
            for name, c in plan.chunked.items()
            for u in coded
            if u.name == name
            and any(isinstance(m, torch.nn.Linear) for slot in u.slots for m, _ in slot.places)
            and not chunked.chunked_linear_is_exact(u.device, c.total_rows, c.cols, c.rows)
        }
        if not inexact:
            return plan
        log.warning(
            "row-chunked matmul is not bit-identical on this device: decoding %s whole", sorted(inexact)
        )
        excluded |= inexact


def _install_chunked(unit: AttachedUnit, buffer: DecodeBuffer, plan) -> None:
    from dfloat.runtime import chunked

    cu = chunked.ChunkedUnit.build(unit.name, unit.ct, buffer, plan)
    for module, _ in unit.slots[0].places:
        if isinstance(module, torch.nn.Linear):
            chunked.install_linear(module, cu)
        else:
            chunked.install_embedding(module, cu)


def _owner(model, names: list[str]) -> torch.nn.Module | None:
    """The deepest module holding all of a unit's members, when it is a module that runs (not a ModuleList)."""
    common = _common_path(names)
    if not common:
        return None
    module = model.get_submodule(".".join(common))
    return None if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)) else module


def _split_parts(model, unit: AttachedUnit, aliases, device_map) -> list[UnitPart] | None:
    """Split decode for a block unit whose members live in two or more child modules of its owner
    (`dfloat.runtime.memory.split_parts`), when every place of a part's members is inside its child module and
    no device_map entry splits the owner; None keeps the whole-unit decode."""
    from dfloat.blocks import block_range, host_positions
    from dfloat.runtime import memory

    members = unit.ct.members
    groups = memory.split_parts([m.name for m in members])
    if groups is None:
        return None
    owner = _common_path([m.name for m in members])
    prefix = ".".join(owner)
    if any(k.startswith(prefix + ".") for k in device_map or {}):
        return None
    pos = host_positions(unit.ct)
    total = [(m.name, m.offset, m.numel) for m in members]
    if not memory.split_decode_numel(total, pos):  # no part smaller than the whole unit
        return None
    parts = []
    for i, group in enumerate(groups):
        child = f"{prefix}.{members[group[0]].name.split('.')[len(owner)]}"
        if any(not a.startswith(child + ".") for j in group for a in aliases.get(members[j].name, [])):
            return None  # a tied weight used outside the child module
        module = model.get_submodule(child)
        if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            return None
        spans = [(members[j].offset, members[j].offset + members[j].numel) for j in group]
        runs, need = memory.part_layout(pos, spans)
        starts = []
        for j in group:
            b0, _, base = next(r for r in runs if pos[r[0]] <= members[j].offset < pos[r[1]])
            starts.append(base + members[j].offset - int(pos[b0]))
        part = UnitPart(f"{unit.name}#{i}", runs, need, [unit.slots[j] for j in group], starts, module)
        if unit.device.type != "cpu":  # made once, so that decoding a part reads no host memory (CUDA graphs)
            part.subs = [block_range(unit.ct, b0, b1) for b0, b1, _ in runs]
        parts.append(part)
    return parts


def _common_path(names: list[str]) -> list[str]:
    """The module path all of ``names`` (parameter names) share."""
    common = []
    for level in zip(*(n.split(".")[:-1] for n in names)):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return common


def _inputs_to(device: torch.device):
    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device, non_blocking=True)
        if isinstance(x, (list, tuple)):
            return type(x)(move(v) for v in x)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    def hook(module, args, kwargs):
        return move(args), move(kwargs)

    return hook


def _device_for(name: str, device: torch.device, device_map) -> torch.device:
    if not device_map:
        return device
    best, dev = -1, device
    for prefix, d in device_map.items():
        if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, dev = len(prefix), canonical_device(d)
    return dev


def auto_device_map(units: Mapping[str, CompressedTensor]) -> dict[str, str]:
    """Whole units across the visible GPUs, balanced by compressed size, in model order."""
    n = torch.cuda.device_count()
    if n == 0:
        return {"": "cpu"}
    total = sum(ct.nbytes for ct in units.values()) or 1
    out, acc = {"": "cuda:0"}, 0
    for name, ct in units.items():
        out[name] = f"cuda:{min(n - 1, int(n * acc / total))}"
        acc += ct.nbytes
    return out
