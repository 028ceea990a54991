"""Which tensors of a diffusers model share a code: found from the tensor names, as for language models.

A diffusion model nests its blocks: a UNet's ``down_blocks.1.attentions.0.transformer_blocks.3.`` is a
transformer block inside an attention module inside a down block. The unit is the deepest numbered entry of a
list of blocks (a name ending in ``s``: ``transformer_blocks.N``, ``single_transformer_blocks.N``,
``blocks.N`` for Wan, ``down_blocks.N.resnets.M``, ``...attentions.M``), so the decode buffer holds one block,
not a whole down block. Numbered modules of a ``Sequential`` (``to_out.0``, ``ff.net.2``) do not end a unit.
Weights outside blocks (embedders, ``proj_out``, a VAE's ``conv_in``) are units of their own; 1-D tensors stay
plain, and so does every tensor of a module the model keeps in float32 (``_keep_in_fp32_modules``: diffusers
upcasts those at load, so a coded BF16 copy would not give the same numbers), and so do buffers saved with the
weights.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable

from dfloat.runtime.grouping import Grouping, default_unit_of, matrix_unit_of

_LIST_ENTRY = re.compile(r"(?:^|\.)([A-Za-z_]*s)\.(\d+)(?=\.)")


def block_of(name: str) -> str | None:
    """The deepest ``<list>s.<N>`` prefix of a tensor name, or None when there is none."""
    end = None
    for m in _LIST_ENTRY.finditer(name):
        end = m.end()
    return name[:end] if end is not None else None


def diffusers_grouping(
    keep_fp32: Iterable[str] = (), unit: str = "block", parameters: Collection[str] | None = None
) -> Grouping:
    """The grouping for a diffusers model whose class keeps ``keep_fp32`` modules in float32;
    ``unit="matrix"`` makes every weight a unit of its own (the leanest decode buffer), as for language
    models. With ``parameters`` (the model's parameter names), other tensors (buffers saved with the weights)
    stay plain."""
    keep = frozenset(keep_fp32)

    def unit_of(name: str, shape: tuple[int, ...]) -> str | None:
        if len(shape) < 2 or (keep and keep.intersection(name.split("."))):
            return None
        if parameters is not None and name not in parameters:
            return None
        if unit == "matrix":
            return matrix_unit_of(name, shape)
        return block_of(name) or default_unit_of(name, shape)

    return unit_of
