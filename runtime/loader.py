"""load_compressed: a normal transformers model whose coded weights are decoded just before they are used.

The model is built without allocating its BF16 weights (parameters on the meta device, buffers computed as
usual). Plain tensors are loaded as they are. Each coded unit keeps only its compressed arrays; its weights are
fixed views of one reusable buffer per device, set once at attach time (so a CUDA graph records stable addresses),
and forward pre-hooks on the modules that own them decode the unit into that buffer when it is not already there.
The math is the original model's, so outputs are bit-identical.

Autograd: when a module's forward may save weights for a backward pass (grad mode on and one of its parameters,
e.g. a LoRA adapter, or one of its inputs requires grad; train or eval mode alike), its pre-hook decodes the unit
(or split-decode part) into a tensor of its own instead, which autograd may keep while later units reuse the
buffer; its forward hook points the weights back at the buffer views, so only autograd holds the copy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from dfloat.codec import canonical_device, decompress_tensor
from dfloat.errors import ModelSourceError, ShapeMismatchError
from dfloat.format import CompressedTensor
from dfloat.runtime import source as src
from dfloat.runtime.checkpoint import CONFIG_KEY, CompressedCheckpoint

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    """Where one member lives in the model: every (module, attribute) that shares the tensor (tied weights)."""

    places: list[tuple[torch.nn.Module, str]]
    offset: int
    shape: tuple[int, ...]


@dataclass
class _Part:
    """Split decode: the members of a block unit that one child module (attention, MLP) uses, decoded right
    before that module runs: runs of blocks ``(b0, b1, base)`` (`dfloat.runtime.memory.part_layout`), each
    decoded to buffer element ``base``; ``starts[i]`` is where ``slots[i]``'s weight starts in the buffer."""

    key: str
    runs: list[tuple[int, int, int]]
    need: int  # buffer elements
    slots: list[_Slot]
    starts: list[int]
    module: torch.nn.Module  # the child module whose pre-hook decodes the part
    subs: list[CompressedTensor] | None = None  # the runs as sub-units, for non-CPU decoders (made once)
    private_by: torch.nn.Module | None = None  # autograd: the module running on a private decode of the part


@dataclass
class _Unit:
    name: str
    ct: CompressedTensor  # on the execution device, or pinned on the host with cpu_offload
    device: torch.device
    slots: list[_Slot]
    parts: list[_Part] | None = None  # split decode (None: the unit is decoded whole)
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

    def bind(self, unit: _Unit, part: _Part | None = None) -> None:
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
        for start, slot in placed:
            view = self.tensor[start : start + math.prod(slot.shape)].view(slot.shape)
            for module, attr in slot.places:
                module._parameters[attr] = torch.nn.Parameter(view, requires_grad=False)

    def ensure_part(self, unit: _Unit, part: _Part) -> None:
        if self.current == part.key:
            return
        _decode_part(unit, part, self.tensor, self.backend)
        self.current = part.key
        self.decodes += 1

    def ensure(self, unit: _Unit) -> None:
        if self.current == unit.name:
            return
        ct = unit.ct
        if ct.device != self.device:  # cpu_offload: copy the compressed arrays in, then decode
            ct = ct.to(self.device, non_blocking=True)
        decompress_tensor(ct, device=self.device, backend=self.backend, out=self.tensor)
        self.current = unit.name
        self.decodes += 1


def _model_class(config, model_class):
    import transformers

    if model_class is not None:
        return model_class
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers.models.auto import modeling_auto

    for mapping in (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING, modeling_auto.MODEL_MAPPING):
        with contextlib.suppress(KeyError):
            return mapping[type(config)]
    raise ModelSourceError(
        f"no transformers class for model type {config.model_type!r} "
        f"(architectures {getattr(config, 'architectures', None)}); pass model_class="
    )


def _build_empty(folder: Path, model_class, kwargs: dict):
    """The model with parameters on the meta device and buffers computed as `from_pretrained` would."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    with contextlib.suppress(ImportError):
        import dfloat.models  # noqa: F401 - registers the research architectures with the Auto classes
    trust = kwargs.pop("trust_remote_code", False)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust)
    except Exception as e:  # noqa: BLE001 - an unreadable config is a source problem
        raise ModelSourceError(f"{folder}: cannot build a config ({type(e).__name__}: {e})") from None
    cls = _model_class(config, model_class)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=torch.bfloat16, **kwargs)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # tied parameters must be one object before weights are attached
    model.eval()
    with contextlib.suppress(Exception):
        from transformers import GenerationConfig

        if (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def _aliases(model: torch.nn.Module) -> dict[str, list[str]]:
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
    aliases = _aliases(model)
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
    hooked: dict[int, list[_Unit]] = {}
    coded: list[_Unit] = []
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
            _Slot([_place(model, a) for a in aliases.get(m.name, [m.name])], m.offset, m.shape)
            for m in ct.members
        ]
        stored = ct.pin_memory() if (cpu_offload and udev.type == "cuda") else ct.to(udev)
        coded.append(_Unit(uname, stored, udev, slots))
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
        pre, post = _make_hooks(unit_list, buffers)
        module.register_forward_pre_hook(pre, with_kwargs=True)
        module.register_forward_hook(post, always_call=True)
    model._dfloat_buffers = buffers
    model._dfloat_units = {u.name: u.ct for u in coded}
    model._dfloat_plan = plan
    from dfloat.runtime import placement

    placement.install(model, coded)  # model.to(device) moves the compressed units (runtime/placement.py)
    return buffers


def _memory_plan(coded: list[_Unit], plain_bytes: int, chunk_numel: int | None, chunking: bool):
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


def _install_chunked(unit: _Unit, buffer: DecodeBuffer, plan) -> None:
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


def _split_parts(model, unit: _Unit, aliases, device_map) -> list[_Part] | None:
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
        part = _Part(f"{unit.name}#{i}", runs, need, [unit.slots[j] for j in group], starts, module)
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


def _decode_part(unit: _Unit, part: _Part, out: torch.Tensor, backend: str | None) -> None:
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


def _make_hooks(entries: list[tuple[_Unit, _Part | None]], buffers: dict[torch.device, DecodeBuffer]):
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


def _decode_for_autograd(unit: _Unit, buf: DecodeBuffer, part: _Part | None = None) -> None:
    """Decode into a tensor of its own, which autograd may keep for the backward pass while later units reuse the
    shared buffer (split units: only the part), and point the weights at it."""
    if part is None:
        ct = unit.ct if unit.ct.device == buf.device else unit.ct.to(buf.device, non_blocking=True)
        flat = decompress_tensor(ct, device=buf.device, backend=buf.backend).reshape(-1)
        starts, slots = [s.offset for s in unit.slots], unit.slots
    else:
        flat = torch.empty(part.need, dtype=torch.bfloat16, device=buf.device)
        _decode_part(unit, part, flat, buf.backend)
        starts, slots = part.starts, part.slots
    for start, slot in zip(starts, slots):
        view = flat[start : start + math.prod(slot.shape)].view(slot.shape)
        for module, attr in slot.places:
            module._parameters[attr] = torch.nn.Parameter(view, requires_grad=False)


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


def _auto_device_map(units: Mapping[str, CompressedTensor]) -> dict[str, str]:
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


def load_compressed(
    source: str | os.PathLike,
    device: str | torch.device | None = None,
    device_map: str | Mapping[str, str | torch.device] | None = None,
    cpu_offload: bool = False,
    backend: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    model_class=None,
    verify: bool = True,
    chunk_numel: int | None = None,
    chunking: bool = True,
    matmul: str = "decode",
    split_decode: bool = True,
    **kw,
):
    """Load a dfloat (or official DFloat11) checkpoint as a transformers model with bit-identical outputs.

    Args:
        source: a compressed folder or Hub id; a compressed diffusers model or pipeline folder, or an official
            DFloat11 diffusion checkpoint (pass ``config_from=``, see `dfloat.runtime.diffusion_loading`).
        device: "cpu" or "cuda[:i]" (default: cuda if available, else cpu).
        device_map: "auto" places whole units across the visible GPUs; or ``{module prefix: device}``.
        cpu_offload: keep compressed units in pinned host memory and copy each to the GPU before decoding it.
        backend: decoder ("cpu", "triton", "cuda"; default: the fastest for the device).
        model_class: the transformers class to build (default: from config.json).
        verify: check every unit's stored arrays and metadata and every plain tensor against the checksums in
            the files while reading them (format 1.1; units of 1.0 files on their first decode). ``False`` skips
            this, for checkpoints verified once. Official DFloat11 files carry no checksums.
        chunk_numel: embedding / lm_head units bigger than this many weights are used piecewise (rows looked
            up from only the blocks that hold them; the matmul a row chunk at a time), so the decode buffer needs
            no room for them (default: the largest unit that must be decoded whole, i.e. a transformer block).
        chunking: False decodes every unit whole (the decode buffer then holds the largest unit).
        matmul: "decode" (default: decode each block, then the model's own math; bit-identical to BF16) or
            "fused" (CUDA: linear layers multiply straight from coded weights for <= 16 rows; deterministic and
            bit-identical to the fused kernel's twin, not to cuBLAS; see runtime/fused.py).
        split_decode: a block unit whose weights live in several child modules (attention, MLP) is decoded a
            part at a time, right before each child runs, so the buffer holds the largest part (docs/memory.md);
            False decodes block units whole.
        **kw: passed to the model's construction (e.g. ``attn_implementation="sdpa"``).
    Returns:
        The model in eval mode; ``generate()`` works as usual.
    Example:
        >>> model = dfloat.load_compressed("./llama-dfloat", device="cuda")
    """
    from dfloat.runtime import pipeline

    if pipeline.is_local_file(source):  # an official DFloat11 single file (ComfyUI), or an error below
        folder = Path(source).expanduser()
    else:
        folder, _ = src.resolve_folder(source, revision=revision, token=token)
    if pipeline.diffusion_layout(folder):  # diffusers models and pipelines: runtime/diffusion_loading.py
        from dfloat.runtime.diffusion_loading import load_diffusion

        options = dict(device_map=device_map, cpu_offload=cpu_offload, backend=backend, verify=verify)
        return load_diffusion(folder, device=device, **options, **kw)
    config = src.read_config(folder)
    device = canonical_device(
        device if device is not None else "cuda" if torch.cuda.is_available() else "cpu"
    )
    if CONFIG_KEY not in config and "dfloat11_config" not in config:
        raise ModelSourceError(
            f"{folder}: not a compressed model (config.json has no 'dfloat' or "
            "'dfloat11_config' section); load it with transformers directly"
        )
    model = _build_empty(folder, model_class, kw)
    if CONFIG_KEY in config:
        ckpt = CompressedCheckpoint.open(folder)
        units, plain = {}, {}
        for _, u, p in ckpt.iter_shards(verify=verify):
            units.update(u)
            plain.update(p)
    else:
        from dfloat.runtime.official import read_official

        units, plain = read_official(folder, config, model)
    if device_map == "auto":
        device_map = _auto_device_map(units)
    if matmul != "decode":
        from dfloat.runtime import fused

        fused.check_mode(matmul, device)
        if device_map or cpu_offload:
            raise ModelSourceError("matmul='fused' works on one device without cpu_offload (for now)")
        units = fused.install(model, units, device)
    buffers = attach(
        model,
        units,
        plain,
        device,
        backend=backend,
        cpu_offload=cpu_offload,
        device_map=device_map,
        chunk_numel=chunk_numel,
        chunking=chunking,
        split=split_decode,
    )
    log.info("memory plan of %s: %s", folder, model._dfloat_plan.summary())
    log.info(
        "loaded %s: %d coded units, decode buffer(s) %s",
        folder,
        sum(u.is_coded for u in units.values()),
        {str(d): b.numel for d, b in buffers.items()},
    )
    return model


def weight_memory(model: torch.nn.Module) -> dict[str, int]:
    """Bytes held for weights: compressed units, plain (uncoded) tensors, and decode buffers."""
    units = getattr(model, "_dfloat_units", {})
    buffers = getattr(model, "_dfloat_buffers", {})
    coded = sum(ct.nbytes for ct in units.values())
    buffer_bytes = sum(2 * b.numel for b in buffers.values())
    views = {b.tensor.data_ptr() for b in buffers.values() if b.tensor is not None}
    plain, seen = 0, set()
    for t in [*model.parameters(), *model.buffers()]:
        if 0 in t.stride() or t.untyped_storage().data_ptr() in views or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        plain += t.numel() * t.element_size()
    return {
        "compressed": coded,
        "plain": plain,
        "decode_buffers": buffer_bytes,
        "total": coded + plain + buffer_bytes,
    }


def describe_unit_layout(folder: str | os.PathLike) -> dict:
    """{unit: [member names]} of a compressed folder, read from its shard headers."""
    from safetensors import safe_open

    from dfloat.storage import check_version

    out = {}
    for path in CompressedCheckpoint.open(folder).shard_files:
        with safe_open(str(path), framework="pt") as f:
            units = check_version(f.metadata(), str(path))
        try:
            out.update({u: [m["name"] for m in meta["members"]] for u, meta in units.items()})
        except (AttributeError, KeyError, TypeError) as e:
            raise ModelSourceError(f"{path}: malformed unit metadata ({e!r}); the file is damaged") from None
    return out
