"""Which tensors share a code: found from the tensor names alone, so any architecture works without a table.

Default: every weight of >= 2 dims under the first numbered module of its name (``model.layers.7.``,
``encoder.layer.3.``, ``transformer.h.0.``) forms that block's unit; every other such weight (embeddings,
lm_head, poolers) is a unit of its own; 1-D tensors (norms, biases) stay plain. ``unit="matrix"``
(`matrix_unit_of`) makes every such weight a unit of its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

_BLOCK = re.compile(r"^(.*?\.\d+)\.")

Grouping = Callable[[str, tuple[int, ...]], "str | None"]


def default_unit_of(name: str, shape: tuple[int, ...]) -> str | None:
    """The unit a tensor belongs to, or None to keep it plain."""
    if len(shape) < 2:
        return None
    m = _BLOCK.match(name)
    if m:
        return m.group(1)
    return name[: -len(".weight")] if name.endswith(".weight") else name


def matrix_unit_of(name: str, shape: tuple[int, ...]) -> str | None:
    """Per-matrix units (``unit="matrix"``): every weight of >= 2 dims is a unit of its own, so the decode
    buffer holds one matrix instead of a block: the leanest memory, at a slightly larger stored size (one code
    per matrix) and more, smaller decodes."""
    if len(shape) < 2:
        return None
    return name[: -len(".weight")] if name.endswith(".weight") else name


UNIT_KINDS = {"block": default_unit_of, "matrix": matrix_unit_of}


def grouping_from(spec: Grouping | Mapping[str, str] | None) -> Grouping:
    """A user's override: a function, or ``{regex: unit_name_template}`` tried in order (``\\1`` refers to groups;
    a template of "" keeps matching tensors plain); names that match nothing use the default."""
    if spec is None:
        return default_unit_of
    if callable(spec):
        return spec
    rules = [(re.compile(p), t) for p, t in spec.items()]

    def unit_of(name: str, shape: tuple[int, ...]) -> str | None:
        for rx, template in rules:
            m = rx.fullmatch(name) or rx.match(name)
            if m:
                return m.expand(template) or None
        return default_unit_of(name, shape)

    return unit_of


def plan_units(
    tensors: Iterable[tuple[str, tuple[int, ...], str]], unit_of: Grouping
) -> dict[str, list[str]]:
    """``{unit: [tensor names in checkpoint order]}`` for the BF16 tensors a unit may hold."""
    units: dict[str, list[str]] = {}
    for name, shape, dtype in tensors:
        if dtype != "BF16":
            continue
        unit = unit_of(name, tuple(shape))
        if unit is not None:
            units.setdefault(unit, []).append(name)
    return units
