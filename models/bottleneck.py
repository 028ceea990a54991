"""Bottlenecked Transformer (arXiv 2505.16950): a Cache Processor that rewrites the KV cache at step boundaries.

A backbone decoder plus a small non-causal Transformer (the Cache Processor). When a trigger token (a newline by
default) has been run through the backbone, so that its own KV entries are in the cache, the processor rewrites,
for every layer, in place:
- the entries of the step just finished: cache slots [start of step, trigger slot], the trigger included;
- the top-k earlier entries (``reconsolidate_top_k``), chosen per layer by attention mass: queries are not cached,
  so the step's keys stand in for them; mass(j) = sum over the step's keys i and KV heads of
  softmax_j(k_i . k_j / sqrt(head_dim)) over earlier slots j. Ties go to torch.topk; indices are kept sorted.

Processing: each entry is [key; value] flattened over KV heads (2 * kv_heads * head_dim), projected to the
processor's width, plus a learned per-layer embedding, then ``processor_num_layers`` bidirectional pre-norm
attention + MLP layers (no mask, no positional encoding: keys are rewritten post-RoPE, so they already carry
their position), then projected back and added as a residual: new = old + out_proj(...). Layers are a batch
dimension of one processor call. All processor matrices are nn.Linear / nn.Embedding weights.

Choices for what the paper leaves open (all config values): processor size, k, trigger ids, whether prompt
newlines trigger (off by default), keys rewritten post-RoPE (fixed: the cache holds post-RoPE keys, so no
un-rotation is needed and a rewritten key stays at its slot's position).

Timing: the rewrite happens inside the forward that consumed the trigger, after the backbone wrote the trigger's
entries, so the logits of that forward (predicting the token after the trigger) are the plain backbone's and every
later position sees the rewritten cache. A forward over many tokens is split after each trigger, so a full
forward of a sequence equals token-by-token cached decoding (``trigger_from`` tells it where the prompt ends).
With labels (teacher forcing), every trigger counts unless ``trigger_from`` says otherwise, so training reaches
the processor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from .skeleton import DecoderConfig, DecoderForCausalLM, DecoderModel, RMSNorm

logger = logging.getLogger(__name__)

NEWLINE_TOKEN_IDS = [198]  # "\n" in GPT-2, Llama-3 and Qwen2/2.5 byte-level BPE vocabularies


def newline_token_ids(tokenizer) -> list[int]:
    """Ids of every vocabulary entry whose decoded text contains a newline, for ``trigger_token_ids``."""
    ids = []
    for token_id in range(len(tokenizer)):
        if "\n" in tokenizer.decode([token_id]):
            ids.append(token_id)
    return ids


class BottleneckedConfig(DecoderConfig):
    """Args (beyond DecoderConfig); sizes are not public, defaults are guesses:
    use_cache_processor: run the Cache Processor during forward/generate (False = plain backbone).
    processor_num_layers, processor_hidden_size, processor_num_heads, processor_intermediate_size: the
        processor's own Transformer (default 2 layers, width 256, 4 heads, MLP 4 x width).
    reconsolidate_top_k: earlier entries rewritten per layer at each trigger (default 16).
    trigger_token_ids: token ids that end a step (default [198], "\\n" in GPT-2/Llama-3/Qwen2 vocabularies;
        ``newline_token_ids(tokenizer)`` lists them for another tokenizer).
    trigger_on_prompt: whether triggers inside the prompt rewrite the cache during prefill (default False).
    """

    model_type = "bottlenecked"

    def __init__(
        self,
        use_cache_processor: bool = True,
        processor_num_layers: int = 2,
        processor_hidden_size: int = 256,
        processor_num_heads: int = 4,
        processor_intermediate_size: int | None = None,
        reconsolidate_top_k: int = 16,
        trigger_token_ids: list[int] | None = None,
        trigger_on_prompt: bool = False,
        **kwargs,
    ):
        if processor_hidden_size % processor_num_heads != 0:
            raise ValueError(
                f"processor_hidden_size ({processor_hidden_size}) must be a multiple of "
                f"processor_num_heads ({processor_num_heads})"
            )
        if reconsolidate_top_k < 0:
            raise ValueError("reconsolidate_top_k must be >= 0")
        self.use_cache_processor = use_cache_processor
        self.processor_num_layers = processor_num_layers
        self.processor_hidden_size = processor_hidden_size
        self.processor_num_heads = processor_num_heads
        self.processor_intermediate_size = (
            4 * processor_hidden_size if processor_intermediate_size is None else processor_intermediate_size
        )
        self.reconsolidate_top_k = reconsolidate_top_k
        self.trigger_token_ids = list(NEWLINE_TOKEN_IDS if trigger_token_ids is None else trigger_token_ids)
        self.trigger_on_prompt = trigger_on_prompt
        super().__init__(**kwargs)


class ProcessorAttention(nn.Module):
    """Bidirectional multi-head self-attention over the selected entries (no mask, no RoPE)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        hd = w // self.num_heads

        def heads(t):
            return t.view(b, n, self.num_heads, hd).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, n, w))


class ProcessorLayer(nn.Module):
    def __init__(self, config: BottleneckedConfig):
        super().__init__()
        w, f = config.processor_hidden_size, config.processor_intermediate_size
        self.input_layernorm = RMSNorm(w, eps=config.rms_norm_eps)
        self.self_attn = ProcessorAttention(w, config.processor_num_heads)
        self.post_attention_layernorm = RMSNorm(w, eps=config.rms_norm_eps)
        self.up_proj = nn.Linear(w, f, bias=False)
        self.down_proj = nn.Linear(f, w, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.down_proj(F.gelu(self.up_proj(self.post_attention_layernorm(x))))


class CacheProcessor(nn.Module):
    """Maps (backbone layers, n entries, 2 * kv_dim) cache entries to their rewritten values (residual)."""

    def __init__(self, config: BottleneckedConfig):
        super().__init__()
        entry = 2 * config.num_key_value_heads * config.head_dim
        w = config.processor_hidden_size
        self.in_proj = nn.Linear(entry, w, bias=False)
        self.layer_embed = nn.Embedding(config.num_hidden_layers, w)
        self.layers = nn.ModuleList([ProcessorLayer(config) for _ in range(config.processor_num_layers)])
        self.norm = RMSNorm(w, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(w, entry, bias=False)

    def forward(self, entries: torch.Tensor, layer_ids: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(entries) + self.layer_embed(layer_ids)[:, None, :]
        for layer in self.layers:
            x = layer(x)
        return entries + self.out_proj(self.norm(x))


@dataclass(frozen=True)
class RewriteEvent:
    """One layer's rewrite: at trigger slot ``position`` of batch row ``batch_index``, slots ``indices``."""

    position: int
    layer: int
    indices: tuple[int, ...]
    batch_index: int = 0


@dataclass
class _ProcessorState:
    """Per-cache bookkeeping, stored on the cache object so it lives exactly as long as one generation."""

    trigger_from: int
    step_start: list[int] = field(default_factory=list)


_STATE_ATTR = "_dfloat_cache_processor_state"


def _select_earlier(
    keys: torch.Tensor, step_idx: torch.Tensor, candidates: torch.Tensor, k: int
) -> torch.Tensor:
    """Top-k candidate slots by softmax attention mass from the step's keys (keys: (kv_heads, T, d))."""
    q = keys[:, step_idx].to(torch.float32)
    kk = keys[:, candidates].to(torch.float32)
    scores = torch.matmul(q, kk.transpose(-1, -2)) * keys.shape[-1] ** -0.5
    mass = torch.softmax(scores, dim=-1).sum(dim=(0, 1))
    top = torch.topk(mass, k).indices
    return candidates[top].sort().values


class BottleneckedModel(DecoderModel):
    config_class = BottleneckedConfig


class BottleneckedForCausalLM(DecoderForCausalLM):
    config_class = BottleneckedConfig
    base_model_class = BottleneckedModel
    # read by dfloat.runtime.generate, which then runs this model eagerly
    static_cache_unsupported = "its Cache Processor rewrites past cache entries, which a static cache cannot replay"

    def build_extra_modules(self, config: BottleneckedConfig) -> None:
        self.cache_processor = CacheProcessor(config)
        self.rewrite_log: list[RewriteEvent] = []

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: DynamicCache | None = None,
        trigger_from: int | None = None,
        **kwargs,
    ):
        """As DecoderForCausalLM.forward, plus cache rewrites after triggers.

        trigger_from: first cache slot whose trigger tokens count, used when this call starts a sequence.
            Default: 0 if ``trigger_on_prompt`` or labels are given, else the end of this first call's input
            (the prompt). A cache that arrives without processor state counts its existing entries as prompt.
        """
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not self.config.use_cache_processor or input_ids is None or not self.config.trigger_token_ids:
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                output_hidden_states=output_hidden_states,
                logits_to_keep=logits_to_keep,
            )
        work_cache = cache if cache is not None else DynamicCache()
        batch, seq = input_ids.shape
        past = work_cache.get_seq_length()
        state = getattr(work_cache, _STATE_ATTR, None)
        if state is None or past == 0:
            if trigger_from is None:
                if self.config.trigger_on_prompt or labels is not None:
                    trigger_from = 0
                else:
                    trigger_from = seq if past == 0 else past
            state = _ProcessorState(trigger_from=trigger_from, step_start=[trigger_from] * batch)
            setattr(work_cache, _STATE_ATTR, state)
            self.rewrite_log = []

        slots = torch.arange(past, past + seq, device=input_ids.device)
        triggers = torch.tensor(self.config.trigger_token_ids, device=input_ids.device)
        is_trigger = torch.isin(input_ids, triggers) & (slots >= state.trigger_from)[None, :]
        cut_cols = torch.nonzero(is_trigger.any(dim=0)).flatten().tolist()
        bounds = [0] + [c + 1 for c in cut_cols]
        if bounds[-1] != seq:
            bounds.append(seq)

        hiddens, layer_hiddens = [], []
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            out = self.model(
                input_ids=input_ids[:, s:e],
                attention_mask=attention_mask[:, : past + e] if attention_mask is not None else None,
                position_ids=position_ids[:, s:e] if position_ids is not None else None,
                cache=work_cache,
                use_cache=True,
                output_hidden_states=output_hidden_states,
            )
            hiddens.append(out.last_hidden_state)
            if output_hidden_states:
                layer_hiddens.append(out.hidden_states)
            for row in torch.nonzero(is_trigger[:, e - 1]).flatten().tolist():
                self._rewrite(work_cache, row, state.step_start[row], past + e, attention_mask)
                state.step_start[row] = past + e
        hidden = torch.cat(hiddens, dim=1)
        all_hidden = None
        if output_hidden_states:
            all_hidden = tuple(torch.cat(parts, dim=1) for parts in zip(*layer_hiddens, strict=True))
        out_cache = work_cache if use_cache else None
        return self._lm_output(hidden, out_cache, all_hidden, labels, logits_to_keep)

    def _rewrite(
        self, cache: DynamicCache, row: int, step_start: int, step_end: int, padding_mask: torch.Tensor | None
    ) -> None:
        """Rewrite, in every layer, row ``row``'s step entries [step_start, step_end) and the top-k earlier ones."""
        cfg = self.config
        layers = cache.layers
        device = layers[0].keys.device
        valid = (
            None if padding_mask is None else padding_mask[row, :step_end].to(device=device, dtype=torch.bool)
        )
        step_idx = torch.arange(step_start, step_end, device=device)
        candidates = torch.arange(step_start, device=device)
        if valid is not None:
            step_idx = step_idx[valid[step_start:step_end]]
            candidates = candidates[valid[:step_start]]
        if step_idx.numel() == 0:
            return
        k = min(cfg.reconsolidate_top_k, candidates.numel())
        kv_heads, head_dim = cfg.num_key_value_heads, cfg.head_dim
        index_sets, entries = [], []
        for layer in layers:
            keys, values = layer.keys[row], layer.values[row]  # (kv_heads, T, head_dim)
            idx = (
                step_idx if k == 0 else torch.cat([_select_earlier(keys, step_idx, candidates, k), step_idx])
            )
            index_sets.append(idx)
            n = idx.numel()
            entries.append(
                torch.cat(
                    [
                        keys[:, idx].transpose(0, 1).reshape(n, -1),
                        values[:, idx].transpose(0, 1).reshape(n, -1),
                    ],
                    dim=-1,
                )
            )
        layer_ids = torch.arange(len(layers), device=device)
        new = self.cache_processor(torch.stack(entries), layer_ids)
        kv_dim = kv_heads * head_dim
        position = step_end - 1
        for li, (layer, idx) in enumerate(zip(layers, index_sets, strict=True)):
            n = idx.numel()
            new_k = new[li, :, :kv_dim].reshape(n, kv_heads, head_dim).transpose(0, 1)
            new_v = new[li, :, kv_dim:].reshape(n, kv_heads, head_dim).transpose(0, 1)
            keys, values = layer.keys, layer.values
            # Under autograd, write into a copy: earlier chunks' attention saved the old tensors for backward.
            if torch.is_grad_enabled():
                keys, values = keys.clone(), values.clone()
            keys[row, :, idx] = new_k.to(keys.dtype)
            values[row, :, idx] = new_v.to(values.dtype)
            layer.keys, layer.values = keys, values
            self.rewrite_log.append(
                RewriteEvent(position=position, layer=li, indices=tuple(idx.tolist()), batch_index=row)
            )
        logger.debug("cache processor: rewrote %d entries per layer at slot %d (row %d)", n, position, row)
