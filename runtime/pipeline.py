"""Diffusers checkpoints, compressed component by component: a pipeline folder or one diffusers model.

A pipeline folder holds a subfolder per component (model_index.json names them). Every component whose weights
are BF16 is compressed: diffusers models (transformer, unet, vae; ``diffusion_pytorch_model.safetensors``)
with the units of `dfloat.runtime.diffusers_units`, transformers models (text encoders; ``model.safetensors``)
as language models are. Everything else (tokenizers, schedulers, a VAE stored in float32) is copied as it is.
The result is again a pipeline folder, which ``DiffusionPipeline.from_pretrained`` loads through the
quantizers of both libraries (runtime/diffusers_quantizer.py, runtime/hf_quantizer.py).

A compressed diffusers model is a dfloat checkpoint (runtime/checkpoint.py) with one more copy of its index,
``diffusion_pytorch_model.safetensors.index.json``: the name diffusers reads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dfloat.errors import ModelSourceError
from dfloat.runtime import memory, output
from dfloat.runtime import source as src
from dfloat.runtime.checkpoint import CONFIG_KEY, DIFFUSERS_CONFIG_KEY, DIFFUSERS_INDEX, INDEX_NAME
from dfloat.runtime.compress import CompressionReport, finish_report
from dfloat.runtime.grouping import UNIT_KINDS, plan_units

log = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"  # what diffusers models name their weights
TRANSFORMERS_WEIGHTS = "model"
_FLOAT = {"BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


@dataclass
class PipelineReport(CompressionReport):
    """A CompressionReport over the compressed components, and what became of each component."""

    components: dict[str, str] = field(default_factory=dict)  # name -> "compressed ..." / "copied: why"


def is_diffusers_config(config: dict) -> bool:
    """A diffusers model's config.json (diffusers writes the class name into it)."""
    return "_class_name" in config and "dfloat11_config" not in config


def diffusion_layout(path: Path) -> str | None:
    """What kind of diffusion checkpoint ``path`` is: "pipeline" (model_index.json), "model" (a diffusers
    model: its config.json and weights as diffusers names them), "official" (an official DFloat11
    diffusers-naming folder), "comfyui" (an official DFloat11 single file), or None (not a diffusion
    checkpoint)."""
    from dfloat.runtime import official_diffusion

    if path.is_file():
        return "comfyui" if official_diffusion.is_comfyui_file(path) else None
    if (path / MODEL_INDEX).is_file():
        return "pipeline"
    config = path / "config.json"
    named = (path / f"{DIFFUSERS_WEIGHTS}.safetensors").is_file() or (path / DIFFUSERS_INDEX).is_file()
    if named and config.is_file() and is_diffusers_config(src.read_json_object(config)):
        return "model"
    if official_diffusion.is_official_diffusion(path):
        return "official"
    return None


def is_local_file(source) -> bool:
    """A path to an existing file (a ComfyUI single-file checkpoint is not a folder)."""
    return isinstance(source, (str, os.PathLike)) and Path(source).expanduser().is_file()


def weight_layout(folder: Path, basename: str) -> src.WeightLayout:
    """The weights the model's library reads from its folder (`dfloat.runtime.source.read_weight_layout`): for
    a diffusers model the shards ``{basename}.safetensors.index.json`` names, else ``{basename}.safetensors``
    (diffusers' order); for a transformers model the single file first (transformers' order). Other files
    (variants such as ``{basename}.fp16.safetensors``, leftovers) are not read; a tensor name in two of the
    files read is refused."""
    return src.read_weight_layout(
        folder, f"{basename}.safetensors", index_first=basename == DIFFUSERS_WEIGHTS
    )


def weight_files(folder: Path, basename: str) -> list[Path]:
    return weight_layout(folder, basename).files


@dataclass
class Component:
    """One model folder to compress, and how."""

    name: str  # "" for a lone model folder
    folder: Path
    library: str  # "diffusers" or "transformers"
    files: list[Path]
    grouping: Callable
    units: int  # units it will have (for progress)


def _grouping(config: dict, library: str, unit: str, folder: Path):
    if library == "transformers":
        return UNIT_KINDS[unit]
    from dfloat.runtime.diffusers_units import diffusers_grouping

    cls = diffusers_class(config, folder)
    keep = getattr(cls, "_keep_in_fp32_modules", None) or []
    return diffusers_grouping(keep, unit, parameters=parameter_names(cls, config))


def diffusers_class(config: dict, folder: Path):
    """The diffusers model class named by a config's ``_class_name``."""
    try:
        import diffusers
    except ImportError:
        raise ModelSourceError("diffusers models need diffusers: pip install diffusers") from None
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if cls is None:
        raise ModelSourceError(
            f"{folder}/config.json: _class_name {config.get('_class_name')!r} is no model class of diffusers "
            f"{diffusers.__version__}"
        )
    return cls


def parameter_names(cls, config: dict) -> set[str]:
    """The parameter names of the model (built on the meta device): only parameters are coded, buffers saved
    with the weights (SD3's ``pos_embed.pos_embed``) stay plain tensors."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls.from_config(config)
    return {n for n, _ in model.named_parameters(remove_duplicate=False)}


def plan_component(name: str, folder: Path, library: str, unit: str, strict: bool = False) -> Component | str:
    """The Component to compress, or why the folder is copied as it is. ``strict`` (a lone model, not a
    pipeline component): weights that are not BF16 are compress_model's error, not a reason to copy."""
    if not (folder / "config.json").is_file():
        return "copied: no config.json"
    config = src.read_json_object(folder / "config.json")
    # before reading its weights: a compressed component's index names units, which are no tensors
    if CONFIG_KEY in config or DIFFUSERS_CONFIG_KEY in config:
        return "copied: already compressed"
    if config.get("quantization_config"):
        return f"copied: {config['quantization_config'].get('quant_method', 'quantized')}-quantized"
    basename = DIFFUSERS_WEIGHTS if library == "diffusers" else TRANSFORMERS_WEIGHTS
    try:
        layout = weight_layout(folder, basename)
    except ModelSourceError as e:
        return f"copied: {e}"
    headers = [(t.name, t.shape, t.dtype) for t in layout.tensors.values()]
    grouping = _grouping(config, library, unit, folder)
    others = sorted({d for n, s, d in headers if d in _FLOAT and d != "BF16" and grouping(n, s) is not None})
    if others and not strict:
        return f"copied: {'/'.join(others)} weights (dfloat is lossless for BF16 only)"
    units = plan_units(headers, grouping)
    if not units and not strict:
        return "copied: no BF16 weights"
    return Component(name, folder, library, layout.files, grouping, len(units))


def compress_diffusers(
    folder: Path,
    out_dir: Path,
    origin: dict,
    *,
    overwrite: bool = False,
    verify: bool = True,
    unit: str = "block",
    progress=None,
    config_from=None,
    grouping=None,
    **options,
) -> PipelineReport:
    """Compress a diffusers pipeline folder or model folder into ``out_dir`` (written beside it, then
    renamed). An official DFloat11 diffusion checkpoint is decoded into a temporary BF16 diffusers model
    folder first (``config_from``: where its model config is, see
    `dfloat.runtime.official_diffusion.model_config`).

    ``grouping`` (which tensors share a code, `dfloat.runtime.grouping.grouping_from`) applies to one model,
    not to a pipeline's components. ``options`` go to `dfloat.compress_model` for each component (workers,
    stream parameters, shard size)."""
    t0 = time.perf_counter()
    layout = diffusion_layout(folder)
    out_dir = output.check_target(out_dir, overwrite, sources=[folder])
    if layout in ("official", "comfyui"):
        from dfloat.runtime import official_diffusion

        with tempfile.TemporaryDirectory(prefix="dfloat-df11-") as decoded:
            bf16 = official_diffusion.to_bf16_folder(folder, config_from, Path(decoded) / "model")
            return compress_diffusers(
                bf16,
                out_dir,
                origin,
                overwrite=overwrite,
                verify=verify,
                unit=unit,
                progress=progress,
                grouping=grouping,
                **options,
            )
    if layout == "pipeline" and grouping is not None:
        raise ModelSourceError(
            f"{folder}: grouping= applies to one model; compress a component's folder with it, or the "
            "pipeline without it"
        )
    if layout == "pipeline":
        index = src.read_json_object(folder / MODEL_INDEX)
        plans: dict[str, Component | str] = {}
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
                continue
            sub = folder / name
            if not sub.is_dir():
                raise ModelSourceError(
                    f"{folder}: {MODEL_INDEX} names component {name!r}, which has no folder"
                )
            library = spec[0]
            if library in ("diffusers", "transformers"):
                plans[name] = plan_component(name, sub, library, unit)
            else:
                plans[name] = "copied: not a model"
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in plans):
            plans[sub.name] = "copied: not a component"
    else:
        plans = {"": plan_component("", folder, "diffusers", unit, strict=True)}
        if isinstance(plans[""], str):
            raise ModelSourceError(f"{folder}: nothing to compress ({plans[''].removeprefix('copied: ')})")
        if grouping is not None:
            from dfloat.runtime.grouping import grouping_from

            plans[""].grouping = grouping_from(grouping)
    todo = [c for c in plans.values() if isinstance(c, Component)]
    if not todo:
        raise ModelSourceError(f"{folder}: no component has BF16 weights to compress")
    report = PipelineReport(str(out_dir), 0, 0, 0, 0, 0, 0.0)
    total = sum(c.units for c in todo)
    tmp = output.new_partial(out_dir)
    try:
        done = 0
        for name, plan in plans.items():
            target = tmp / name if name else tmp / "model"
            if isinstance(plan, str):
                _copy_tree(folder / name, target)
                report.components[name] = plan
                log.info("%s: %s", name, plan)
                continue

            def step(u, i, n, weights, _name=name, _base=done):
                if progress:
                    progress(f"{_name}/{u}" if _name else u, _base + i, total, weights)

            part = _compress_component(plan, target, origin, verify, unit, step, options, out_dir.name)
            done += plan.units
            for k in ("units", "coded_units", "weights", "original_bytes", "stored_bytes"):
                setattr(report, k, getattr(report, k) + getattr(part, k))
            report.components[name] = f"compressed: {100 * part.ratio:.2f}% of BF16 ({part.units} units)"
        if layout == "pipeline":
            for f in folder.iterdir():
                if f.is_file() and f.name != "README.md":
                    shutil.copy2(f, tmp / f.name)
            (tmp / "README.md").write_text(
                _pipeline_card(report, origin, src.read_json_object(folder / MODEL_INDEX))
            )
            final = tmp
        else:
            final = tmp / "model"
        output.move_into_place(final, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return finish_report(report, origin, out_dir, t0)


def _compress_component(
    plan: Component, out: Path, origin: dict, verify, unit, progress, options, out_name=""
):
    """`compress_model` on a view of the component that names its weights the way compress_model reads them
    (config.json, ``model.safetensors.index.json``, ``model-*.safetensors``: links to the component's own
    files, nothing copied)."""
    from dfloat.runtime.compress import compress_model

    basename = DIFFUSERS_WEIGHTS if plan.library == "diffusers" else TRANSFORMERS_WEIGHTS
    with tempfile.TemporaryDirectory(prefix="dfloat-view-") as view:
        view = _weights_view(plan.folder, basename, Path(view))
        report = compress_model(
            view, out, verify=verify, grouping=plan.grouping, progress=progress, unit=unit, **options
        )
    config = src.read_json_object(out / "config.json")
    source = origin["source"] + (f"/{plan.name}" if plan.name else "")
    config[CONFIG_KEY].update(source=source, revision=origin.get("revision"))
    _name_shards_as_diffusers(out)
    if plan.library == "transformers":  # transformers reads the index diffusers' downloader fetches
        config["quantization_config"]["index"] = DIFFUSERS_INDEX
    if plan.library == "diffusers":
        # diffusers warns about unknown config keys except those starting with "_"
        config[DIFFUSERS_CONFIG_KEY] = config.pop(CONFIG_KEY)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if plan.name:  # inside a pipeline the pipeline's card says how to use it
        (out / "README.md").unlink(missing_ok=True)
    else:
        (out / "README.md").write_text(
            _model_card(report, src.public_name(origin["source"]), config, out_name)
        )
    return report


def _name_shards_as_diffusers(out: Path) -> None:
    """Shards renamed ``diffusion_pytorch_model-0000i-of-0000N.safetensors`` and the index copied as
    ``diffusion_pytorch_model.safetensors.index.json``. From a model folder of a pipeline on the Hub, diffusers'
    downloader fetches only config.json and files named as diffusers or transformers name weights and their
    index; names that transformers reads by itself (``model.safetensors...``) would make a text encoder load
    with random weights where dfloat is not installed, so transformers components get diffusers' names too (the
    quantizers read them: runtime/checkpoint.py, runtime/hf_quantizer.py)."""
    index = src.read_json_object(out / INDEX_NAME)
    shards = sorted(set(index["weight_map"].values()))
    renamed = {
        old: f"{DIFFUSERS_WEIGHTS}-{i:05d}-of-{len(shards):05d}.safetensors"
        for i, old in enumerate(shards, 1)
    }
    for old, new in renamed.items():
        os.replace(out / old, out / new)
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    text = json.dumps(index, indent=2) + "\n"
    for name in (INDEX_NAME, DIFFUSERS_INDEX):
        (out / name).write_text(text)


def _copy_tree(src: Path, dst: Path) -> None:
    """A copy (not hard links: editing the output in place must never change the source)."""
    shutil.copytree(src, dst)


def _model_card(report: CompressionReport, source: str, config: dict, out_name: str) -> str:
    """README.md of a compressed diffusers model (names: see `dfloat.runtime.source.public_name`)."""
    cls = config.get("_class_name", "the model class")
    return f"""---
tags: [dfloat, lossless, bf16, diffusers]
---
# {Path(source).name} (dfloat, lossless)

Losslessly compressed copy of `{source}` ({cls}) made with dfloat: BF16 exponents Huffman-coded, sign and
mantissa kept, so every weight decodes bit-identical to the original ({100 * report.ratio:.2f}% of the BF16
bytes).

```python
import torch
from diffusers import {cls}  # with `pip install dfloat`; no import of dfloat needed
model = {cls}.from_pretrained("{out_name}", dtype=torch.bfloat16)  # this folder, or its Hub id
```
"""


def _pipeline_card(report: PipelineReport, origin: dict, index: dict) -> str:
    """README.md of a compressed pipeline (names: see `dfloat.runtime.source.public_name`)."""
    rows = "\n".join(f"| {name} | {what} |" for name, what in report.components.items())
    source = src.public_name(origin["source"])
    return f"""---
tags: [dfloat, lossless, bf16, diffusers]
---
# {Path(source).name} (dfloat, lossless)

Losslessly compressed copy of the `{index.get("_class_name", "diffusers")}` pipeline `{source}` made
with dfloat: every BF16 component decodes bit-identical to the original, so images equal the BF16 pipeline's.

| component | |
|---|---|
{rows}

```python
import torch
from diffusers import DiffusionPipeline  # with `pip install dfloat`; no import of dfloat needed
pipe = DiffusionPipeline.from_pretrained("{Path(report.out_dir).name}", dtype=torch.bfloat16)  # or its Hub id
```
"""


# ---- verify and decompress ---------------------------------------------------------------------------------
def is_compressed_component(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    data = src.read_json_object(config)
    return CONFIG_KEY in data or DIFFUSERS_CONFIG_KEY in data


def _weights_view(folder: Path, basename: str, view: Path) -> Path:
    """``view`` made a folder of links that names ``folder``'s weights as compress_model / verify read them
    (``model.safetensors.index.json``, ``model-*.safetensors``), with its config.json and other small
    files."""
    layout = weight_layout(folder, basename)
    links = {}
    for i, f in enumerate(layout.files, start=1):
        links[f] = f"model-{i:05d}-of-{len(layout.files):05d}.safetensors"
        (view / links[f]).symlink_to(f.resolve())
    weight_map = {name: links[f] for name, f in layout.tensor_file.items()}
    (view / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    # config.json and other side files (generation config, ...): compress copies them
    for f in folder.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".pt")):
            (view / f.name).symlink_to(f.resolve())
    return view


def components(folder: Path) -> dict[str, Path]:
    """{name: folder} of a pipeline's components ("" and the folder itself for a lone model)."""
    if diffusion_layout(folder) != "pipeline":
        return {"": folder}
    index = src.read_json_object(folder / MODEL_INDEX)
    return {n: folder / n for n, spec in index.items() if not n.startswith("_") and (folder / n).is_dir()}


def verify_diffusers(
    folder: Path, against: Path | None = None, backend: str | None = None, progress=None
) -> list[str]:
    """`dfloat.verify_checkpoint` for a compressed pipeline (every compressed component), and for a diffusers
    model or pipeline checked against its original (whose weights carry diffusers' names); a copied component
    is compared file by file."""
    from dfloat.errors import ChecksumError
    from dfloat.runtime.compress import verify_checkpoint

    problems: list[str] = []
    originals = components(against) if against is not None else {}
    for name, comp in components(folder).items():
        orig = originals.get(name)
        if against is not None and orig is None:
            problems.append(f"{name}: not in {against}")
            continue
        try:
            if not is_compressed_component(comp):
                if orig is not None:
                    for f in sorted(p for p in orig.rglob("*") if p.is_file()):
                        mine = comp / f.relative_to(orig)
                        if not mine.is_file() or mine.read_bytes() != f.read_bytes():
                            problems.append(f"{name}: {f.relative_to(orig)} differs from {against}")
                continue
            if orig is None:
                verify_checkpoint(comp, backend=backend, progress=progress)
                continue
            basename = (
                DIFFUSERS_WEIGHTS
                if is_diffusers_config(src.read_json_object(orig / "config.json"))
                else "model"
            )
            with tempfile.TemporaryDirectory(prefix="dfloat-view-") as view:
                view = _weights_view(orig, basename, Path(view))
                verify_checkpoint(comp, against=view, backend=backend, progress=progress)
        except ChecksumError as e:
            problems += [f"{name}: {line.strip()}" for line in str(e).splitlines()[1:]]
    if problems:
        raise ChecksumError(f"{folder}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return problems


def decompress_diffusers(folder: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """`dfloat.decompress_model` for a compressed diffusers model or pipeline: BF16 weights under diffusers'
    names again (``diffusion_pytorch_model.safetensors`` for diffusers models), copied components as they
    are."""
    from dfloat.runtime.compress import decompress_model

    out_dir = output.check_target(out_dir, overwrite, sources=[folder])
    if not any(is_compressed_component(c) for c in components(folder).values()):
        raise ModelSourceError(f"{folder}: not compressed by dfloat (no component has a dfloat section)")
    tmp = output.new_partial(out_dir)
    try:
        layout = diffusion_layout(folder)
        for name, comp in components(folder).items():
            target = tmp / name if name else tmp / "model"
            if not is_compressed_component(comp):
                _copy_tree(comp, target)
                continue
            with tempfile.TemporaryDirectory(prefix="dfloat-view-") as view:
                view = Path(view)
                for (
                    f
                ) in comp.iterdir():  # the checkpoint without the index copy that makes it look diffusers'
                    if f.name != DIFFUSERS_INDEX:
                        (view / f.name).symlink_to(f.resolve())
                decompress_model(view, target)
            config = src.read_json_object(target / "config.json")
            if config.pop(DIFFUSERS_CONFIG_KEY, None) is not None:
                _rename_weights(target, TRANSFORMERS_WEIGHTS, DIFFUSERS_WEIGHTS)
            (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if layout == "pipeline":
            for f in folder.iterdir():
                if f.is_file() and f.name != "README.md":
                    shutil.copy2(f, tmp / f.name)
            output.move_into_place(tmp, out_dir, overwrite)
        else:
            output.move_into_place(tmp / "model", out_dir, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _rename_weights(folder: Path, old: str, new: str) -> None:
    """``{old}.safetensors`` (or ``{old}-0000i-of-0000n`` shards and their index) renamed to ``{new}...``."""
    index = folder / f"{old}.safetensors.index.json"
    if index.is_file():
        data = src.read_json_object(index)
        data["weight_map"] = {k: v.replace(old, new, 1) for k, v in data["weight_map"].items()}
        for f in sorted(folder.glob(f"{old}-*.safetensors")):
            os.replace(f, folder / f.name.replace(old, new, 1))
        (folder / f"{new}.safetensors.index.json").write_text(json.dumps(data, indent=2) + "\n")
        index.unlink()
    elif (folder / f"{old}.safetensors").is_file():
        os.replace(folder / f"{old}.safetensors", folder / f"{new}.safetensors")


def plan_pipeline(
    folder, chunk_numel: int | None = None, chunking: bool = True, split: bool = True
) -> memory.PipelinePlan:
    """The memory plan of a compressed diffusers pipeline folder, component by component (`plan_checkpoint` for
    each compressed one; the weight files' bytes for the others), from headers only."""
    plans: dict[str, memory.MemoryPlan] = {}
    copied: dict[str, int] = {}
    for name, comp in components(Path(folder)).items():
        if is_compressed_component(comp):
            plans[name] = memory.plan_checkpoint(comp, chunk_numel, chunking, split)
            continue
        nbytes = 0
        for basename in (DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS):
            try:
                nbytes = sum(f.stat().st_size for f in weight_files(comp, basename))
                break
            except Exception:  # noqa: BLE001 - no weights under this name (tokenizers, schedulers)
                continue
        copied[name] = nbytes
    return memory.PipelinePlan(plans, copied)
