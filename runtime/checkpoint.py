"""A compressed checkpoint folder: shards of units and plain tensors, an index, config.json with a "dfloat" section.

config.json                       the model's config + "dfloat": {format_version, parameters, source, sizes}
dfloat.safetensors.index.json     {"metadata": {...}, "weight_map": {unit or tensor name: shard file}}; the one
                                  index, read by dfloat and by transformers' from_pretrained (runtime/hf_quantizer.py)
dfloat-00001-of-0000N.safetensors units ("{unit}.{array}") and plain tensors, metadata per docs/FORMAT.md
tokenizer / generation files      copied from the source

Folders written before the index had one name carry ``dfloat.index.json`` (alone, or beside a copy under the name
above): they still load, and when both are there they must agree. A diffusers model, and every compressed
component of a diffusers pipeline, names its shards ``diffusion_pytorch_model-0000i-of-0000N.safetensors`` and
carries a copy of the index as ``diffusion_pytorch_model.safetensors.index.json`` (runtime/pipeline.py): the names
diffusers reads and downloads; a folder fetched from the Hub by diffusers holds only that copy, which is then read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dfloat.errors import CorruptStreamError, ModelSourceError
from dfloat.format import CompressedTensor
from dfloat.runtime import source as src
from dfloat.storage import check_version, load_compressed_tensors, save_compressed_tensors

INDEX_NAME = "dfloat.safetensors.index.json"  # transformers accepts names ending in .safetensors.index.json
LEGACY_INDEX_NAME = "dfloat.index.json"  # older folders: alone, or beside a copy named INDEX_NAME
DIFFUSERS_INDEX = (
    "diffusion_pytorch_model.safetensors.index.json"  # a copy, read by diffusers (runtime/pipeline.py)
)
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
    """A dfloat checkpoint: its index, or (a diffusers pipeline's component as the Hub and diffusers' downloader
    serve it: only files named as diffusers names weights are fetched) the index's copy under diffusers' name
    beside a config.json with a dfloat section."""
    if (folder / INDEX_NAME).is_file() or (folder / LEGACY_INDEX_NAME).is_file():
        return True
    return (folder / DIFFUSERS_INDEX).is_file() and _has_dfloat_section(folder / "config.json")


def _has_dfloat_section(config: Path) -> bool:
    try:
        data = json.loads(config.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (CONFIG_KEY in data or DIFFUSERS_CONFIG_KEY in data)


def folder_of_shards(files) -> Path:
    """The compressed folder that the shard files a library resolved from its index (transformers' and diffusers'
    quantizers get these) lie in; refused when they are not all in one compressed folder (an index entry with
    ``..`` or an absolute path): dfloat never reads shards from elsewhere."""
    folders = {Path(f).parent for f in files}
    if len(folders) != 1 or not is_compressed_folder(next(iter(folders))):
        shown = ", ".join(sorted(map(str, files))[:3])
        raise ModelSourceError(
            f"dfloat: the index names shard files outside the checkpoint folder ({shown}); refusing to read them"
        )
    return folders.pop()


def read_index(folder: Path) -> tuple[Path, dict]:
    """(the index file, its content) of a compressed folder. Copies of it beside it (the legacy name in older
    folders, the name diffusers reads in a diffusers model) must say the same, or the folder is refused: dfloat,
    transformers and diffusers would read different checkpoints."""
    index, legacy, diffusers = folder / INDEX_NAME, folder / LEGACY_INDEX_NAME, folder / DIFFUSERS_INDEX
    path = next((f for f in (index, legacy) if f.is_file()), diffusers)  # diffusers': a Hub download (above)
    content = src.read_weight_index(path)
    for copy in (legacy, diffusers):
        if copy != path and copy.is_file() and src.read_weight_index(copy) != content:
            raise ModelSourceError(
                f"{folder}: {path.name} and {copy.name} list different shards or tensors; the folder is damaged or "
                "mixed from two checkpoints (compress the model again)"
            )
    return path, content


@dataclass
class CompressedCheckpoint:
    """Read side of a compressed folder."""

    folder: Path
    config: dict
    index: dict
    index_path: Path | None = None

    @classmethod
    def open(cls, folder: str | os.PathLike) -> CompressedCheckpoint:
        folder = Path(folder)
        if not (folder / "config.json").is_file() or not is_compressed_folder(folder):
            raise ModelSourceError(f"{folder}: not a dfloat checkpoint (needs config.json and {INDEX_NAME})")
        config = src.read_config(folder)
        if CONFIG_KEY not in config and DIFFUSERS_CONFIG_KEY not in config:
            raise ModelSourceError(
                f"{folder / 'config.json'}: has no '{CONFIG_KEY}' section: not compressed by dfloat"
            )
        index_path, index = read_index(folder)
        return cls(folder, config, index, index_path)

    @property
    def weight_map(self) -> dict[str, str]:
        return self.index["weight_map"]

    @property
    def shard_files(self) -> list[Path]:
        index = self.index_path or self.folder / INDEX_NAME
        files = [src.shard_path(self.folder, f, index) for f in dict.fromkeys(self.weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelSourceError(f"{self.folder}: missing shard file(s): {', '.join(missing)}")
        return files

    def iter_shards(
        self, device: str | torch.device = "cpu", verify: bool = True
    ) -> Iterator[tuple[Path, dict[str, CompressedTensor], dict[str, torch.Tensor]]]:
        """Each shard's units and plain tensors; the names in a shard must be exactly the ones the index puts
        there (a dropped or renamed unit is an error, not a missing weight later)."""
        listed: dict[Path, set[str]] = {}
        for name, file in self.weight_map.items():
            listed.setdefault(self.folder / file, set()).add(name)
        for path in self.shard_files:
            units, plain = load_compressed_tensors(path, device=device, verify=verify)
            held = set(units) | set(plain)
            if held != listed[path]:
                lost = sorted(listed[path] - held)[:3]
                extra = sorted(held - listed[path])[:3]
                index = (self.index_path or self.folder / INDEX_NAME).name
                raise CorruptStreamError(
                    f"{path}: holds other tensors than {index} lists for it (missing {lost}, unlisted "
                    f"{extra}); the folder is damaged or mixed from two checkpoints"
                )
            yield path, units, plain


def describe_unit_layout(folder: str | os.PathLike) -> dict:
    """{unit: [member names]} of a compressed folder, read from its shard headers."""
    from safetensors import safe_open

    out = {}
    for path in CompressedCheckpoint.open(folder).shard_files:
        with safe_open(str(path), framework="pt") as f:
            units = check_version(f.metadata(), str(path))
        try:
            out.update({u: [m["name"] for m in meta["members"]] for u, meta in units.items()})
        except (AttributeError, KeyError, TypeError) as e:
            raise ModelSourceError(f"{path}: malformed unit metadata ({e!r}); the file is damaged") from None
    return out
