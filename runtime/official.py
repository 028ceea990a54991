"""Checkpoints written by the official DFloat11 tool: config.json "dfloat11_config" + per-module unit tensors."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dfloat import df11
from dfloat.errors import ModelSourceError
from dfloat.format import CompressedTensor
from dfloat.runtime import source as src


def read_official(
    folder: Path, config: dict, model: torch.nn.Module
) -> tuple[dict[str, CompressedTensor], dict[str, torch.Tensor]]:
    """Units (one per matched module, members from its pattern) and the remaining plain tensors."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for path in src.read_all_safetensors(folder).files:  # what the official loader reads: every file
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return official_units(tensors, config["dfloat11_config"], model, str(folder))


def official_units(
    tensors: dict[str, torch.Tensor], cfg: dict, model: torch.nn.Module, where: str
) -> tuple[dict[str, CompressedTensor], dict[str, torch.Tensor]]:
    """The units of ``model`` found in an official checkpoint's ``tensors`` (``cfg``: its dfloat11_config), and
    the tensors left over (plain). ``tensors`` is consumed."""
    try:
        patterns = [(re.compile(p), list(attrs)) for p, attrs in cfg["pattern_dict"].items()]
        tpb = cfg.get("threads_per_block", [df11.OFFICIAL_THREADS_PER_BLOCK])
        threads_per_block = int(tpb[0] if isinstance(tpb, list) else tpb)
        bytes_per_thread = int(cfg.get("bytes_per_thread", df11.OFFICIAL_BYTES_PER_THREAD))
    except (KeyError, TypeError, ValueError, re.error) as e:
        raise ModelSourceError(f"{where}: unreadable dfloat11_config in config.json ({e})") from None
    params = dict(model.named_parameters(remove_duplicate=False))
    units = {}
    for module_name, _ in model.named_modules():
        attrs = next((a for rx, a in patterns if rx.fullmatch(module_name)), None)
        if attrs is None or f"{module_name}.encoded_exponent" not in tensors:
            continue
        names = [f"{module_name}.{a}.weight" for a in attrs] if attrs else [f"{module_name}.weight"]
        missing = [n for n in names if n not in params]
        if missing:
            raise ModelSourceError(f"{where}: module {module_name} has no weight {missing[0]} in the model")
        arrays = {
            k: tensors.pop(f"{module_name}.{k}")
            for k in df11.OFFICIAL_ARRAYS
            if f"{module_name}.{k}" in tensors
        }
        units[module_name] = df11.from_official_unit(
            arrays,
            [(n, tuple(params[n].shape)) for n in names],
            bytes_per_thread,
            threads_per_block,
            where=f"{where}: unit {module_name}",
        )
    if not units:
        raise ModelSourceError(f"{where}: dfloat11_config matches no compressed module")
    return units, tensors


def write_official(model_folder: Path, out_dir: Path, pattern_dict: dict[str, list[str]]) -> None:
    """Write a BF16 checkpoint in the official layout (one file per unit, as the official tool does).
    For tests and interop; the stream carries no end-of-stream code (see dfloat.df11.to_official_unit)."""
    import json
    import shutil

    from safetensors.torch import save_file

    from dfloat.codec import compress_tensors

    tensors: dict[str, torch.Tensor] = {}
    for path in src.weight_files(model_folder):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    out_dir.mkdir(parents=True, exist_ok=False)
    modules = sorted({n.rsplit(".", 1)[0] for n in tensors})
    prefixes = sorted({m2 for m in modules for m2 in module_prefixes(m)})
    for module_name in prefixes:
        attrs = next((a for p, a in pattern_dict.items() if re.fullmatch(p, module_name)), None)
        if attrs is None:
            continue
        names = [f"{module_name}.{a}.weight" for a in attrs] if attrs else [f"{module_name}.weight"]
        if not all(n in tensors for n in names):
            continue
        ct = compress_tensors({n: tensors.pop(n) for n in names}, allow_raw=False)
        arrays = df11.to_official_unit(ct)
        save_file(
            {f"{module_name}.{k}": v for k, v in arrays.items()},
            str(out_dir / f"{module_name.replace('.', '_')}.safetensors"),
        )
    save_file(tensors, str(out_dir / "model.safetensors"))
    config = json.loads((model_folder / "config.json").read_text())
    config["dfloat11_config"] = {
        "version": "0.5.0",
        "threads_per_block": [df11.OFFICIAL_THREADS_PER_BLOCK],
        "bytes_per_thread": df11.OFFICIAL_BYTES_PER_THREAD,
        "pattern_dict": pattern_dict,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.side_files(model_folder):
        shutil.copy2(f, out_dir / f.name)


def module_prefixes(module_name: str) -> list[str]:
    """ "a.b.c" -> ["a", "a.b", "a.b.c"]: the module and every module above it."""
    parts = module_name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
