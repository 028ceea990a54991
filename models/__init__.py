"""The four research architectures as transformers models, registered with the Auto classes on import.

After ``import dfloat.models``, ``AutoModelForCausalLM.from_pretrained(folder)`` loads a folder whose config.json
has model_type "polycom", "masformer", "nextlat" or "bottlenecked". Importing twice is harmless (exist_ok).
Mechanisms and their unknowns: docs/architectures.md.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .bottleneck import (
    BottleneckedConfig,
    BottleneckedForCausalLM,
    BottleneckedModel,
    CacheProcessor,
    RewriteEvent,
    newline_token_ids,
)
from .masformer import MASFormerConfig, MASFormerForCausalLM, MASFormerModel, span_allowed
from .nextlat import LatentHead, NextLatConfig, NextLatForCausalLM, NextLatModel, SpeculativeStats
from .polycom import PolyComConfig, PolyComForCausalLM, PolyComMLP, PolyComModel, PolyNorm, PolyReLU
from .skeleton import DecoderConfig, DecoderForCausalLM, DecoderModel, StaticKVCache

ARCHITECTURES = {
    "polycom": (PolyComConfig, PolyComModel, PolyComForCausalLM),
    "masformer": (MASFormerConfig, MASFormerModel, MASFormerForCausalLM),
    "nextlat": (NextLatConfig, NextLatModel, NextLatForCausalLM),
    "bottlenecked": (BottleneckedConfig, BottleneckedModel, BottleneckedForCausalLM),
}


def register_auto_classes() -> None:
    """Register every architecture with AutoConfig / AutoModel / AutoModelForCausalLM (idempotent)."""
    for model_type, (config_cls, model_cls, lm_cls) in ARCHITECTURES.items():
        AutoConfig.register(model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, model_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)


register_auto_classes()

__all__ = [
    "ARCHITECTURES",
    "BottleneckedConfig",
    "BottleneckedForCausalLM",
    "BottleneckedModel",
    "CacheProcessor",
    "DecoderConfig",
    "DecoderForCausalLM",
    "DecoderModel",
    "LatentHead",
    "MASFormerConfig",
    "MASFormerForCausalLM",
    "MASFormerModel",
    "NextLatConfig",
    "NextLatForCausalLM",
    "NextLatModel",
    "PolyComConfig",
    "PolyComForCausalLM",
    "PolyComMLP",
    "PolyComModel",
    "PolyNorm",
    "PolyReLU",
    "RewriteEvent",
    "SpeculativeStats",
    "StaticKVCache",
    "newline_token_ids",
    "register_auto_classes",
    "span_allowed",
]
