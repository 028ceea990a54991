"""transformers integration: `quant_method: "dfloat"` in config.json makes `from_pretrained` load a compressed model.

`compress_model` writes ``quantization_config = {"quant_method": "dfloat", ...}`` into config.json. transformers
looks the method up in its quantizer registry, where `register()` (run when transformers is imported, see
`_dfloat_autoload`) has put `DFloatConfig` and `DFloatHfQuantizer`. The quantizer then

1. points transformers at the folder's shard index (``dfloat.safetensors.index.json``, a name transformers
   accepts, through ``config.transformers_weights``; a diffusers pipeline's text encoder names its copy
   ``diffusion_pytorch_model.safetensors.index.json`` in ``quantization_config.index``), so Hub downloads, the
   cache and tokens are transformers' and huggingface_hub's own, and dfloat then reads the very index and
   shards transformers fetched;
2. before weights load, hides every unit member (coded weights) from the model's state dict: transformers loads
   the plain tensors (norms, small raw tensors) itself and never allocates or initializes the coded weights;
3. after loading, hands the coded units to `dfloat.runtime.attach.attach`, the same decode-before-use hooks as
   `load_compressed`, so outputs are bit-identical to the BF16 model.

Without dfloat installed transformers warns "Unknown quantization type, got dfloat" and then fails with "no file
named model.safetensors": a compressed folder holds no weights under the names it would read otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from dfloat.errors import ModelSourceError
from dfloat.runtime.checkpoint import DIFFUSERS_INDEX, INDEX_NAME, folder_of_shards

log = logging.getLogger(__name__)

QUANT_METHOD = "dfloat"
# Names of a unit's stored arrays in a shard ("{unit}.{array}"): not parameters, transformers must skip them.
_UNIT_ARRAYS = r"\.(encoded_exponent|sign_mantissa|gaps|output_positions|code_lengths|luts|raw)$"


class DFloatConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a dfloat checkpoint. Lossless: weights decode to the original BF16 bits.

    Args:
        format_version: the dfloat format the checkpoint was written with (docs/FORMAT.md).
        backend: decoder to use ("cpu", "triton", "cuda"; default: the fastest for the device).
        cpu_offload: keep compressed units in pinned host memory, copying each to the GPU before decoding it.
        index: the index transformers reads: ``dfloat.safetensors.index.json`` (default), or its copy
            ``diffusion_pytorch_model.safetensors.index.json``, which a diffusers pipeline's text encoders name
            (the one file diffusers' downloader fetches of the two; runtime/pipeline.py).
    """

    def __init__(
        self,
        format_version: str | None = None,
        backend: str | None = None,
        cpu_offload: bool = False,
        index: str | None = None,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.backend = backend
        self.cpu_offload = cpu_offload
        if index not in (None, INDEX_NAME, DIFFUSERS_INDEX):
            raise ModelSourceError(
                f"quantization_config.index is {index!r}: a dfloat checkpoint's index is {INDEX_NAME} or "
                f"{DIFFUSERS_INDEX}"
            )
        self.index = index


def _devices(device_map) -> tuple[torch.device, dict | None]:
    """The execution device and, for a per-module map, {prefix: device}, from what the user gave `from_pretrained`."""
    from dfloat.runtime.placement import map_device as one

    if device_map is None:
        return torch.device("cpu"), None
    if isinstance(device_map, dict):
        mapping = {k: one(v) for k, v in device_map.items()}
        return mapping.get("", next(iter(mapping.values()), torch.device("cpu"))), mapping
    return one(device_map), None


class DFloatHfQuantizer(HfQuantizer):
    """Loads dfloat checkpoints through `from_pretrained`: plain tensors by transformers, coded units by dfloat."""

    requires_calibration = True  # a dfloat model is always pre-compressed: `dfloat compress` makes one
    folder: Path | None = None

    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized:
            raise ValueError(
                "dfloat cannot compress while loading: run `dfloat compress` (or dfloat.compress_model) on the "
                "BF16 model, then load the compressed folder"
            )

    def update_dtype(self, dtype):
        if dtype is not None and dtype != torch.bfloat16:
            log.warning(
                "dfloat: weights are BF16 and decode losslessly only as BF16; ignoring dtype=%s", dtype
            )
        return torch.bfloat16

    def _point_at_weights(self, config):
        config.transformers_weights = getattr(self.quantization_config, "index", None) or INDEX_NAME
        return config

    # transformers hands the quantizer the config before it looks for weight files: through
    # update_attn_implementation in recent versions (5.24), update_tp_plan in older ones (5.17).
    def update_attn_implementation(self, config):
        return self._point_at_weights(config)

    def update_tp_plan(self, config):
        return self._point_at_weights(config)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, device_map=None, **kwargs):
        from dfloat.runtime.checkpoint import describe_unit_layout

        if not checkpoint_files:
            raise ModelSourceError("dfloat: transformers found no checkpoint files for this model")
        self.folder = folder_of_shards(checkpoint_files)
        self.device, self.device_map = _devices(device_map)
        members = {m for names in describe_unit_layout(self.folder).values() for m in names}

        def hide_members(module, state_dict, prefix, local_metadata):
            for name in members:
                state_dict.pop(prefix + name, None)
            return state_dict

        self._hide_handle = model._register_state_dict_hook(hide_members)
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
        model._keys_to_ignore_on_load_unexpected = ignore | {_UNIT_ARRAYS}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from dfloat.runtime.attach import attach
        from dfloat.runtime.checkpoint import CompressedCheckpoint

        self._hide_handle.remove()
        units = {}
        for _, shard_units, _ in CompressedCheckpoint.open(self.folder).iter_shards():
            units.update(shard_units)
        members = {m.name for ct in units.values() for m in ct.members}
        # Everything transformers loaded; what is still meta is a coded member or its tied alias.
        plain = {
            n: p.detach()
            for n, p in model.named_parameters(remove_duplicate=False)
            if n not in members and not p.is_meta
        }
        cfg = self.quantization_config
        attach(
            model,
            units,
            plain,
            self.device,
            backend=getattr(cfg, "backend", None),
            cpu_offload=bool(getattr(cfg, "cpu_offload", False)),
            device_map=self.device_map,
        )
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected) - {
            _UNIT_ARRAYS
        }
        return model

    def is_serializable(self, safe_serialization=None):
        log.warning(
            "dfloat: save_pretrained cannot write a compressed model as transformers shards. The folder it was "
            "loaded from already is the checkpoint; `dfloat decompress FOLDER -o OUT` writes the BF16 model, and "
            "dfloat.export_merged writes one with LoRA adapters merged."
        )
        return False

    @property
    def is_trainable(self) -> bool:
        return True  # adapters (PEFT) train on top; the coded base stays frozen

    @property
    def is_compileable(self) -> bool:
        return False


def register() -> None:
    """Add dfloat to transformers' quantizer registry (idempotent)."""
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(DFloatConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(DFloatHfQuantizer)


register()  # importing this module is enough, as `import dfloat.models` is for the architectures
