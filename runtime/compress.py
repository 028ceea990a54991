"""compress_model / decompress_model: whole checkpoints, streamed unit by unit, written atomically and verified."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dfloat.codec import compress_tensors
from dfloat.errors import (
    ChecksumError,
    DFloatError,
    ModelSourceError,
    UnsupportedDtypeError,
)
from dfloat.format import (
    DEFAULT_BYTES_PER_WINDOW,
    DEFAULT_MAX_CODE_LENGTH,
    DEFAULT_WINDOWS_PER_BLOCK,
    FORMAT_VERSION,
)
from dfloat.integrity import check_members
from dfloat.runtime import output
from dfloat.runtime import source as src
from dfloat.runtime.checkpoint import (
    CONFIG_KEY,
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_NAME,
    LEGACY_INDEX_NAME,
    CompressedCheckpoint,
    ShardWriter,
)
from dfloat.runtime.grouping import UNIT_KINDS, Grouping, grouping_from, plan_units
from dfloat.storage import atomic_write

log = logging.getLogger(__name__)

_FLOAT_DTYPES = {"F16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


@dataclass
class CompressionReport:
    out_dir: str
    units: int
    coded_units: int
    weights: int
    original_bytes: int
    stored_bytes: int
    seconds: float

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.original_bytes if self.original_bytes else 1.0

    @property
    def bits_per_weight(self) -> float:
        return 16 * self.ratio

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "bits_per_weight": self.bits_per_weight}


ProgressFn = Callable[[str, int, int, int], None]  # (unit, done, total, weights in the unit)


def _check_lossless(config: dict, tensors: list[src.SourceTensor], folder: Path, unit_of: Grouping) -> None:
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise UnsupportedDtypeError(
            f"{folder}: the model is {method}-quantized; its weights are not BF16, and coding them as BF16 would "
            "not reproduce them. dfloat compresses BF16 checkpoints only."
        )
    # weights a unit would hold were they BF16 (a float32 buffer saved with the weights stays plain, as is)
    bad = [t for t in tensors if t.dtype in _FLOAT_DTYPES and unit_of(t.name, t.shape) is not None]
    if bad:
        dtypes = sorted({t.dtype for t in bad})
        raise UnsupportedDtypeError(
            f"{folder}: weights are {'/'.join(dtypes)} (e.g. {bad[0].name}), not BF16. dfloat is lossless only for "
            "BF16: casting them to BF16 would round away bits, so nothing is cast silently. Load the model with "
            "dtype=torch.bfloat16 and save_pretrained it first if BF16 is what you want to serve."
        )


# The Auto class of a task head, from the class name's ending, when that decides it (no transformers import: a
# CausalLM is the common case, and compressing needs no transformers otherwise).
_CARD_AUTO_BY_SUFFIX = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
)
# Otherwise transformers' own mappings, most specific task first: the first that lists an architecture.
_CARD_AUTO_BY_MAPPING = (
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForImageTextToText", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)


def card_auto_class(config: dict) -> str:
    """The transformers Auto class that loads this checkpoint's architecture (AutoModelForCausalLM for a
    LlamaForCausalLM or a research architecture's ...ForCausalLM, AutoModel for a BertModel)."""
    archs = config.get("architectures") or []
    for suffix, auto in _CARD_AUTO_BY_SUFFIX:
        if any(a.endswith(suffix) for a in archs):
            return auto
    from transformers.models.auto import modeling_auto

    for auto, mapping in _CARD_AUTO_BY_MAPPING:
        names = getattr(modeling_auto, mapping, {})
        listed = {n for v in names.values() for n in (v if isinstance(v, list | tuple) else (v,))}
        if listed.intersection(archs):
            return auto
    return "AutoModel"


def _model_card(report: CompressionReport, origin: dict, config: dict, out_dir: Path) -> str:
    """README.md of a compressed folder. It names the source by its Hub id, or a local folder by its name only
    (a card is published with the model: no paths of the machine that made it)."""
    source = src.public_name(origin["source"])
    arch = ", ".join(config.get("architectures") or [config.get("model_type", "model")])
    auto = card_auto_class(config)
    revision = f" (revision `{origin['revision']}`)" if origin.get("revision") else ""
    return f"""---
tags: [dfloat, lossless, bf16]
---
# {Path(source).name} (dfloat, lossless)

Losslessly compressed copy of `{source}`{revision}
({arch}) made with [dfloat](https://github.com/dfloat) {FORMAT_VERSION}: BF16 exponents Huffman-coded, sign and
mantissa kept, so every weight decodes bit-identical to the original.

| | bytes |
|---|---|
| original weights | {report.original_bytes:,} |
| stored | {report.stored_bytes:,} ({100 * report.ratio:.2f}% of BF16, {report.bits_per_weight:.2f} bits/weight) |

```python
from transformers import {auto}  # with `pip install dfloat`; no import of dfloat needed
model = {auto}.from_pretrained("{out_dir.name}")  # this folder, or its Hub id
```
"""


def _resolve_source(source, revision, token, stack: list[tempfile.TemporaryDirectory]) -> tuple[Path, dict]:
    if isinstance(source, torch.nn.Module):
        if not hasattr(source, "save_pretrained"):
            raise ModelSourceError("an in-memory source must be a transformers PreTrainedModel")
        dtypes = {p.dtype for p in source.parameters() if p.ndim >= 2 and p.is_floating_point()}
        if dtypes - {torch.bfloat16}:
            raise UnsupportedDtypeError(
                f"the in-memory model has {sorted(map(str, dtypes))} weights, not BF16; casting would not be "
                "lossless. Load it with dtype=torch.bfloat16 first."
            )
        tmp = tempfile.TemporaryDirectory(prefix="dfloat-src-")
        stack.append(tmp)
        source.save_pretrained(tmp.name, safe_serialization=True)
        name = getattr(source.config, "_name_or_path", "") or type(source).__name__
        return Path(tmp.name), {"source": str(name), "revision": None}
    return src.resolve_folder(source, revision=revision, token=token)


def _official_to_bf16(folder: Path, config: dict, stack: list[tempfile.TemporaryDirectory]) -> Path:
    """An official DFloat11 checkpoint decoded into a temporary BF16 folder (held in memory while written).
    The official format stores no checksums; the dfloat checkpoint made from it is verified against this folder."""
    from safetensors.torch import save_file

    from dfloat.codec import decompress_tensor
    from dfloat.runtime.empty_model import build_empty_model
    from dfloat.runtime.official import read_official

    units, tensors = read_official(folder, config, build_empty_model(folder, None, {}))
    for ct in units.values():
        flat = decompress_tensor(ct, device="cpu").reshape(-1)
        tensors.update({k: v.clone() for k, v in ct.split(flat).items()})
    tmp = tempfile.TemporaryDirectory(prefix="dfloat-df11-")
    stack.append(tmp)
    out = Path(tmp.name)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "dfloat11_config"}, indent=2) + "\n"
    )
    for f in src.side_files(folder):
        shutil.copy2(f, out / f.name)
    log.info("decoded official DFloat11 checkpoint %s (%d units)", folder, len(units))
    return out


def compress_model(
    source,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    verify: bool = True,
    grouping: Grouping | Mapping[str, str] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    workers: int | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    bytes_per_window: int = DEFAULT_BYTES_PER_WINDOW,
    windows_per_block: int = DEFAULT_WINDOWS_PER_BLOCK,
    max_code_length: int = DEFAULT_MAX_CODE_LENGTH,
    allow_raw: bool = True,
    progress: ProgressFn | None = None,
    unit: str = "block",
    verify_progress: ProgressFn | None = None,
    config_from: str | os.PathLike | None = None,
) -> CompressionReport:
    """Compress a BF16 checkpoint losslessly into ``out_dir``.

    Args:
        source: a Hub id ("owner/name"), a local folder of safetensors, an official DFloat11 checkpoint
            (decoded and coded again as dfloat, verified byte for byte against the decoded weights), an
            in-memory transformers model, or a diffusers pipeline or model folder (compressed component by
            component: `dfloat.runtime.pipeline`).
        out_dir: the folder to create. Written to a work folder beside it and renamed when complete and
            verified (runtime/output.py); an existing folder is refused unless ``overwrite``, also one that
            appears during the run, and so is a folder that is, holds or sits inside the source.
        verify: decode every unit after writing and check it against the checksums of the original bytes.
        grouping: override which tensors share a code (see `dfloat.runtime.grouping.grouping_from`).
        revision, token: for Hub ids.
        workers: threads for the codec (default: all cores).
        max_shard_bytes: size of output shards.
        bytes_per_window, windows_per_block, max_code_length: stream parameters (docs/FORMAT.md).
        allow_raw: store units raw when tiny or when coding would not shrink them (False codes every unit).
        progress: called after each unit is coded, as ``progress(unit, done, total, weights)``.
        unit: what shares one code: "block" (default: the weights of each transformer block; embeddings and
            lm_head alone) or "matrix" (every weight alone: the decode buffer then holds one matrix, the leanest
            memory at run time, for a slightly larger stored size). ``grouping`` overrides either.
        verify_progress: called likewise after each unit or tensor is checked (``verify``); raising from
            either callback (KeyboardInterrupt) stops the run and leaves nothing behind.
        config_from: for an official DFloat11 diffusion checkpoint (no model config of its own): the original
            model's folder or Hub id whose diffusers config.json describes it
            (`dfloat.runtime.official_diffusion`).
    Returns:
        A CompressionReport with sizes and timing.
    Raises:
        ModelSourceError (also: the output is, holds or sits inside the source), UnsupportedDtypeError (not
        BF16), OutputExistsError (also when it appears during the run), OutputWriteError (disk full),
        ChecksumError.
    """
    t0 = time.perf_counter()
    if unit not in UNIT_KINDS:
        raise DFloatError(f"unit={unit!r}: choose one of {', '.join(UNIT_KINDS)}")
    out_dir = output.check_target(out_dir, overwrite, sources=src.local_folders(source))
    if workers:
        import numba

        numba.set_num_threads(max(1, min(workers, numba.config.NUMBA_NUM_THREADS)))
    stack: list[tempfile.TemporaryDirectory] = []
    try:
        from dfloat.runtime import pipeline

        if pipeline.is_local_file(source):  # an official DFloat11 single file (ComfyUI), or an error below
            folder, origin = Path(source).expanduser(), {"source": str(source), "revision": None}
        else:
            folder, origin = _resolve_source(source, revision, token, stack)
        output.check_target(out_dir, overwrite, sources=[folder])
        if pipeline.diffusion_layout(folder):  # a diffusers pipeline or model: component by component
            options = dict(workers=workers, max_shard_bytes=max_shard_bytes, allow_raw=allow_raw)
            options.update(bytes_per_window=bytes_per_window, windows_per_block=windows_per_block)
            options.update(max_code_length=max_code_length, unit=unit, progress=progress)
            options.update(config_from=config_from, grouping=grouping, verify_progress=verify_progress)
            return pipeline.compress_diffusers(
                folder, out_dir, origin, overwrite=overwrite, verify=verify, **options
            )
        if folder.is_file():
            raise ModelSourceError(f"{folder}: is a file, not a model folder (nor a DFloat11 single file)")
        config = src.read_config(folder)
        if CONFIG_KEY in config:
            raise ModelSourceError(f"{folder}: is already compressed")
        official = "dfloat11_config" in config
        if official:  # an official DFloat11 checkpoint: decode it, then code it as dfloat (with checksums)
            folder = _official_to_bf16(folder, config, stack)
            config = src.read_config(folder)
        tensors = list(src.read_weight_layout(folder).tensors.values())
        unit_of = grouping_from(grouping) if grouping is not None else UNIT_KINDS[unit]
        _check_lossless(config, tensors, folder, unit_of)
        plan = plan_units(((t.name, t.shape, t.dtype) for t in tensors), unit_of)
        options = dict(
            bytes_per_window=bytes_per_window,
            windows_per_block=windows_per_block,
            max_code_length=max_code_length,
            allow_raw=allow_raw,
        )
        with output.building(out_dir, overwrite) as tmp:
            report = _write(
                folder, tensors, plan, tmp, out_dir, origin, config, max_shard_bytes, progress, options
            )
            if verify:
                verify_checkpoint(tmp, against=folder if official else None, progress=verify_progress)
    finally:
        for t in stack:
            t.cleanup()
    return finish_report(report, origin, out_dir, t0)


def finish_report(report: CompressionReport, origin: dict, out_dir: Path, t0: float) -> CompressionReport:
    """Time the report and log the one line a finished compression gets (models and pipelines alike)."""
    report.seconds = time.perf_counter() - t0
    log.info(
        "compressed %s -> %s: %.2f%% of BF16 in %.1fs",
        origin["source"],
        out_dir,
        100 * report.ratio,
        report.seconds,
    )
    return report


def _write(folder, tensors, plan, tmp, out_dir, origin, config, max_shard_bytes, progress, options):
    from safetensors import safe_open

    by_name = {t.name: t for t in tensors}
    in_unit = {n for names in plan.values() for n in names}
    # Work shard by shard: a unit is coded once the last shard holding one of its tensors is reached.
    file_order = {p: i for i, p in enumerate(dict.fromkeys(t.file for t in tensors))}
    order = sorted(plan, key=lambda u: max(file_order[by_name[n].file] for n in plan[u]))
    writer = ShardWriter(tmp, max_shard_bytes)

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        """Copies of the named tensors; each source file is mapped only while it is read, so the resident
        memory holds one unit, not the shards."""
        out = {}
        for path in dict.fromkeys(by_name[n].file for n in names):
            with safe_open(str(path), framework="pt") as f:
                out.update({n: f.get_tensor(n) for n in names if by_name[n].file == path})
        return {n: out[n] for n in names}

    for t, v in read([t.name for t in tensors if t.name not in in_unit]).items():  # plain tensors: small
        writer.add_plain(t, v)
    report = CompressionReport(str(out_dir), len(plan), 0, 0, 0, 0, 0.0)
    for i, unit in enumerate(order):
        members = read(plan[unit])
        ct = compress_tensors(members, **options)
        del members
        writer.add_unit(unit, ct)
        report.coded_units += ct.is_coded
        report.weights += ct.numel
        report.original_bytes += ct.original_nbytes
        report.stored_bytes += ct.nbytes
        if progress:
            progress(unit, i + 1, len(order), ct.numel)
    index = writer.close(
        {
            "format_version": FORMAT_VERSION,
            "weights": report.weights,
            "original_bytes": report.original_bytes,
            "stored_bytes": report.stored_bytes,
        }
    )
    for f in src.side_files(folder):
        shutil.copy2(f, tmp / f.name)
    config = dict(config)
    config[CONFIG_KEY] = {
        "format_version": FORMAT_VERSION,
        **{k: v for k, v in options.items() if k != "allow_raw"},
        "source": origin["source"],
        "revision": origin.get("revision"),
        "units": report.units,
        "weights": report.weights,
        "original_bytes": report.original_bytes,
        "stored_bytes": report.stored_bytes,
        "shards": len(set(index["weight_map"].values())),
    }
    # transformers integration (runtime/hf_quantizer.py): the quant method routes `from_pretrained` to dfloat's
    # quantizer, which points transformers at the index (its name ends in .safetensors.index.json, as required).
    config["quantization_config"] = {"quant_method": "dfloat", "format_version": FORMAT_VERSION}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "README.md").write_text(_model_card(report, origin, config, out_dir))
    return report


def _shards_for_verify(ckpt: CompressedCheckpoint, problems: list[str]):
    """Each shard read with its checksums checked; a shard that fails them is recorded and read again without,
    so every damaged unit is named, not just the first."""
    from dfloat.errors import DFloatError
    from dfloat.integrity import check_checksums
    from dfloat.storage import load_compressed_tensors

    for path in ckpt.shard_files:
        try:
            units, plain = load_compressed_tensors(path, verify=True)
        except DFloatError as e:
            problems.append(f"{path.name}: {e}")
            try:
                units, plain = load_compressed_tensors(path, verify=False)
            except DFloatError:
                continue
            for uname, ct in units.items():
                try:
                    check_checksums(ct, f"unit {uname}")
                except DFloatError as e2:
                    problems.append(f"{path.name}: {e2}")
        yield path, units, plain


def verify_checkpoint(
    folder: str | os.PathLike,
    against: str | os.PathLike | None = None,
    backend: str | None = None,
    progress: ProgressFn | None = None,
) -> list[str]:
    """Decode every unit and compare with the stored checksums (and, with ``against``, with the original
    checkpoint's tensors byte for byte, read by the rule `compress_model` reads it by:
    `dfloat.runtime.source.read_weight_layout`).

    Args:
        backend: the decoder to check with (default: the fastest here); one that cannot run here is refused
            before anything is decoded.
        progress: called after each unit or plain tensor as ``progress(name, done, total, weights)``.
    Returns:
        The problems found (none).
    Raises:
        ChecksumError: listing every problem found; BackendUnavailableError; ModelSourceError.
    """
    from dfloat.codec import decompress_tensor
    from dfloat.integrity import crc32_of
    from dfloat.runtime import pipeline

    dev = "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
    if backend is not None:
        from dfloat.kernels.registry import resolve

        resolve(backend, dev)
    against_diffusers = against is not None and pipeline.diffusion_layout(Path(against)) in (
        "pipeline",
        "model",
    )
    if pipeline.diffusion_layout(Path(folder)) == "pipeline" or against_diffusers:  # diffusers' weight names
        return pipeline.verify_diffusers(Path(folder), Path(against) if against else None, backend, progress)
    ckpt = CompressedCheckpoint.open(folder)
    original = None
    if against is not None:
        afolder, _ = src.resolve_folder(against)
        original = src.read_weight_layout(afolder).tensors
    problems: list[str] = []
    seen: set[str] = set()
    total, done = len(ckpt.weight_map), 0

    def report(name: str, weights: int) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(name, done, total, weights)

    def compare(name: str, got: torch.Tensor) -> None:
        seen.add(name)
        if original is None:
            return
        if name not in original:
            problems.append(f"{name}: not in the original checkpoint")
            return
        from safetensors import safe_open

        with safe_open(str(original[name].file), framework="pt") as f:
            want = f.get_tensor(name)
        if want.dtype != got.dtype or want.shape != got.shape or crc32_of(want) != crc32_of(got):
            problems.append(
                f"{name}: differs from the original ({want.dtype}{list(want.shape)} vs "
                f"{got.dtype}{list(got.shape)})"
            )

    for path, units, plain in _shards_for_verify(ckpt, problems):
        for uname, ct in units.items():
            try:
                flat = decompress_tensor(ct, device=dev, backend=backend, check=True).reshape(-1).cpu()
                for m in ct.members:
                    view = flat[m.offset : m.offset + m.numel]
                    if m.crc32 >= 0 and crc32_of(view) != m.crc32:
                        problems.append(f"{path.name}: unit {uname}: tensor {m.name} fails its checksum")
                    compare(m.name, view.view(m.shape))
            except Exception as e:  # noqa: BLE001 - a corrupt unit is reported, the rest still checked
                problems.append(f"{path.name}: unit {uname}: {e}")
            report(uname, ct.numel)
        for name, t in plain.items():
            compare(name, t)
            report(name, t.numel())
    if original is not None:
        problems += [f"{n}: missing from the compressed checkpoint" for n in original if n not in seen]
    if problems:
        raise ChecksumError(f"{folder}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return problems


def decompress_model(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write the original BF16 checkpoint back (tensors byte-identical to the source's), atomically: as
    `compress_model`, an existing ``out_dir`` is refused unless ``overwrite``, also one that appears during the
    run, and so is one that is, holds or sits inside the source."""
    from safetensors.torch import save_file

    from dfloat.codec import decompress_tensor

    out_dir = output.check_target(out_dir, overwrite, sources=src.local_folders(source))
    folder, _ = src.resolve_folder(source)
    from dfloat.runtime import pipeline

    if pipeline.diffusion_layout(folder) in ("pipeline", "model"):  # diffusers' weight names again
        return pipeline.decompress_diffusers(folder, out_dir, overwrite=overwrite)
    ckpt = CompressedCheckpoint.open(folder)
    output.check_target(out_dir, overwrite, sources=[folder])
    with output.building(out_dir, overwrite) as tmp:
        written: list[tuple[Path, list[str], int]] = []
        pending: dict[str, torch.Tensor] = {}

        def flush() -> None:
            if pending:
                path = tmp / f".part-{len(written) + 1:05d}.safetensors"
                atomic_write(path, lambda part: save_file(pending, part, metadata={"format": "pt"}))
                written.append(
                    (path, list(pending), sum(t.numel() * t.element_size() for t in pending.values()))
                )
                pending.clear()

        for _, units, plain in ckpt.iter_shards():
            tensors = dict(plain)
            for ct in units.values():
                check_members(ct, flat := decompress_tensor(ct, device="cpu").reshape(-1))
                tensors.update({k: v.clone() for k, v in ct.split(flat).items()})
            for name, t in tensors.items():
                if (
                    pending
                    and sum(x.numel() * x.element_size() for x in pending.values())
                    + t.numel() * t.element_size()
                    > max_shard_bytes
                ):
                    flush()
                pending[name] = t
        flush()
        n = len(written)
        names = (
            [src.WEIGHTS_NAME]
            if n == 1
            else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        )
        for (path, _, _), name in zip(written, names):
            os.replace(path, tmp / name)
        if n > 1:
            weight_map = {k: name for (_, keys, _), name in zip(written, names) for k in keys}
            (tmp / src.WEIGHT_INDEX).write_text(
                json.dumps(
                    {"metadata": {"total_size": sum(w[2] for w in written)}, "weight_map": weight_map},
                    indent=2,
                )
                + "\n"
            )
        for f in src.side_files(folder):
            if f.name not in (INDEX_NAME, LEGACY_INDEX_NAME):
                shutil.copy2(f, tmp / f.name)
        config = {k: v for k, v in ckpt.config.items() if k not in (CONFIG_KEY, "quantization_config")}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
