"""LoRA adapters trained on a compressed base -> one BF16 model with the adapters merged (optionally compressed).

The merge is PEFT's own (`merge_and_unload`) on the decompressed BF16 base, so the result equals what the same
adapters merged into the original BF16 model give, byte for byte.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dfloat.errors import ModelSourceError, OutputExistsError

log = logging.getLogger(__name__)


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("merging LoRA adapters needs PEFT: pip install peft") from None
    return peft


def merge_adapters(
    base: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    compress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Merge the PEFT adapters saved in ``adapter_dir`` into the compressed model ``base`` and write the result
    to ``out_dir``: a BF16 checkpoint, or with ``compress`` a dfloat checkpoint again. Written atomically."""
    from transformers import AutoModelForCausalLM

    from dfloat.runtime.compress import _replace_dir, compress_model, decompress_model

    peft = _peft()
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelSourceError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(
            f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dfloat-merge-", dir=out_dir.parent) as work:
        work = Path(work)
        decompress_model(base, work / "base")
        model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)
        merged = peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(work / "merged")
        for f in (work / "base").iterdir():  # tokenizer and other side files
            if not (work / "merged" / f.name).exists():
                shutil.copy2(f, work / "merged" / f.name)
        if compress:
            compress_model(work / "merged", work / "out")
            _replace_dir(work / "out", out_dir)
        else:
            _replace_dir(work / "merged", out_dir)
    log.info("merged %s into %s -> %s", adapter_dir, base, out_dir)
    return out_dir


def export_merged(
    peft_model, out_dir: str | os.PathLike, *, compress: bool = False, overwrite: bool = False
) -> Path:
    """Write a PEFT model whose base was loaded from a dfloat checkpoint as one model with its active adapter
    merged: BF16, or with ``compress`` a dfloat checkpoint again."""
    base_model = peft_model.get_base_model()
    quantizer = getattr(base_model, "hf_quantizer", None)
    base = getattr(quantizer, "folder", None) or getattr(base_model.config, "name_or_path", None)
    if not base:
        raise ModelSourceError("cannot tell which dfloat checkpoint this model was loaded from")
    with tempfile.TemporaryDirectory(prefix="dfloat-adapter-") as adapters:
        name = peft_model.active_adapter
        peft_model.save_pretrained(adapters, selected_adapters=[name])
        folder = Path(adapters) if name == "default" else Path(adapters) / name
        return merge_adapters(base, folder, out_dir, compress=compress, overwrite=overwrite)
