"""The transformers model of a compressed folder, built from its config.json without allocating its weights: the
parameters stay on the meta device (they are filled by `dfloat.runtime.attach`), buffers are computed as
`from_pretrained` would."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from dfloat.errors import ModelSourceError


def _model_class(config, model_class):
    import transformers

    if model_class is not None:
        return model_class
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers.models.auto import modeling_auto

    for mapping in (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING, modeling_auto.MODEL_MAPPING):
        with contextlib.suppress(KeyError):
            return mapping[type(config)]
    raise ModelSourceError(
        f"no transformers class for model type {config.model_type!r} "
        f"(architectures {getattr(config, 'architectures', None)}); pass model_class="
    )


def build_empty_model(folder: Path, model_class, kwargs: dict):
    """The model with parameters on the meta device and buffers computed as `from_pretrained` would."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    with contextlib.suppress(ImportError):
        import dfloat.models  # noqa: F401 - registers the research architectures with the Auto classes
    trust = kwargs.pop("trust_remote_code", False)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust)
    except Exception as e:  # noqa: BLE001 - an unreadable config is a source problem
        raise ModelSourceError(f"{folder}: cannot build a config ({type(e).__name__}: {e})") from None
    cls = _model_class(config, model_class)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=torch.bfloat16, **kwargs)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # tied parameters must be one object before weights are attached
    model.eval()
    with contextlib.suppress(Exception):
        from transformers import GenerationConfig

        if (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(folder)
    return model
