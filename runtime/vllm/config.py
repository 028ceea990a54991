"""``quant_method: "dfloat"`` for vLLM: the quantization config that vLLM builds from a dfloat folder's config.json.

vLLM reads ``quantization_config`` from config.json, looks ``"dfloat"`` up among the methods registered by
plugins (`dfloat.runtime.vllm.register`) and asks this config, layer by layer while it builds the model, for the
method that holds the layer's weights: linear layers (every vLLM parallel kind) and vocabulary-parallel
embeddings / LM heads get the dfloat methods of `dfloat.runtime.vllm.layers`; other layers keep vLLM's.

The config also knows the folder (vLLM passes the model path to `maybe_update_config`) and reads its units
itself (`CheckpointWeights`), because vLLM's weight stream carries the coded arrays under names that are no
parameter of any vLLM module: `get_checkpoint_weight_mapper` drops them from that stream, which then loads only
the plain tensors (norms, biases).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from dfloat.errors import FormatVersionError, ModelSourceError, ShapeMismatchError
from dfloat.format import FORMAT_VERSION, STORED_ARRAYS
from dfloat.runtime.vllm.weights import CheckpointWeights

log = logging.getLogger(__name__)

QUANT_METHOD = "dfloat"
DEFAULT_CHUNK_NUMEL = 1 << 26  # weights per embedding / LM head unit when the model has no linear layer


class DfloatConfig(QuantizationConfig):
    """Lossless: every weight decodes to its original BF16 bits right before its layer uses it."""

    def __init__(self, format_version: str | None = None):
        super().__init__()
        self.format_version = format_version
        self.model: str | None = None
        self.revision: str | None = None
        self._renames: list = []
        self._weights: CheckpointWeights | None = None
        self._by_vllm_name: dict[str, str] | None = (
            None  # vLLM's name of each coded tensor -> checkpoint name
        )
        self._layers: list[torch.nn.Module] = []  # every layer a dfloat method holds, in creation order
        self._loaded = 0
        self._load_started: float | None = None
        self.load_seconds: float | None = None  # decoding, sharding and coding again, this rank's layers

    # ---- what vLLM asks of every quantization config ------------------------------------------------------
    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # BF16 models; the decoders themselves run on any CUDA GPU

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DfloatConfig:
        version = str(config.get("format_version") or FORMAT_VERSION)
        if version.split(".")[0] != FORMAT_VERSION.split(".")[0]:
            raise FormatVersionError(
                f"dfloat checkpoint of format {version}; this dfloat reads {FORMAT_VERSION.split('.')[0]}.x: "
                "upgrade dfloat"
            )
        return cls(format_version=version)

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        self.model = model_name
        self.revision = revision

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self._renames.append(hf_to_vllm_mapper)
        self._by_vllm_name = None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from vllm.model_executor.layers.linear import LinearBase
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        from dfloat.runtime.vllm.layers import DfloatEmbeddingMethod, DfloatLinearMethod

        if isinstance(layer, LinearBase):
            return DfloatLinearMethod(self, prefix)
        if isinstance(layer, VocabParallelEmbedding):
            return DfloatEmbeddingMethod(self, prefix)
        return None

    def get_checkpoint_weight_mapper(self):
        """vLLM's stream minus the coded units' arrays (read by `CheckpointWeights`, not by vLLM)."""
        from vllm.model_executor.models.utils import WeightsMapper

        units = sorted(self.weights().units, key=len, reverse=True)
        pattern = rf"^(?:{'|'.join(map(re.escape, units))})\.(?:{'|'.join(STORED_ARRAYS)})$"
        return super().get_checkpoint_weight_mapper() | WeightsMapper(
            orig_to_new_regex={re.compile(pattern): None}
        )

    def __getstate__(self):
        state = self.__dict__.copy()  # sent to vLLM's workers before any model exists: no loading state
        state.update(_weights=None, _by_vllm_name=None, _layers=[], _loaded=0, _load_started=None)
        return state

    # ---- the folder --------------------------------------------------------------------------------------
    def folder(self) -> Path:
        if self.model is None:
            raise ModelSourceError(
                "the dfloat vLLM config was not given the model path (maybe_update_config)"
            )
        from dfloat.runtime.source import resolve_folder

        return resolve_folder(self.model, revision=self.revision)[0]

    def weights(self) -> CheckpointWeights:
        if self._weights is None:
            self._weights = CheckpointWeights(self.folder())
        return self._weights

    # ---- layers -----------------------------------------------------------------------------------------
    def add_layer(self, layer: torch.nn.Module) -> None:
        self._layers.append(layer)

    def chunk_numel(self) -> int:
        """Most weights one embedding / LM head unit holds: as many as the largest linear layer's, so that the
        vocabulary matrices need no more decoded room than the blocks do."""
        from vllm.model_executor.layers.linear import LinearBase

        sizes = [layer._dfloat.numel for layer in self._layers if isinstance(layer, LinearBase)]
        return max(sizes, default=DEFAULT_CHUNK_NUMEL)

    def layer_loading(self) -> None:
        if self._load_started is None:
            self._load_started = time.perf_counter()

    def layer_loaded(self) -> None:
        """Counts loaded layers; after the last one, checks that every coded tensor found its layer."""
        self._loaded += 1
        if self._loaded < len(self._layers):
            return
        weights = self.weights()
        unclaimed = sorted(set(weights.members) - weights.claimed)
        weights.release()
        self.load_seconds = time.perf_counter() - (self._load_started or time.perf_counter())
        log.info(
            "dfloat: %d layers decoded, sharded and coded again for this rank in %.1f s",
            len(self._layers),
            self.load_seconds,
        )
        if unclaimed and _pipeline_parallel_size() == 1:
            raise ShapeMismatchError(
                f"{weights.folder}: coded tensors that no vLLM linear or embedding layer uses: {unclaimed[:5]}"
                + (" ..." if len(unclaimed) > 5 else "")
                + "; the vLLM plugin serves models whose coded weights are all linear / embedding weights"
            )

    def by_vllm_name(self) -> dict[str, str]:
        """vLLM's name of every coded tensor (after the model's renames) -> its name in the checkpoint."""
        if self._by_vllm_name is None:
            self._by_vllm_name = {}
            for name in self.weights().members:
                renamed = name
                for mapper in self._renames:
                    renamed = mapper.map_name(renamed) or renamed
                self._by_vllm_name[renamed] = name
        return self._by_vllm_name

    def members_for(self, layer: torch.nn.Module, prefix: str) -> list[tuple[str, str | int | None]]:
        """The checkpoint tensors that make up ``layer``'s weight, with the shard id vLLM's weight loader takes
        for each (None: the tensor is the whole weight; "q"/"k"/"v" or 0, 1, ... for fused layers)."""
        from vllm.model_executor.layers.linear import QKVParallelLinear
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        weights = self.weights()
        by_vllm = self.by_vllm_name()
        if not prefix and isinstance(layer, VocabParallelEmbedding):
            return [(self._input_embedding(layer, by_vllm), None)]
        if f"{prefix}.weight" in by_vllm:
            return [(by_vllm[f"{prefix}.weight"], None)]
        parent, _, last = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(last)
        if parts:
            names = [f"{parent}.{p}.weight" if parent else f"{p}.weight" for p in parts]
            missing = [n for n in names if n not in by_vllm]
            if not missing:
                ids: list[str | int] = (
                    ["q", "k", "v"] if isinstance(layer, QKVParallelLinear) else list(range(len(parts)))
                )
                return [(by_vllm[n], i) for n, i in zip(names, ids)]
        raise ModelSourceError(
            f"{weights.folder}: no coded tensor for vLLM layer {prefix!r} ({type(layer).__name__}); "
            "was the folder written by `dfloat compress` from this model?"
        )

    def _input_embedding(self, layer: torch.nn.Module, by_vllm: dict[str, str]) -> str:
        """The checkpoint name of an input embedding that vLLM built without a prefix (Llama does): the one
        (vocabulary x hidden) tensor that no other dfloat layer claims, preferring names with "embed"."""
        shape = (layer.org_vocab_size, layer.embedding_dim)
        named = {f"{m._dfloat.prefix}.weight" for m in self._layers if m._dfloat.prefix}
        found = [c for v, c in by_vllm.items() if self.weights().members[c].shape == shape and v not in named]
        if len(found) > 1:
            found = [c for c in found if "embed" in c] or found
        if len(found) != 1:
            raise ModelSourceError(
                f"{self.weights().folder}: cannot tell which tensor is the input embedding "
                f"({list(shape)}): candidates {found}"
            )
        return found[0]


def _pipeline_parallel_size() -> int:
    try:
        from vllm.distributed import get_pp_group

        return get_pp_group().world_size
    except Exception:  # noqa: BLE001 - no distributed state (unit tests): one stage
        return 1
