"""The original BF16 tensors of a dfloat folder, one member at a time, for vLLM's layers to shard.

vLLM's own weight iterator reads every tensor of the folder by name; the coded units' arrays
(``{unit}.{array}``) are no parameter of any vLLM module, so the plugin drops them from that stream
(`DfloatConfig.get_checkpoint_weight_mapper`) and reads the units here instead, with dfloat's reader (array and
metadata checksums checked as the shards are read). A member is decoded on the CPU from its unit; the unit's
decoded tensors stay cached until a member of another unit is asked for, because vLLM processes its layers in
module order, so the attention and MLP layers of one block follow each other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dfloat.codec import decompress_tensor
from dfloat.errors import CorruptStreamError, ModelSourceError
from dfloat.format import STORED_ARRAYS, CompressedTensor
from dfloat.runtime.checkpoint import CompressedCheckpoint
from dfloat.storage import check_version, load_compressed_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemberInfo:
    unit: str
    shard: str  # file name inside the folder
    shape: tuple[int, ...]
    dtype: str


class CheckpointWeights:
    """Members (the original tensors held by units) of a dfloat folder, decoded on demand on the CPU."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.checkpoint = CompressedCheckpoint.open(folder)
        self.members: dict[str, MemberInfo] = {}
        self.units: dict[str, str] = {}  # unit -> shard file
        for path in self.checkpoint.shard_files:
            for unit, meta in _unit_metadata(path).items():
                self.units[unit] = path.name
                for m in meta.get("members", []):
                    self.members[m["name"]] = MemberInfo(
                        unit, path.name, tuple(m["shape"]), meta.get("dtype", "BF16")
                    )
        self.claimed: set[str] = set()
        self._shard: tuple[str, dict[str, CompressedTensor]] | None = None
        self._decoded: tuple[str, dict[str, torch.Tensor]] | None = None

    def tensor(self, name: str) -> torch.Tensor:
        """Member ``name`` as it was before compression (a CPU tensor, its own dtype)."""
        info = self.members.get(name)
        if info is None:
            raise ModelSourceError(f"{self.folder}: no unit holds a tensor named {name!r}")
        if self._decoded is None or self._decoded[0] != info.unit:
            ct = self._unit(info)
            self._decoded = (info.unit, ct.split(decompress_tensor(ct).reshape(-1)))
        self.claimed.add(name)
        return self._decoded[1][name]

    def _unit(self, info: MemberInfo) -> CompressedTensor:
        if self._shard is None or self._shard[0] != info.shard:
            self._shard = None  # let the previous shard go before reading the next
            units, _plain = load_compressed_tensors(self.folder / info.shard, verify=True)
            self._shard = (info.shard, units)
            log.debug("dfloat: read %s (%d units)", info.shard, len(units))
        try:
            return self._shard[1][info.unit]
        except KeyError:
            raise CorruptStreamError(
                f"{self.folder / info.shard}: its header lists unit {info.unit!r} but the file does not hold it"
            ) from None

    def release(self) -> None:
        """Drop the cached shard and decoded unit (after the last layer is loaded)."""
        self._shard = None
        self._decoded = None

    def unit_array_names(self) -> set[str]:
        """Every ``{unit}.{array}`` tensor name the folder may hold."""
        return {f"{u}.{a}" for u in self.units for a in STORED_ARRAYS}


def _unit_metadata(path: Path) -> dict:
    """The units JSON of one shard's header, read without loading any tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
    except SafetensorError as e:
        raise CorruptStreamError(f"{path}: not a readable safetensors file ({e})") from None
    units = check_version(meta, str(path))
    if not isinstance(units, dict):
        raise CorruptStreamError(f"{path}: unit metadata is not a JSON object")
    return units
