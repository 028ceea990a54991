"""load_compressed: a normal transformers model whose coded weights are decoded just before they are used.

The model is built without allocating its BF16 weights (`dfloat.runtime.empty_model`); plain tensors are loaded as
they are, and each coded unit keeps only its compressed arrays, decoded into a reusable buffer right before the
module that uses it runs (`dfloat.runtime.attach`, `dfloat.runtime.decode_hooks`). The math is the original
model's, so outputs are bit-identical.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from dfloat.codec import canonical_device
from dfloat.errors import ModelSourceError
from dfloat.runtime import source as src
from dfloat.runtime.attach import attach, auto_device_map
from dfloat.runtime.checkpoint import CONFIG_KEY, CompressedCheckpoint
from dfloat.runtime.empty_model import build_empty_model

log = logging.getLogger(__name__)


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
    model = build_empty_model(folder, model_class, kw)
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
        device_map = auto_device_map(units)
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
