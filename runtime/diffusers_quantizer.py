"""diffusers integration: ``quant_method: "dfloat"`` in a diffusers model's config.json makes
``from_pretrained`` (``FluxTransformer2DModel.from_pretrained``, or ``DiffusionPipeline.from_pretrained`` for
every component) load the compressed model, with no ``import dfloat``.

`register()` (run when diffusers imports its quantizers, see `_dfloat_autoload`) adds `DFloatDiffusersConfig`
and `DFloatDiffusersQuantizer` to diffusers' quantizer registry. A compressed diffusers model folder carries
its shard index also as ``diffusion_pytorch_model.safetensors.index.json`` (runtime/pipeline.py), so diffusers
finds the shards through its own Hub and cache code. Then the quantizer

1. before weights load (the model is on the meta device), reads the compressed units and plain tensors and
   hands them to `dfloat.runtime.attach.attach`: coded weights become views of a decode buffer, decoded right
   before their block runs, and are never allocated in BF16;
2. lets diffusers load the plain tensors (norms, biases) itself, so dtype casts and ``_keep_in_fp32_modules``
   happen as for the BF16 model, and drops the stored unit arrays from what it loads;
3. leaves device placement to diffusers: ``device_map`` and the ``model.to(device)`` that
   ``enable_model_cpu_offload`` does move the compressed units (runtime/placement.py).

Text encoders in a pipeline are transformers models and load through runtime/hf_quantizer.py.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import logging
from pathlib import Path

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from dfloat.errors import DFloatError, ModelSourceError
from dfloat.format import STORED_ARRAYS
from dfloat.runtime.placement import map_device

log = logging.getLogger(__name__)

QUANT_METHOD = "dfloat"


class Method(str, enum.Enum):
    """diffusers reads ``quant_method.value`` (its methods are an Enum of strings)."""

    DFLOAT = QUANT_METHOD


class DFloatDiffusersConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a dfloat diffusers model. Lossless: weights decode to their BF16 bits.

    Args:
        format_version: the dfloat format the checkpoint was written with (docs/FORMAT.md).
        backend: decoder to use ("cpu", "triton", "cuda"; default: the fastest for the device).
        cpu_offload: keep compressed units in pinned host memory, copying each to the GPU before decoding it.
        verify: check the files against their checksums while reading them.
    """

    def __init__(
        self,
        format_version: str | None = None,
        backend: str | None = None,
        cpu_offload: bool = False,
        verify: bool = True,
        **kwargs,
    ):
        self.quant_method = Method.DFLOAT
        self.format_version = format_version
        self.backend = backend
        self.cpu_offload = cpu_offload
        self.verify = verify

    def to_dict(self) -> dict:
        return {**super().to_dict(), "quant_method": QUANT_METHOD}

    def to_diff_dict(self) -> dict:  # what diffusers' repr and logs call (the mixin lacks it)
        return self.to_dict()


_OPTIONS: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "dfloat_diffusers_options", default=None
)


@contextlib.contextmanager
def load_options(**options):
    """Decoder options (``backend``, ``cpu_offload``, ``verify``) for the dfloat models loaded inside the
    block, over those stored in their config.json (diffusers keeps a checkpoint's own quantization_config)."""
    token = _OPTIONS.set({k: v for k, v in options.items() if v is not None})
    try:
        yield
    finally:
        _OPTIONS.reset(token)


class DFloatDiffusersQuantizer(DiffusersQuantizer):
    """Loads dfloat diffusers models in ``from_pretrained``: coded units by dfloat, plain ones by diffusers."""

    requires_calibration = True  # always pre-compressed: `dfloat compress` makes one
    use_keep_in_fp32_modules = True  # plain tensors are upcast as for the BF16 model (coded ones never are)

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.folder: Path | None = None
        self.members: set[str] = set()
        self.arrays: set[str] = set()

    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized:
            raise ValueError(
                "dfloat cannot compress while loading: run `dfloat compress` on the BF16 model or pipeline, then "
                "load the compressed folder"
            )

    def update_torch_dtype(self, torch_dtype):
        if torch_dtype is not None and torch_dtype != torch.bfloat16:
            log.warning(
                "dfloat: weights are BF16 and decode losslessly only as BF16; loading with torch_dtype=bfloat16 "
                "instead of %s",
                torch_dtype,
            )
        return torch.bfloat16

    def update_device_map(self, device_map):
        """A strategy name ("auto", "balanced") means the one device to decode on: compressed, a model fits
        where its BF16 copy was planned not to."""
        if isinstance(device_map, str):
            return {"": map_device(device_map)}
        return device_map

    def get_cuda_warm_up_factor(self):
        return 1 << 62  # diffusers loads only the small plain tensors: no allocator warm-up in BF16 sizes

    def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
        from dfloat.runtime.checkpoint import describe_unit_layout, folder_of_shards

        if not checkpoint_files:
            raise ModelSourceError("dfloat: diffusers found no checkpoint files for this model")
        self.folder = folder_of_shards(checkpoint_files)
        layout = describe_unit_layout(self.folder)
        self.members = {m for names in layout.values() for m in names}
        self.arrays = {f"{u}.{a}" for u in layout for a in STORED_ARRAYS}
        return [k for k in loaded_keys if k not in self.arrays and k not in layout]  # the index names units

    def update_missing_keys(self, model, missing_keys, prefix):
        return [k for k in missing_keys if k not in self.members]

    def maybe_update_state_dict(self, state_dict):
        return {k: v for k, v in state_dict.items() if k not in self.arrays}

    def _process_model_before_weight_loading(
        self, model, device_map=None, keep_in_fp32_modules=None, **kwargs
    ):
        from dfloat.runtime.attach import attach
        from dfloat.runtime.checkpoint import CompressedCheckpoint

        if self.folder is None:
            raise ModelSourceError("dfloat: diffusers gave no checkpoint files before building the model")
        mapping = None
        if isinstance(device_map, dict) and len({str(d) for d in device_map.values()}) > 1:
            mapping = {k: map_device(v) for k, v in device_map.items()}
            device = mapping.get("", next(iter(mapping.values())))
        elif isinstance(device_map, dict) and device_map:
            device = map_device(next(iter(device_map.values())))
        else:
            device = torch.device("cpu")
        cfg = self.quantization_config
        opts = {k: getattr(cfg, k, None) for k in ("backend", "cpu_offload", "verify")} | (
            _OPTIONS.get() or {}
        )
        units, plain = {}, {}
        verify = opts["verify"] is not False
        for _, shard_units, shard_plain in CompressedCheckpoint.open(self.folder).iter_shards(verify=verify):
            units.update(shard_units)
            plain.update(shard_plain)
        attach(
            model,
            units,
            plain,
            device,
            backend=opts["backend"],
            cpu_offload=bool(opts["cpu_offload"]),
            device_map=mapping,
        )
        model.fuse_lora = _refuse_fuse  # fusing would write into the decode buffer shared by every unit
        log.info("dfloat: %s: %s", self.folder, model._dfloat_plan.summary())
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    @property
    def is_serializable(self):
        log.warning(
            "dfloat: save_pretrained cannot write a compressed model as diffusers shards. The folder it was "
            "loaded from already is the checkpoint; `dfloat decompress FOLDER -o OUT` writes the BF16 model."
        )
        return False

    @property
    def is_trainable(self):
        return True  # LoRA adapters train and run on top; the coded base stays frozen

    @property
    def is_compileable(self) -> bool:
        return False


def _refuse_fuse(*args, **kwargs):
    raise DFloatError(
        "fuse_lora on a dfloat model: its weights are decoded from the compressed checkpoint before every use, "
        "so a LoRA cannot be fused into them. It runs unfused (the outputs equal the BF16 model's with the same "
        "unfused LoRA). To bake a LoRA in, fuse it into the BF16 model and compress that again."
    )


def register() -> None:
    """Add dfloat to diffusers' quantizer registry (idempotent)."""
    from diffusers.quantizers import auto

    auto.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, DFloatDiffusersConfig)
    auto.AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, DFloatDiffusersQuantizer)


register()  # importing this module is enough
