"""A compressed checkpoint folder: shards of units and plain tensors, an index, config.json with a "dfloat" section.

config.json                       the model's config + "dfloat": {format_version, parameters, source, sizes}
dfloat.index.json                 {"metadata": {...}, "weight_map": {unit or tensor name: shard file}}
dfloat.safetensors.index.json     a copy of it, read by transformers' from_pretrained (runtime/hf_quantizer.py)
dfloat-00001-of-0000N.safetensors units ("{unit}.{array}") and plain tensors, metadata per docs/FORMAT.md
tokenizer / generation files      copied from the source
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dfloat.errors import CorruptStreamError, ModelSourceError
from dfloat.format import CompressedTensor, load_compressed_tensors, save_compressed_tensors

INDEX_NAME = "dfloat.index.json"
TRANSFORMERS_INDEX = "dfloat.safetensors.index.json"  # the same index, under a name `transformers_weights` accepts
CONFIG_KEY = "dfloat"
DIFFUSERS_CONFIG_KEY = "_dfloat"  # the same section in a diffusers model's config (diffusers skips "_" keys)
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def shard_name(i: int, n: int) -> str:
    return f"dfloat-{i:05d}-of-{n:05d}.safetensors"


@dataclass
class ShardWriter:
    """Collects units and plain tensors and writes a shard whenever ``max_shard_bytes`` is reached, so memory holds
    at most one output shard."""

    folder: Path
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    _units: dict[str, CompressedTensor] = field(default_factory=dict)
    _plain: dict[str, torch.Tensor] = field(default_factory=dict)
    _pending_bytes: int = 0
    _written: list[tuple[Path, list[str]]] = field(default_factory=list)

    def add_unit(self, name: str, ct: CompressedTensor) -> None:
        self._units[name] = ct
        self._grow(ct.nbytes)

    def add_plain(self, name: str, t: torch.Tensor) -> None:
        self._plain[name] = t
        self._grow(t.numel() * t.element_size())

    def _grow(self, nbytes: int) -> None:
        self._pending_bytes += nbytes
        if self._pending_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._units and not self._plain:
            return
        path = self.folder / f".part-{len(self._written) + 1:05d}.safetensors"
        save_compressed_tensors(self._units, path, extra_tensors=self._plain)
        self._written.append((path, [*self._units, *self._plain]))
        self._units, self._plain, self._pending_bytes = {}, {}, 0

    def close(self, metadata: dict) -> dict:
        """Name the shards ``-of-N`` and write the index; returns the index."""
        self.flush()
        weight_map = {}
        n = len(self._written)
        for i, (path, names) in enumerate(self._written, start=1):
            final = self.folder / shard_name(i, n)
            os.replace(path, final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": metadata, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return index


def is_compressed_folder(folder: Path) -> bool:
    return (folder / INDEX_NAME).is_file()


@dataclass
class CompressedCheckpoint:
    """Read side of a compressed folder."""

    folder: Path
    config: dict
    index: dict

    @classmethod
    def open(cls, folder: str | os.PathLike) -> CompressedCheckpoint:
        folder = Path(folder)
        index_path = folder / INDEX_NAME
        config_path = folder / "config.json"
        if not index_path.is_file() or not config_path.is_file():
            raise ModelSourceError(f"{folder}: not a dfloat checkpoint (needs config.json and {INDEX_NAME})")
        try:
            index = json.loads(index_path.read_text())
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ModelSourceError(f"{folder}: unreadable index or config ({e})") from None
        if CONFIG_KEY not in config and DIFFUSERS_CONFIG_KEY not in config:
            raise ModelSourceError(f"{config_path}: has no '{CONFIG_KEY}' section: not compressed by dfloat")
        return cls(folder, config, index)

    @property
    def weight_map(self) -> dict[str, str]:
        wm = self.index.get("weight_map") if isinstance(self.index, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise ModelSourceError(
                f"{self.folder / INDEX_NAME}: has no 'weight_map' of names to shard files; the index is damaged "
                "(compress the model again)"
            )
        return wm

    @property
    def shard_files(self) -> list[Path]:
        files = [self.folder / f for f in dict.fromkeys(self.weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelSourceError(f"{self.folder}: missing shard file(s): {', '.join(missing)}")
        return files

    def iter_shards(
        self, device: str | torch.device = "cpu", verify: bool = True
    ) -> Iterator[tuple[Path, dict[str, CompressedTensor], dict[str, torch.Tensor]]]:
        """Each shard's units and plain tensors; the names in a shard must be exactly the ones the index puts
        there (a dropped or renamed unit is an error, not a missing weight later)."""
        listed: dict[str, set[str]] = {}
        for name, file in self.weight_map.items():
            listed.setdefault(file, set()).add(name)
        for path in self.shard_files:
            units, plain = load_compressed_tensors(path, device=device, verify=verify)
            held = set(units) | set(plain)
            if held != listed[path.name]:
                lost = sorted(listed[path.name] - held)[:3]
                extra = sorted(held - listed[path.name])[:3]
                raise CorruptStreamError(
                    f"{path}: holds other tensors than {INDEX_NAME} lists for it (missing {lost}, unlisted "
                    f"{extra}); the folder is damaged or mixed from two checkpoints"
                )
            yield path, units, plain
