"""Units in safetensors files: the header metadata, writing atomically, and reading with every check.

A file holds each unit's stored arrays as ``{unit}.{array}`` tensors beside any plain tensors, and a header with
the format name and version, the units' metadata as JSON, and the checksums of that JSON and of the plain tensors
(docs/FORMAT.md). Reading refuses other formats and newer major versions, and checks every array and the metadata
against their checksums while the file is read (`dfloat.integrity`).
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch

from dfloat.errors import (
    ChecksumError,
    CorruptStreamError,
    DFloatError,
    FormatVersionError,
    OutputWriteError,
    ShapeMismatchError,
)
from dfloat.format import (
    CODE_CANONICAL,
    FORMAT_NAME,
    FORMAT_VERSION,
    HUFFMAN_ARRAYS,
    INTEGRITY_MINOR,
    MODE_HUFFMAN,
    MODE_RAW,
    STORED_ARRAYS,
    CompressedTensor,
    Member,
    dtype_from_name,
    mark_trusted,
)
from dfloat.integrity import array_crc, array_crcs, check_checksums, check_code, check_structure, seal

# ---- files -------------------------------------------------------------------------------------------------------


def default_mode(directory: bool = False) -> int:
    """The permissions a plain open()/mkdir() would give under the current umask (temp files start private)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def parse_json(text: str | bytes, where: str, error: type[DFloatError] = CorruptStreamError):
    """JSON from a file or header, or ``error`` naming ``where``: malformed, too deeply nested or not UTF-8 text
    is one clear error, never a traceback from the decoder."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply to be read; the file is damaged") from None


def write_failure(path: str | os.PathLike, e: Exception) -> OutputWriteError:
    """A failed write (disk full, permissions) as one error naming the file; safetensors reports OS errors as
    ``SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")``."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split("I/O error: ")[-1]
    return OutputWriteError(f"{path}: cannot be written: {reason}")


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write through ``write(tmp_path)`` then rename, so a reader never sees half a file.

    Raises:
        OutputWriteError: the file could not be written (disk full, no permission); no temporary file is left.
    """
    from safetensors import SafetensorError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode())  # after writing: a writer may have replaced the (private) temp file
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OutputWriteError):
            raise
        raise write_failure(path, e) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- units in files ----------------------------------------------------------------------------------------------


def unit_tensors(name: str, ct: CompressedTensor) -> dict[str, torch.Tensor]:
    """The safetensors entries of one unit: ``{name}.{array}``."""
    return {f"{name}.{k}": t.detach().cpu().contiguous() for k, t in ct.stored_tensors().items()}


def unit_from_parts(
    meta: Mapping, arrays: Mapping[str, torch.Tensor], where: str = "unit"
) -> CompressedTensor:
    """Rebuild a unit from its metadata (`CompressedTensor.metadata`) and stored arrays, checking everything a
    decoder relies on."""
    try:
        members = tuple(
            Member(str(m["name"]), tuple(int(s) for s in m["shape"]), int(m["offset"]), int(m["crc32"]))
            for m in meta["members"]
        )
        numel = int(meta["numel"])
        mode = meta["mode"]
        dtype = dtype_from_name(meta["dtype"])
        crcs = meta.get("array_crc32")
        if crcs is not None:
            crcs = {str(k): int(v) for k, v in crcs.items()}
        sums = {"array_crc32": crcs, "meta_crc32": int(meta.get("meta_crc32", -1))}
        if mode == MODE_HUFFMAN:
            kind = meta.get("code_kind", CODE_CANONICAL)
            params = {
                "code_kind": kind,
                "bytes_per_window": int(meta["bytes_per_window"]),
                "windows_per_block": int(meta["windows_per_block"]),
                "max_code_length": int(meta["max_code_length"]),
            }
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptStreamError(f"{where}: metadata is incomplete or malformed ({e!r})") from None
    if mode == MODE_RAW:
        raw = _need(arrays, "raw", where)
        ct = CompressedTensor(
            mode=MODE_RAW, members=members, numel=numel, dtype=dtype, raw=raw.reshape(-1), **sums
        )
    elif mode == MODE_HUFFMAN:
        parts = {k: _need(arrays, k, where) for k in HUFFMAN_ARRAYS}
        code = _need(arrays, "code_lengths" if kind == CODE_CANONICAL else "luts", where)
        ct = CompressedTensor(
            mode=MODE_HUFFMAN,
            members=members,
            numel=numel,
            dtype=torch.bfloat16,
            code=code,
            **params,
            **sums,
            **{k: v.reshape(-1) for k, v in parts.items()},
        )
    else:
        raise CorruptStreamError(f"{where}: unknown unit mode {mode!r}")
    check_structure(ct, where)
    check_code(ct, where)
    return ct


def _need(arrays: Mapping[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in arrays:
        raise CorruptStreamError(f"{where}: stored array {key!r} is missing")
    return arrays[key]


def format_metadata(
    units: Mapping[str, CompressedTensor],
    extra: Mapping[str, str] | None = None,
    plain_crc32: Mapping[str, int] | None = None,
) -> dict[str, str]:
    units_json = json.dumps({n: ct.metadata() for n, ct in units.items()}, separators=(",", ":"))
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "units": units_json,
        "units_crc32": str(zlib.crc32(units_json.encode()) & 0xFFFFFFFF),
        "tensors_crc32": json.dumps(dict(plain_crc32 or {}), separators=(",", ":")),
    }
    meta.update(extra or {})
    return meta


def save_compressed_tensors(
    units: Mapping[str, CompressedTensor] | CompressedTensor,
    path: str | os.PathLike,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write units (and optional plain tensors) to one safetensors file, atomically.

    Args:
        units: ``{unit_name: CompressedTensor}``, or one CompressedTensor (stored as unit "tensor").
        path: the ``.safetensors`` file to write.
        extra_tensors: uncompressed tensors stored under their own names beside the units.
        metadata: extra string metadata for the file header.
    """
    from safetensors.torch import save_file

    if isinstance(units, CompressedTensor):
        units = {"tensor": units}
    units = {n: ct if ct.array_crc32 is not None else seal(ct) for n, ct in units.items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, ct in units.items():
        tensors.update(unit_tensors(name, ct))
    for name, t in (extra_tensors or {}).items():
        if name in tensors:
            raise ShapeMismatchError(f"tensor name {name!r} collides with a unit array")
        tensors[name] = t.detach().cpu().contiguous()
    plain_crc32 = array_crcs({n: tensors[n] for n in extra_tensors or {}})
    file_meta = format_metadata(units, metadata, plain_crc32)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=file_meta))


def check_version(meta: Mapping[str, str] | None, where: str) -> dict:
    if not meta or meta.get("format") != FORMAT_NAME:
        raise FormatVersionError(f"{where}: not a dfloat file (no 'format: dfloat' in its header)")
    version = str(meta.get("format_version", ""))
    major = version.split(".")[0]
    if major != FORMAT_VERSION.split(".")[0]:
        raise FormatVersionError(
            f"{where}: written with dfloat format {version}, this dfloat reads "
            f"{FORMAT_VERSION.split('.')[0]}.x; upgrade dfloat to read it"
        )
    if "units" not in meta:
        raise CorruptStreamError(f"{where}: unit metadata is unreadable (no 'units' entry in the header)")
    return parse_json(meta["units"], f"{where}: unit metadata")


def _file_checks(meta: Mapping[str, str], where: str) -> tuple[bool, dict[str, int] | None]:
    """(whether the file must carry checksums, the plain tensors' CRCs); checks the units JSON's own CRC."""
    try:
        minor = int(str(meta.get("format_version", "1.0")).split(".")[1])
    except (IndexError, ValueError):
        minor = 0
    required = minor >= INTEGRITY_MINOR
    if "units_crc32" not in meta:
        if required:
            raise ChecksumError(
                f"{where}: format {meta.get('format_version')} file without 'units_crc32'; damaged"
            )
        return False, None
    try:
        want = int(meta["units_crc32"])
        listed = parse_json(meta.get("tensors_crc32", "{}"), f"{where}: tensors_crc32", ChecksumError)
        plain = {str(k): int(v) for k, v in listed.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise ChecksumError(
            f"{where}: unreadable checksums in the header ({e}); the file is damaged"
        ) from None
    got = zlib.crc32(meta["units"].encode()) & 0xFFFFFFFF
    if got != want:
        raise ChecksumError(
            f"{where}: the unit list (names, members, parameters) has checksum {got:08x} != stored {want:08x}; "
            "the file header is damaged"
        )
    return True, plain


def load_compressed_tensors(
    path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[dict[str, CompressedTensor], dict[str, torch.Tensor]]:
    """Read a file written by `save_compressed_tensors`.

    Args:
        verify: check every stored array and the unit metadata against their checksums while reading (format
            1.1; CRC-32 on parallel threads). Units of older files are checked on their first decode instead.
            ``False`` skips both, for files verified once.
    Returns:
        ``(units, extra_tensors)``.
    Raises:
        FormatVersionError: not a dfloat file, or a newer incompatible format version.
        ChecksumError: ``verify`` and a stored array, the metadata or a plain tensor does not match its checksum.
        CorruptStreamError / ShapeMismatchError: arrays missing or inconsistent with the metadata.
    """
    from safetensors import SafetensorError, safe_open

    where = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}: no such file")
    read_on = "cpu" if verify else str(device)
    try:
        with safe_open(str(path), framework="pt", device=read_on) as f:
            header = f.metadata()
            units_meta = check_version(header, where)
            has_sums, plain_crcs = _file_checks(header, where) if verify else (False, None)
            crcs: dict[str, int] = {}
            if has_sums:  # checksum each array on a worker thread while the next one is read
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
                    arrays, futures = {}, {}
                    for k in f.keys():
                        arrays[k] = f.get_tensor(k)
                        futures[k] = pool.submit(array_crc, arrays[k])
                    crcs = {k: fut.result() for k, fut in futures.items()}
            else:
                arrays = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise CorruptStreamError(f"{where}: not a readable safetensors file ({e})") from None
    if not isinstance(units_meta, dict):
        raise CorruptStreamError(f"{where}: unit metadata is not a JSON object")
    units = {}
    for name, meta in units_meta.items():
        keys = {k: f"{name}.{k}" for k in STORED_ARRAYS if f"{name}.{k}" in arrays}
        parts = {k: arrays.pop(key) for k, key in keys.items()}
        unit_where = f"{where}: unit {name!r}"
        if has_sums and isinstance(meta, dict) and isinstance(meta.get("array_crc32"), dict):
            for k, key in keys.items():  # damaged bytes are named as such, before any structural complaint
                want = meta["array_crc32"].get(k)
                if want != crcs[key]:
                    shown = f"{want:08x}" if isinstance(want, int) else repr(want)
                    raise ChecksumError(
                        f"{unit_where}: array {k!r} checksum {crcs[key]:08x} != stored {shown}; "
                        "the compressed data is damaged"
                    )
        ct = unit_from_parts(meta, parts, where=unit_where)
        if not verify:
            mark_trusted(ct)
        elif has_sums:
            if ct.array_crc32 is None:
                raise ChecksumError(f"{unit_where}: no checksums stored in a file that has them; damaged")
            check_checksums(ct, unit_where, {k: crcs[key] for k, key in keys.items()}, file_meta=meta)
            mark_trusted(ct)
        units[name] = ct
    if has_sums:
        if set(plain_crcs) != set(arrays):
            extra = sorted(set(arrays) - set(plain_crcs))[:3]
            lost = sorted(set(plain_crcs) - set(arrays))[:3]
            raise ChecksumError(
                f"{where}: the tensors in the file do not match the ones it lists "
                f"(unlisted: {extra}, missing: {lost}); the file is damaged"
            )
        for k, want in plain_crcs.items():
            if crcs[k] != want:
                raise ChecksumError(
                    f"{where}: tensor {k!r} checksum {crcs[k]:08x} != stored {want:08x}; the file is damaged"
                )
    if read_on != str(device) and torch.device(device).type != "cpu":
        units = {n: ct.to(device) for n, ct in units.items()}
        arrays = {k: t.to(device) for k, t in arrays.items()}
    return units, arrays
