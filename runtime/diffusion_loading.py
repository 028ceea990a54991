"""`dfloat.load_compressed` for diffusion checkpoints.

A dfloat-compressed diffusers model or pipeline loads through diffusers' own ``from_pretrained`` (the
quantizer of runtime/diffusers_quantizer.py does the rest), so ``load_compressed`` returns what diffusers
would. An official DFloat11 diffusion checkpoint (runtime/official_diffusion.py) has no config diffusers could
read: it is built from ``config_from`` and its units are attached as they are stored.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dfloat.errors import ModelSourceError

log = logging.getLogger(__name__)


def load_diffusion(
    folder: Path,
    device=None,
    device_map=None,
    cpu_offload: bool = False,
    backend: str | None = None,
    verify: bool = True,
    config_from=None,
    **kw,
):
    """A diffusers model (or pipeline, for a pipeline folder) with bit-identical outputs to the BF16 one.

    Args:
        folder: a compressed diffusers model or pipeline folder, an official DFloat11 diffusion folder, or an
            official DFloat11 single file (ComfyUI).
        device: where weights are decoded ("cpu", "cuda[:i]"; default: cuda if available).
        device_map, cpu_offload, backend, verify: as for `dfloat.load_compressed`.
        config_from: official checkpoints only: the original model's folder or Hub id (its config.json).
        **kw: passed to ``from_pretrained`` (diffusers) for dfloat folders.
    """
    from dfloat.runtime import official_diffusion
    from dfloat.runtime.checkpoint import DIFFUSERS_CONFIG_KEY
    from dfloat.runtime.pipeline import (
        MODEL_INDEX,
        diffusers_class,
        diffusion_layout,
        is_compressed_component,
    )
    from dfloat.runtime.source import read_json_object

    layout = diffusion_layout(folder)
    if layout in ("official", "comfyui"):
        return official_diffusion.load(
            folder,
            config_from,
            device=device,
            backend=backend,
            cpu_offload=cpu_offload,
            device_map=device_map,
        )
    if config_from is not None:
        raise ModelSourceError(
            f"{folder}: config_from is for official DFloat11 checkpoints; this one has its own"
        )
    from dfloat.runtime.diffusers_quantizer import load_options

    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with load_options(backend=backend, cpu_offload=cpu_offload, verify=verify):
        if layout == "pipeline":
            try:
                import diffusers
            except ImportError:
                raise ModelSourceError(
                    f"{folder}: a diffusers pipeline needs diffusers: pip install diffusers"
                ) from None

            if not any(is_compressed_component(p.parent) for p in folder.glob("*/config.json")):
                raise ModelSourceError(
                    f"{folder}: no component is compressed; load it with diffusers directly"
                )
            name = read_json_object(folder / MODEL_INDEX).get("_class_name")
            log.info("loading the %s pipeline %s through diffusers", name, folder)
            pipe = diffusers.DiffusionPipeline.from_pretrained(
                folder, dtype=torch.bfloat16, device_map=device_map, **kw
            )
            return pipe.to(device) if device is not None and device_map is None else pipe
        config = read_json_object(folder / "config.json")
        if DIFFUSERS_CONFIG_KEY not in config:
            raise ModelSourceError(f"{folder}: not a compressed model; load it with diffusers directly")
        cls = diffusers_class(config, folder)
        target = device_map if device_map is not None else device
        return cls.from_pretrained(folder, dtype=torch.bfloat16, device_map=target, **kw)
