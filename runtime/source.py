"""Where a model comes from (a Hub id, a local folder, or an in-memory transformers model -> a local folder), and
which of its files are the weights: exactly the ones transformers' ``from_pretrained`` reads
(`read_weight_layout`), so compress, verify and transformers never disagree about what the model is."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from dfloat.errors import ModelSourceError
from dfloat.storage import parse_json

log = logging.getLogger(__name__)

# Files copied next to the compressed weights: everything a user needs to run the model, nothing that is weights.
SIDE_FILE_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.py", "*.jinja", "tokenizer*", "*.md")
WEIGHTS_NAME = "model.safetensors"
WEIGHT_INDEX = f"{WEIGHTS_NAME}.index.json"


def looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def public_name(source: str) -> str:
    """How a published model card names a source: a Hub id as it is, a local path by its last part only (no
    paths of the machine that made it)."""
    return source if looks_like_hub_id(source) else Path(source).expanduser().name or "a local model"


def local_folders(source) -> list[Path]:
    """``[source]`` when it names an existing local path (checked before any download), else ``[]``."""
    if isinstance(source, str | os.PathLike) and Path(source).expanduser().exists():
        return [Path(source).expanduser()]
    return []


def resolve_folder(
    source: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    allow_patterns: list[str] | None = None,
) -> tuple[Path, dict]:
    """A local folder holding the model, and where it came from ({"source", "revision"})."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"{path}: is a file, not a model folder")
        return path, {"source": str(source), "revision": None}
    if not looks_like_hub_id(str(source)):
        raise ModelSourceError(f"{source}: no such folder, and not a Hub id of the form 'owner/name'")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(str(source), revision=revision, token=token, allow_patterns=allow_patterns)
    except Exception as e:  # noqa: BLE001 - every Hub failure becomes one clear message
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelSourceError(
            f"{source}: cannot be fetched from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            + (
                "; HF_HUB_OFFLINE=1 is set, so only models already in the cache work"
                if offline
                else "; check the id and your network, set HF_HUB_OFFLINE=1 to use the local cache, or pass a local folder"
            )
        ) from None
    commit = Path(folder).name
    return Path(folder), {"source": str(source), "revision": revision or commit}


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (configs, indexes, model_index.json): one-line errors otherwise."""
    try:
        data = parse_json(path.read_bytes(), str(path), ModelSourceError)
    except OSError as e:
        raise ModelSourceError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path}: not a JSON object")
    return data


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelSourceError(f"{folder}: not a model folder (no config.json)")
    return read_json_object(path)


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a checkpoint, from its shard's header: nothing is read."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "BF16", "F32", ...
    file: Path


@dataclass
class WeightLayout:
    """The weights a loader reads from a folder: the shard files, in order, and every tensor's header entry."""

    folder: Path
    files: list[Path]
    tensors: dict[str, SourceTensor] = field(default_factory=dict)

    @property
    def tensor_file(self) -> dict[str, Path]:
        return {name: t.file for name, t in self.tensors.items()}


def shard_path(folder: Path, name: object, index: Path) -> Path:
    """A file named by an index, refused unless it is a relative path inside ``folder`` (no ``..``, not
    absolute): an index never makes a reader open a file elsewhere."""
    if not isinstance(name, str) or not name.strip() or name.endswith("/"):
        raise ModelSourceError(
            f"{index}: names a shard {name!r}, which is not a file name; the index is damaged"
        )
    if PurePosixPath(name).is_absolute() or Path(name).is_absolute() or ".." in PurePosixPath(name).parts:
        raise ModelSourceError(
            f"{index}: names the shard {name!r}, which is outside {folder}; refusing to read files outside the "
            "model folder"
        )
    return folder / name


def read_weight_index(index: Path) -> dict:
    """A safetensors index file (``{"metadata": ..., "weight_map": {tensor or unit name: shard file}}``),
    checked: ``weight_map`` maps names to relative file names inside the index's folder."""
    data = parse_json(index.read_bytes(), str(index), ModelSourceError)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelSourceError(
            f"{index}: has no 'weight_map' of names to shard files; the index is damaged (re-download or "
            "re-create the model)"
        )
    for file in dict.fromkeys(weight_map.values()):
        shard_path(index.parent, file, index)
    return data


def _scan(folder: Path, files: list[Path]) -> dict[str, SourceTensor]:
    """Every tensor in ``files`` from their headers; a name held by two files is refused (a loader would keep
    one of them silently, depending on the order it reads them in)."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, SourceTensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    if k in out:
                        raise ModelSourceError(
                            f"{folder}: tensor {k!r} is in both {out[k].file.name} and {path.name}; which one "
                            "a loader keeps depends on reading order, so dfloat refuses: remove the stray file "
                            "or fix the index"
                        )
                    s = f.get_slice(k)
                    out[k] = SourceTensor(k, tuple(s.get_shape()), s.get_dtype(), path)
        except (SafetensorError, OSError) as e:
            raise ModelSourceError(f"{path}: not a readable safetensors file ({e})") from None
    return out


def read_weight_layout(
    folder: Path, weights_name: str = WEIGHTS_NAME, index_first: bool = False
) -> WeightLayout:
    """Exactly the weights transformers' ``from_pretrained`` reads from a local folder: ``model.safetensors``
    when present, else the shards ``model.safetensors.index.json`` names. Other ``*.safetensors`` beside them
    are ignored, with a warning naming them.

    Args:
        weights_name: the single-file name; its index is ``{weights_name}.index.json`` (diffusers components:
            "diffusion_pytorch_model.safetensors").
        index_first: read the index when both exist (diffusers' rule) instead of the single file
            (transformers').
    Raises:
        ModelSourceError: no weights; an unreadable shard; an index that is damaged, names a missing file or a
            file outside the folder, or lists a tensor in a shard that does not hold it; a tensor name held by
            two shards.
    """
    single, index = folder / weights_name, folder / f"{weights_name}.index.json"
    if index.is_file() and (index_first or not single.is_file()):
        weight_map = read_weight_index(index)["weight_map"]
        if not weight_map:
            raise ModelSourceError(f"{index}: lists no tensors; the index is damaged")
        files = [shard_path(folder, f, index) for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelSourceError(f"{folder}: the index names missing shard(s) {', '.join(missing[:3])}")
    elif single.is_file():
        weight_map, files = {}, [single]
    else:
        present = sorted(p.name for p in folder.glob("*.safetensors"))
        bins = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
        hint = (
            f" (it has {', '.join(present[:3])}: other names, such as variants, are not read)"
            if present
            else " (only PyTorch .bin files: re-save with save_pretrained(..., safe_serialization=True))"
            if bins
            else ""
        )
        raise ModelSourceError(f"{folder}: no {weights_name} or {index.name}{hint}")
    ignored = sorted(p.name for p in folder.glob("*.safetensors") if p not in files)
    if ignored:
        read = index.name if weight_map else single.name
        log.warning("%s: reading %s, as transformers does; ignoring %s", folder, read, ", ".join(ignored))
    tensors = _scan(folder, files)
    for name, file in weight_map.items():
        held = tensors.get(name)
        if held is None or held.file != folder / file:
            where = f"{held.file.name} holds it" if held else "no shard holds it"
            raise ModelSourceError(f"{index}: lists {name!r} in {file}, but {where}; the index is damaged")
    return WeightLayout(folder, files, tensors)


def read_all_safetensors(folder: Path) -> WeightLayout:
    """Every ``*.safetensors`` file of a folder, as the official DFloat11 loader reads them (one file per unit,
    no index); a tensor name held by two files is refused."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelSourceError(f"{folder}: no *.safetensors weights")
    return WeightLayout(folder, files, _scan(folder, files))


def weight_files(folder: Path) -> list[Path]:
    """The shard files `read_weight_layout` reads, in index order."""
    return read_weight_layout(folder).files


def side_files(folder: Path) -> list[Path]:
    """Tokenizer, generation config and other small files to copy (not weights, not the weight index)."""
    out = []
    for pattern in SIDE_FILE_PATTERNS:
        for p in folder.glob(pattern):
            if p.is_file() and p.name not in (WEIGHT_INDEX, "config.json", "README.md") and p not in out:
                out.append(p)
    return sorted(out)
