"""MASFormer (arXiv 2310.12442): mixed attention spans, full attention in a few bottom layers, sparse above.

Same q/k/v/o shapes in every layer; only the attention mask differs per layer:
- "full_attention": causal.
- "sliding_attention": causal and ``query - key < attention_window`` (the query sees itself and the previous
  window - 1 tokens; the same convention as transformers' sliding_window).
- "block_attention": causal and ``key // attention_block_size >= query // attention_block_size - 1`` (a query sees
  its own block up to itself and the whole previous block). The paper's exact block-sparse pattern is not public;
  this "own + previous block" choice keeps at least ``attention_block_size`` tokens of context at every position.

Masks are computed on cache slots, so cached decoding sees exactly what a full forward sees. The cache keeps every
entry (no sliding-window eviction), which costs memory but keeps block attention and rewinding simple.
"""

from __future__ import annotations

import torch

from .skeleton import (
    FULL_ATTENTION,
    DecoderConfig,
    DecoderForCausalLM,
    DecoderModel,
    causal_allowed,
    combine_padding,
    full_attention_mask,
)

SLIDING_ATTENTION = "sliding_attention"
BLOCK_ATTENTION = "block_attention"
ATTENTION_SPANS = (FULL_ATTENTION, SLIDING_ATTENTION, BLOCK_ATTENTION)
SPARSE_TYPES = {"sliding": SLIDING_ATTENTION, "block": BLOCK_ATTENTION}


def span_allowed(span: str, q_slots: torch.Tensor, kv_len: int, window: int, block_size: int) -> torch.Tensor:
    """(q, kv) boolean mask for one attention span (see the module docstring for the rules)."""
    allowed = causal_allowed(q_slots, kv_len)
    k_slots = torch.arange(kv_len, device=q_slots.device)
    if span == SLIDING_ATTENTION:
        allowed = allowed & (k_slots[None, :] > q_slots[:, None] - window)
    elif span == BLOCK_ATTENTION:
        allowed = allowed & ((k_slots // block_size)[None, :] >= (q_slots // block_size)[:, None] - 1)
    elif span != FULL_ATTENTION:
        raise ValueError(f"unknown attention span {span!r}: expected one of {ATTENTION_SPANS}")
    return allowed


class MASFormerConfig(DecoderConfig):
    """Mixed attention spans. The number of full layers, window and block size are not public: defaults are guesses.

    Args (beyond DecoderConfig):
        num_full_attention_layers: how many bottom layers use full attention (default 4).
        sparse_attention_type: "sliding" or "block", the span of the other layers.
        attention_window: tokens a sliding layer sees, itself included (default 1024).
        attention_block_size: block size of block layers (default 512).
        attention_spans: optional per-layer list of "full_attention" / "sliding_attention" / "block_attention";
            overrides the three values above. (Not called ``layer_types``: transformers' DynamicCache reads that
            name and would build an evicting sliding cache.)
    """

    model_type = "masformer"

    def __init__(
        self,
        num_full_attention_layers: int = 4,
        sparse_attention_type: str = "sliding",
        attention_window: int = 1024,
        attention_block_size: int = 512,
        attention_spans: list[str] | None = None,
        **kwargs,
    ):
        if sparse_attention_type not in SPARSE_TYPES:
            raise ValueError(
                f"sparse_attention_type={sparse_attention_type!r}: expected one of {list(SPARSE_TYPES)}"
            )
        if attention_window < 1 or attention_block_size < 1:
            raise ValueError("attention_window and attention_block_size must be >= 1")
        self.num_full_attention_layers = num_full_attention_layers
        self.sparse_attention_type = sparse_attention_type
        self.attention_window = attention_window
        self.attention_block_size = attention_block_size
        self.attention_spans = list(attention_spans) if attention_spans is not None else None
        super().__init__(**kwargs)
        if self.attention_spans is not None:
            if len(self.attention_spans) != self.num_hidden_layers:
                raise ValueError(
                    f"attention_spans has {len(self.attention_spans)} entries for {self.num_hidden_layers} layers"
                )
            bad = sorted(set(self.attention_spans) - set(ATTENTION_SPANS))
            if bad:
                raise ValueError(f"attention_spans has unknown spans {bad}: expected {ATTENTION_SPANS}")

    def resolved_attention_spans(self) -> list[str]:
        """The span of every layer: the explicit list, else full at the bottom and sparse above."""
        if self.attention_spans is not None:
            return list(self.attention_spans)
        sparse = SPARSE_TYPES[self.sparse_attention_type]
        n_full = min(self.num_full_attention_layers, self.num_hidden_layers)
        return [FULL_ATTENTION] * n_full + [sparse] * (self.num_hidden_layers - n_full)


class MASFormerModel(DecoderModel):
    config_class = MASFormerConfig

    def build_attention_masks(self, q_slots, kv_len, padding_mask):
        cfg = self.config
        by_span = {}
        masks = []
        for span in cfg.resolved_attention_spans():
            if span not in by_span:
                if span == FULL_ATTENTION:
                    by_span[span] = full_attention_mask(q_slots, kv_len, padding_mask)
                else:
                    allowed = span_allowed(
                        span, q_slots, kv_len, cfg.attention_window, cfg.attention_block_size
                    )
                    by_span[span] = combine_padding(allowed, padding_mask)
            masks.append(by_span[span])
        return masks


class MASFormerForCausalLM(DecoderForCausalLM):
    config_class = MASFormerConfig
    base_model_class = MASFormerModel
