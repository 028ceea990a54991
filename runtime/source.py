"""Where a model comes from: a Hub id, a local folder, or an in-memory transformers model -> a local folder."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dfloat.errors import ModelSourceError

log = logging.getLogger(__name__)

# Files copied next to the compressed weights: everything a user needs to run the model, nothing that is weights.
SIDE_FILE_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.py", "*.jinja", "tokenizer*", "*.md")
WEIGHT_INDEX = "model.safetensors.index.json"


def looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


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


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelSourceError(f"{folder}: not a model folder (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelSourceError(f"{path}: not valid JSON ({e})") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors shards of a checkpoint, in index order when there is an index."""
    index = folder / WEIGHT_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("'weight_map' is not an object")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelSourceError(f"{index}: unreadable index (no usable {e}); re-download the model") from None
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise ModelSourceError(f"{folder}: the index names missing shard(s) {', '.join(missing[:3])}")
        return [folder / f for f in files]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
        hint = (
            " (only PyTorch .bin files: re-save with save_pretrained(..., safe_serialization=True))"
            if bins
            else ""
        )
        raise ModelSourceError(f"{folder}: no *.safetensors weights{hint}")
    return files


def side_files(folder: Path) -> list[Path]:
    """Tokenizer, generation config and other small files to copy (not weights, not the weight index)."""
    out = []
    for pattern in SIDE_FILE_PATTERNS:
        for p in folder.glob(pattern):
            if p.is_file() and p.name not in (WEIGHT_INDEX, "config.json", "README.md") and p not in out:
                out.append(p)
    return sorted(out)
