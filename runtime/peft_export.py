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

from dfloat.errors import ModelSourceError

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

    from dfloat.runtime import output
    from dfloat.runtime.compress import compress_model, decompress_model

    peft = _peft()
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelSourceError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    from dfloat.runtime import source as src

    out_dir = output.check_target(out_dir, overwrite, sources=[adapter_dir, *src.local_folders(base)])
    work = output.new_partial(out_dir)
    try:
        decompress_model(base, work / "base")
        model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)
        merged = peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(work / "merged")
        for f in (work / "base").iterdir():  # tokenizer and other side files
            if not (work / "merged" / f.name).exists():
                shutil.copy2(f, work / "merged" / f.name)
        if compress:
            compress_model(work / "merged", work / "out")
        output.move_into_place(work / ("out" if compress else "merged"), out_dir, overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
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
