"""The dfloat methods of vLLM's layers: coded weights held per rank, decoded right before each product.

Loading (once per layer, after vLLM has read the plain tensors): the layer's checkpoint tensors are decoded on
the CPU (`CheckpointWeights`) and handed to the layer's *own* vLLM weight loader, exactly as vLLM would hand it
the BF16 tensors, so this rank's shard is whatever vLLM makes of them: a row range of column-parallel layers
(q/k/v and gate/up fused, KV heads replicated when there are fewer than ranks), a column slice of row-parallel
ones, a padded vocabulary range of embeddings and LM heads. That shard is then coded again on its own (its own
Huffman code) and only the coded arrays stay on the device: each rank holds its compressed shard, nothing else
(docs/vllm.md, docs/FORMAT.md "Serving with vLLM").

Running: ``torch.ops.dfloat.decode`` (`dfloat.runtime.decode_op`) decodes the shard into a fresh BF16 tensor
right before ``F.linear`` / ``F.embedding`` use it, the same calls vLLM makes on BF16 weights, so the outputs are
the BF16 model's. Embedding and LM head shards bigger than the largest linear layer are coded in row chunks:
the LM head multiplies chunk by chunk where that is bit-identical to the whole matrix (checked at load with one
input row, and for each other number of rows at its first call: ``torch.ops.dfloat.row_chunked_linear``), else
decodes it whole; the embedding gathers from every chunk and keeps each id's row from the chunk that
holds it (a gather, exact by construction, and free of host reads, so CUDA graphs can record it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.utils import set_weight_attrs

import dfloat.runtime.decode_op  # noqa: F401 - registers torch.ops.dfloat.decode
from dfloat.codec import compress_tensor
from dfloat.errors import UnsupportedDtypeError
from dfloat.runtime.decode_op import chunk_names, register_unit

log = logging.getLogger(__name__)


@dataclass
class Part:
    """Rows ``[r0, r1)`` of the layer's shard, coded as one unit registered as ``key``; its anchor array is the
    layer buffer ``buffer``."""

    r0: int
    r1: int
    key: str
    buffer: str


@dataclass
class LayerWeights:
    """What a dfloat method keeps on its layer (``layer._dfloat``)."""

    prefix: str
    rows: int  # this rank's shard: rows x cols, as vLLM's unquantized weight would be
    cols: int
    weight_loader: object
    device: torch.device
    parts: list[Part] = field(default_factory=list)
    tied_to: torch.nn.Module | None = None  # an LM head that is the input embedding's weight
    key: str = ""  # the name its units are registered under: part i is "key#i" (decode_op.chunk_names)

    @property
    def numel(self) -> int:
        return self.rows * self.cols


class _DfloatMethod(QuantizeMethodBase):
    def __init__(self, config, prefix: str):
        self.config = config
        self.prefix = prefix

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        if params_dtype != torch.bfloat16:
            raise UnsupportedDtypeError(
                f"vLLM layer {self.prefix!r}: dfloat checkpoints hold BF16 weights, the model runs in "
                f"{params_dtype}; serve with dtype='bfloat16' (the default for these checkpoints)"
            )
        layer._dfloat = LayerWeights(
            prefix=self.prefix,
            rows=sum(output_partition_sizes),
            cols=input_size_per_partition,
            weight_loader=extra_weight_attrs["weight_loader"],
            device=torch.empty(0).device,  # vLLM builds the model under its target device
        )
        self.config.add_layer(layer)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        state: LayerWeights = layer._dfloat
        self.config.layer_loading()
        if state.tied_to is None and not state.parts:
            self._load(layer, state)
        self.config.layer_loaded()

    def _load(self, layer: torch.nn.Module, state: LayerWeights) -> None:
        members = self.config.members_for(layer, state.prefix)
        weights = self.config.weights()
        shard = torch.nn.Parameter(
            torch.zeros(state.rows, state.cols, dtype=torch.bfloat16), requires_grad=False
        )
        set_weight_attrs(shard, {"input_dim": 1, "output_dim": 0})
        for name, shard_id in members:
            full = weights.tensor(name)
            if full.dtype != torch.bfloat16:
                raise UnsupportedDtypeError(
                    f"{weights.folder}: tensor {name!r} is {full.dtype}; the vLLM plugin serves BF16 weights"
                )
            if shard_id is None:
                state.weight_loader(shard, full)
            else:
                state.weight_loader(shard, full, shard_id)
        label = state.prefix or members[0][0].removesuffix(".weight")
        state.key = f"{self.config.model}|{label}"
        chunks = self.row_chunks(state)
        for i, ((r0, r1), key) in enumerate(zip(chunks, chunk_names(state.key, len(chunks)))):
            ct = compress_tensor(shard.data[r0:r1], name=f"{label}[{r0}:{r1}]").to(state.device)
            register_unit(key, ct, (r1 - r0, state.cols))
            for array, t in ct.stored_tensors().items():  # visible to memory accounting, not saved
                layer.register_buffer(f"dfloat_{i}_{array}", t, persistent=False)
            anchor = "sign_mantissa" if ct.is_coded else "raw"
            state.parts.append(Part(r0, r1, key, f"dfloat_{i}_{anchor}"))
        log.debug("dfloat: %s holds %d x %d in %d unit(s)", label, state.rows, state.cols, len(state.parts))

    def row_chunks(self, state: LayerWeights) -> list[tuple[int, int]]:
        return [(0, state.rows)]


def decoded(owner: torch.nn.Module, part: Part) -> torch.Tensor:
    return torch.ops.dfloat.decode(getattr(owner, part.buffer), part.key)


def linear(owner: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    parts = owner._dfloat.parts
    if len(parts) == 1:
        return F.linear(x, decoded(owner, parts[0]), bias)
    return torch.ops.dfloat.row_chunked_linear(
        x, [getattr(owner, p.buffer) for p in parts], owner._dfloat.key, bias
    )


class DfloatLinearMethod(_DfloatMethod, LinearMethodBase):
    """Every vLLM linear layer kind (replicated, column / row parallel, merged, QKV)."""

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return linear(layer, x, bias)


class DfloatEmbeddingMethod(_DfloatMethod):
    """VocabParallelEmbedding (lookups) and ParallelLMHead (logits), tied or not."""

    def row_chunks(self, state: LayerWeights) -> list[tuple[int, int]]:
        from dfloat.runtime.chunked import chunked_linear_is_exact

        rows = max(1, self.config.chunk_numel() // state.cols)
        if rows < state.rows and not chunked_linear_is_exact(state.device, state.rows, state.cols, rows):
            log.info("dfloat: %s decoded whole (row-chunked products are not exact here)", state.prefix)
            rows = state.rows
        return [(r, min(r + rows, state.rows)) for r in range(0, state.rows, rows)]

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module) -> torch.nn.Module:
        """Share the embedding's units, unless the folder holds an LM head of its own: vLLM then uses that one
        (it unties a config's tied embeddings when the checkpoint has an LM head)."""
        if f"{self.prefix}.weight" not in self.config.by_vllm_name():
            layer._dfloat.tied_to = embed_tokens
        return layer

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        tied = layer._dfloat.tied_to
        return linear(layer if tied is None else tied, x, bias)

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        parts = layer._dfloat.parts
        if len(parts) == 1:
            return F.embedding(input_, decoded(layer, parts[0]))
        out = None
        for p in parts:  # every id lies in exactly one chunk: keep the row from that chunk
            local = input_ - p.r0
            rows = F.embedding(local.clamp(0, p.r1 - p.r0 - 1), decoded(layer, p))
            inside = (local >= 0) & (local < p.r1 - p.r0)
            out = rows if out is None else torch.where(inside.unsqueeze(-1), rows, out)
        return out


def weight_memory(model: torch.nn.Module) -> dict:
    """What this rank holds for the model's weights, in bytes: coded units, plain tensors (norms, biases), and
    what vLLM would hold for the same layers in BF16; plus the largest weight decoded at one time. Pass it to
    ``vllm.LLM.apply_model`` to get one report per rank."""
    coded = plain = bf16 = decode = units = 0
    load_seconds = None
    for module in model.modules():
        state = getattr(module, "_dfloat", None)
        if isinstance(state, LayerWeights):
            load_seconds = module.quant_method.config.load_seconds
        if isinstance(state, LayerWeights) and state.tied_to is None:
            bf16 += 2 * state.numel
            units += len(state.parts)
            decode = max([decode] + [2 * (p.r1 - p.r0) * state.cols for p in state.parts])
        for name, t in module.named_buffers(recurse=False):
            if name.startswith("dfloat_"):
                coded += t.numel() * t.element_size()
        for p in module.parameters(recurse=False):
            plain += p.numel() * p.element_size()
    return {
        "coded_bytes": coded,
        "plain_bytes": plain,
        "largest_decode_bytes": decode,
        "bf16_weight_bytes": bf16 + plain,
        "units": units,
        "load_seconds": load_seconds,
    }
