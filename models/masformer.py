"""MASFormer (arXiv 2310.12442): mixed attention spans, full attention in a few bottom layers, sparse above.

Same q/k/v/o shapes in every layer; only which keys a query sees differs per layer. Rules are on token
positions (the count of real tokens before a slot in its row, so left padding does not move a boundary):
- "full_attention": causal.
- "sliding_attention": causal and ``q_pos - k_pos < attention_window`` (the query sees itself and the previous
  window - 1 tokens; transformers' sliding_window convention).
- "block_attention": causal and ``k_pos // attention_block_size >= q_pos // attention_block_size - 1`` (a query
  sees its own block up to itself and the whole previous block). The paper's exact block-sparse pattern is not
  public; "own + previous block" keeps at least ``attention_block_size`` tokens of context at every position.

Why it is cheaper (``sparse_attention_impl="chunked"``, the default): a sparse layer splits its queries into
chunks and runs attention of each chunk against only the keys the chunk's rule can reach, so its cost grows with
T x (window or 2 x block) instead of T^2; and its cache is a ``RollingWindowLayer`` that keeps only the last
``lookback`` entries (window - 1 for sliding, 2 x block - 1 for block), not the whole sequence.
``sparse_attention_impl="dense"`` is the reference: a T x T boolean mask over a cache that keeps everything.

Exactness: the chunked path adds the same products as the dense one, minus terms whose softmax weight is exactly
0, but in a different order (shorter rows, other kernel tiling), so the two agree to float rounding (about 1e-6
relative in float32), not bit for bit. Each path is deterministic on its own; the compressed model reproduces its
uncompressed original bit for bit because both run the same path.

The slot lookback bound (a query never needs a key more than ``lookback`` slots back) holds when padding sits at
the ends of a row (left or right padding, what tokenizers and generate() produce); the chunked path refuses a mask
with holes in the middle of a row (the dense path takes it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from .skeleton import (
    FULL_ATTENTION,
    DecoderConfig,
    DecoderForCausalLM,
    DecoderModel,
    StaticKVCache,
    combine_padding,
    full_attention_mask,
)

SLIDING_ATTENTION = "sliding_attention"
BLOCK_ATTENTION = "block_attention"
ATTENTION_SPANS = (FULL_ATTENTION, SLIDING_ATTENTION, BLOCK_ATTENTION)
SPARSE_TYPES = {"sliding": SLIDING_ATTENTION, "block": BLOCK_ATTENTION}
SPARSE_IMPLS = ("chunked", "dense")


def token_positions(padding_mask: torch.Tensor | None, kv_len: int, device) -> torch.Tensor:
    """(batch|1, kv_len) position of every slot: real tokens before it in its row (pads get -1 and below)."""
    if padding_mask is None:
        return torch.arange(kv_len, device=device)[None]
    return padding_mask[:, :kv_len].to(torch.int64).cumsum(-1) - 1


def span_rule(
    span: str, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, block_size: int
) -> torch.Tensor:
    """Span rule on token positions, broadcasting q_pos[..., :, None] against k_pos[..., None, :] (causality apart)."""
    q, k = q_pos[..., :, None], k_pos[..., None, :]
    if span == SLIDING_ATTENTION:
        return q - k < window
    if span == BLOCK_ATTENTION:
        return (
            torch.div(k, block_size, rounding_mode="floor")
            >= torch.div(q, block_size, rounding_mode="floor") - 1
        )
    if span == FULL_ATTENTION:
        return torch.ones(q.shape[:-1] + k.shape[-1:], dtype=torch.bool, device=q_pos.device)
    raise ValueError(f"unknown attention span {span!r}: expected one of {ATTENTION_SPANS}")


def span_allowed(span: str, q_slots: torch.Tensor, kv_len: int, window: int, block_size: int) -> torch.Tensor:
    """(q, kv) boolean mask of one span without padding (positions = slots): the dense reference rule."""
    k_slots = torch.arange(kv_len, device=q_slots.device)
    causal = k_slots[None, :] <= q_slots[:, None]
    return causal & span_rule(span, q_slots, k_slots, window, block_size)


def span_lookback(span: str, window: int, block_size: int) -> int:
    """Most slots back a query of this span can need (with padding only at the ends of rows)."""
    return window - 1 if span == SLIDING_ATTENTION else 2 * block_size - 1


def _padding_at_ends(padding_mask: torch.Tensor) -> bool:
    """True when every row's real tokens are one contiguous run (left and/or right padding only)."""
    m = padding_mask.to(torch.int8)
    starts = (m[:, 1:] > m[:, :-1]).sum(-1) + m[:, 0]  # runs of ones per row
    return bool((starts <= 1).all())


class RollingWindowLayer(DynamicLayer):
    """A cache layer that keeps only the last ``keep`` entries, yet counts every slot it has seen.

    ``update`` returns the kept entries plus the new ones (what this call's queries may need), then drops all but
    the last ``keep``. ``get_seq_length`` is the number of slots seen, so positions stay right.
    """

    is_sliding = True

    def __init__(self, keep: int):
        super().__init__()
        self.keep = keep
        self.cumulative_length = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values = keys[..., -self.keep :, :], values[..., -self.keep :, :]
        if self.keep == 0:
            self.keys, self.values = keys[..., :0, :], values[..., :0, :]
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = 0 if self.keys is None else self.keys.shape[-2]
        return kept + query_length, self.cumulative_length - kept

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` slots; refused once evicted entries would be needed again."""
        if tokens_to_remove > 0:
            raise ValueError("RollingWindowLayer.crop takes a negative count of slots to remove")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        kept = self.keys.shape[-2]
        if self.cumulative_length > kept:
            raise RuntimeError(
                "cannot rewind a MASFormer rolling-window cache after it has evicted entries; "
                "use sparse_attention_impl='dense' to keep every entry"
            )
        self.keys, self.values = self.keys[..., : kept - n, :], self.values[..., : kept - n, :]
        self.cumulative_length -= n

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0


class ChunkedSpanAttention:
    """The mask object of a sparse layer under the chunked implementation: it runs the attention itself.

    ``attention()`` in the skeleton calls ``attend(q, k, v, backend)`` with the keys the cache returned, which end
    at the last query's slot and may start after slot 0 (a rolling cache).
    """

    def __init__(self, span, q_slots, positions, padding_mask, window, block_size, chunk):
        self.span, self.window, self.block_size = span, window, block_size
        self.q_slots = q_slots
        self.positions = positions  # (batch|1, past + seq)
        self.padding_mask = padding_mask  # (batch, >= past + seq) or None
        self.chunk = chunk
        self.lookback = span_lookback(span, window, block_size)

    def _mask(self, q_idx: slice, k_lo: int, k_hi: int) -> torch.Tensor:
        """(batch|1, 1, q, k) boolean for queries q_idx and key slots [k_lo, k_hi)."""
        qs = self.q_slots[q_idx]
        ks = torch.arange(k_lo, k_hi, device=qs.device)
        q_pos = self.positions[:, qs]
        k_pos = self.positions[:, k_lo:k_hi]
        allowed = (ks[None, :] <= qs[:, None])[None] & span_rule(
            self.span, q_pos, k_pos, self.window, self.block_size
        )
        if self.padding_mask is not None:
            allowed = allowed & self.padding_mask[:, None, k_lo:k_hi].to(torch.bool)
        return allowed[:, None]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
        n, kv_len = q.shape[-2], k.shape[-2]
        total = int(self.q_slots[-1]) + 1
        k_start = total - kv_len  # slot of k[..., 0, :]
        q0 = int(self.q_slots[0])
        outs = []
        first = q0 - q0 % self.chunk  # chunk edges on multiples of ``chunk`` (block edges without padding)
        edges = [q0] + list(range(first + self.chunk, q0 + n, self.chunk)) + [q0 + n]
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            k_lo = max(k_start, lo - self.lookback)
            if self.span == BLOCK_ATTENTION and self.padding_mask is None:
                k_lo = max(
                    k_start, lo - lo % self.block_size - self.block_size
                )  # exact: previous block start
            mask = self._mask(slice(lo - q0, hi - q0), k_lo, hi)
            qc = q[..., lo - q0 : hi - q0, :]
            kc, vc = k[..., k_lo - k_start : hi - k_start, :], v[..., k_lo - k_start : hi - k_start, :]
            outs.append(_masked_attention(qc, kc, vc, mask, backend))
        return torch.cat(outs, dim=-2)


def _masked_attention(q, k, v, allowed: torch.Tensor, backend: str) -> torch.Tensor:
    """Softmax attention under a boolean mask, the same arithmetic as the skeleton's dense path."""
    scale = q.shape[-1] ** -0.5
    if backend == "sdpa":
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~allowed, torch.finfo(q.dtype).min
        )
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)).to(torch.float32) * scale
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


class MASFormerConfig(DecoderConfig):
    """Mixed attention spans. The number of full layers, window and block size are not public: defaults are guesses.

    Args (beyond DecoderConfig):
        num_full_attention_layers: how many bottom layers use full attention (default 4).
        sparse_attention_type: "sliding" or "block", the span of the other layers.
        attention_window: tokens a sliding layer sees, itself included (default 1024).
        attention_block_size: block size of block layers (default 512).
        attention_spans: optional per-layer list of "full_attention" / "sliding_attention" / "block_attention";
            overrides the three values above. (Not called ``layer_types``: transformers' DynamicCache reads that
            name and would build its own evicting sliding cache.)
        sparse_attention_impl: "chunked" (default: compute and cache only what a sparse span can see) or "dense"
            (the reference: T x T mask, whole cache).
        sparse_query_chunk: queries per chunk of a sliding layer (default: max(16, window // 4)); block layers use
            one block per chunk.
    """

    model_type = "masformer"

    def __init__(
        self,
        num_full_attention_layers: int = 4,
        sparse_attention_type: str = "sliding",
        attention_window: int = 1024,
        attention_block_size: int = 512,
        attention_spans: list[str] | None = None,
        sparse_attention_impl: str = "chunked",
        sparse_query_chunk: int | None = None,
        **kwargs,
    ):
        if sparse_attention_type not in SPARSE_TYPES:
            raise ValueError(
                f"sparse_attention_type={sparse_attention_type!r}: expected one of {list(SPARSE_TYPES)}"
            )
        if sparse_attention_impl not in SPARSE_IMPLS:
            raise ValueError(
                f"sparse_attention_impl={sparse_attention_impl!r}: expected one of {SPARSE_IMPLS}"
            )
        if attention_window < 1 or attention_block_size < 1:
            raise ValueError("attention_window and attention_block_size must be >= 1")
        if sparse_query_chunk is not None and sparse_query_chunk < 1:
            raise ValueError("sparse_query_chunk must be >= 1")
        self.num_full_attention_layers = num_full_attention_layers
        self.sparse_attention_type = sparse_attention_type
        self.attention_window = attention_window
        self.attention_block_size = attention_block_size
        self.attention_spans = list(attention_spans) if attention_spans is not None else None
        self.sparse_attention_impl = sparse_attention_impl
        self.sparse_query_chunk = sparse_query_chunk
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

    def query_chunk(self, span: str) -> int:
        if span == BLOCK_ATTENTION:
            return self.attention_block_size
        return self.sparse_query_chunk or max(16, self.attention_window // 4)


class MASFormerModel(DecoderModel):
    config_class = MASFormerConfig

    def forward(self, *args, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        # A StaticKVCache (dfloat.generate's CUDA-graph path) keeps every slot: its sparse layers then use the
        # dense-mask reference, which needs no rolling cache.
        self._dense_spans = isinstance(cache, StaticKVCache)
        if cache is not None and self.config.sparse_attention_impl == "chunked" and not self._dense_spans:
            self._install_rolling_layers(cache)
        return super().forward(*args, cache=cache, **kwargs)

    def _install_rolling_layers(self, cache) -> None:
        """Give an empty cache one RollingWindowLayer per sparse layer (full layers keep DynamicLayer)."""
        if cache.get_seq_length() != 0 or any(isinstance(la, RollingWindowLayer) for la in cache.layers):
            return
        cfg = self.config
        layers = []
        for span in cfg.resolved_attention_spans():
            if span == FULL_ATTENTION:
                layers.append(DynamicLayer())
            else:
                layers.append(
                    RollingWindowLayer(span_lookback(span, cfg.attention_window, cfg.attention_block_size))
                )
        cache.layers = layers

    def build_attention_masks(self, q_slots, kv_len, padding_mask):
        cfg = self.config
        chunked = cfg.sparse_attention_impl == "chunked" and not getattr(self, "_dense_spans", False)
        if chunked and padding_mask is not None and not _padding_at_ends(padding_mask[:, :kv_len]):
            raise ValueError(
                "MASFormer's chunked sparse attention needs padding only at the ends of each row of attention_mask "
                "(left or right padding); use sparse_attention_impl='dense' for masks with holes"
            )
        positions = token_positions(padding_mask, kv_len, q_slots.device)
        by_span = {}
        masks = []
        for span in cfg.resolved_attention_spans():
            if span not in by_span:
                if span == FULL_ATTENTION:
                    by_span[span] = full_attention_mask(q_slots, kv_len, padding_mask)
                elif chunked:
                    by_span[span] = ChunkedSpanAttention(
                        span, q_slots, positions, padding_mask, cfg.attention_window,
                        cfg.attention_block_size, cfg.query_chunk(span),
                    )  # fmt: skip
                else:
                    by_span[span] = self._dense_mask(span, q_slots, kv_len, positions, padding_mask)
            masks.append(by_span[span])
        return masks

    def _dense_mask(self, span, q_slots, kv_len, positions, padding_mask):
        """The reference: the full (batch|1, 1, q, kv) boolean mask on token positions."""
        cfg = self.config
        k_slots = torch.arange(kv_len, device=q_slots.device)
        causal = k_slots[None, :] <= q_slots[:, None]
        rule = span_rule(
            span, positions[:, q_slots], positions, cfg.attention_window, cfg.attention_block_size
        )
        return combine_padding(causal, padding_mask) & rule[:, None]


class MASFormerForCausalLM(DecoderForCausalLM):
    config_class = MASFormerConfig
    base_model_class = MASFormerModel
