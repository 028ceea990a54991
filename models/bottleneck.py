"""Bottlenecked Transformer (arXiv 2505.16950): a Cache Processor that rewrites the KV cache at step boundaries.

A backbone decoder plus a small non-causal Transformer (the Cache Processor). When a trigger token (a newline by
default) has been run through the backbone, so that its own KV entries are in the cache, the processor rewrites,
for every layer, in place:
- the entries of the step just finished: cache slots [start of step, trigger slot], the trigger included;
- the top-k earlier entries (``reconsolidate_top_k``), chosen per layer by the attention the step actually paid
  them: while the step's tokens run through the backbone, every layer adds its softmax probabilities (summed over
  query heads and the step's queries) onto the earlier slots; the k slots with the most mass are rewritten.
  Ties go to torch.topk; indices are kept sorted.

Processing: each entry is [key; value] flattened over KV heads (2 * kv_heads * head_dim), projected to the
processor's width, plus a learned per-layer embedding, then ``processor_num_layers`` bidirectional pre-norm
attention + MLP layers (no mask, no positional encoding: keys are rewritten post-RoPE, so they already carry
their position), then projected back and added as a residual: new = old + out_proj(...). ``out_proj`` starts at
zero, so an untrained processor leaves the cache (and a frozen backbone's outputs) exactly as they were. Layers are
a batch dimension of one processor call. All processor matrices are nn.Linear / nn.Embedding weights.

Choices for what the paper leaves open (all config values): processor size, k, trigger ids, whether prompt
newlines trigger (off by default), keys rewritten post-RoPE (fixed: the cache holds post-RoPE keys, so no
un-rotation is needed and a rewritten key stays at its slot's position).

One trigger rule for training and inference: a trigger counts from the end of the prompt on, unless
``trigger_on_prompt``. At inference the prompt is the first call's input; with labels (training) it is each row's
leading run of -100 labels (no such run: every trigger counts). Beam search is refused: beams would reorder a
cache whose rewrites were made for another beam's history.

Timing: the rewrite happens inside the forward that consumed the trigger, after the backbone wrote the trigger's
entries, so the logits of that forward (predicting the token after the trigger) are the plain backbone's and every
later position sees the rewritten cache. A forward over many tokens is split after each trigger, so a full
forward of a sequence equals token-by-token cached decoding (``trigger_from`` tells it where the prompt ends).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from .skeleton import (
    ATTENTION_OBSERVER_ATTR,
    DecoderConfig,
    DecoderForCausalLM,
    DecoderModel,
    RMSNorm,
    attention_probabilities,
)

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
        self.out_proj._zero_init = True  # untrained processor = identity (read by _init_weights)

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
    """Per-cache bookkeeping, stored on the cache object so it lives exactly as long as one generation.

    ``mass[layer]`` (batch, slots): attention each slot has received from the current step's queries of each row.
    """

    trigger_from: list[int]
    step_start: list[int] = field(default_factory=list)
    mass: dict[int, torch.Tensor] = field(default_factory=dict)

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, mask) -> None:
        """Add this layer's attention probabilities from queries in the rows' current steps onto the key slots."""
        with torch.no_grad():
            n, kv = q.shape[-2], k.shape[-2]
            # queries before every row's step (the prompt) add nothing: skip them
            skip = min(max(min(self.step_start) - (kv - n), 0), n)
            if skip == n:
                return
            if skip:
                q = q[..., skip:, :]
                if isinstance(mask, torch.Tensor):
                    mask = mask[..., skip:, :]
                n -= skip
            probs = attention_probabilities(q, k, mask).sum(1)  # (batch, n, kv), summed over heads
            q_slots = torch.arange(kv - n, kv, device=q.device)
            start = torch.tensor(self.step_start, device=q.device)
            in_step = (q_slots[None, :] >= start[:, None]).to(probs.dtype)
            add = (probs * in_step[..., None]).sum(1)  # (batch, kv)
            old = self.mass.get(layer)
            if old is None or old.shape[1] < kv:
                grown = torch.zeros(add.shape[0], kv, device=q.device)
                if old is not None:
                    grown[:, : old.shape[1]] = old
                old = grown
            old[:, :kv] += add
            self.mass[layer] = old


_STATE_ATTR = "_dfloat_cache_processor_state"


def _select_earlier(mass: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """The k candidate slots with the most attention mass from the step (mass: one value per candidate), sorted."""
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
            Default: 0 if ``trigger_on_prompt``; else the end of the prompt: this first call's input, or with
            labels each row's leading run of -100 labels. A cache that arrives without processor state counts
            its existing entries as prompt.
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
            starts = self._prompt_ends(trigger_from, labels, batch, seq, past)
            state = _ProcessorState(trigger_from=starts, step_start=list(starts))
            setattr(work_cache, _STATE_ATTR, state)
            if self.config.reconsolidate_top_k:
                setattr(work_cache, ATTENTION_OBSERVER_ATTR, state.observe)
            self.rewrite_log = []

        slots = torch.arange(past, past + seq, device=input_ids.device)
        triggers = torch.tensor(self.config.trigger_token_ids, device=input_ids.device)
        counted_from = torch.tensor(state.trigger_from, device=input_ids.device)
        is_trigger = torch.isin(input_ids, triggers) & (slots[None, :] >= counted_from[:, None])
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
                self._rewrite(work_cache, state, row, state.step_start[row], past + e, attention_mask)
                state.step_start[row] = past + e
        hidden = torch.cat(hiddens, dim=1)
        all_hidden = None
        if output_hidden_states:
            all_hidden = tuple(torch.cat(parts, dim=1) for parts in zip(*layer_hiddens, strict=True))
        out_cache = work_cache if use_cache else None
        return self._lm_output(hidden, out_cache, all_hidden, labels, logits_to_keep)

    def _prompt_ends(self, trigger_from, labels, batch: int, seq: int, past: int) -> list[int]:
        """Per row, the first slot whose triggers count (the same rule with and without labels)."""
        if trigger_from is not None:
            return [int(trigger_from)] * batch
        if self.config.trigger_on_prompt:
            return [0] * batch
        if past:
            return [past] * batch
        if labels is None:
            return [seq] * batch
        masked = (labels == -100).to(torch.int64)
        return masked.cumprod(dim=1).sum(dim=1).tolist()  # leading -100 run per row

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """GenerationMixin.generate, refusing beam search while the Cache Processor is on."""
        config = kwargs.get("generation_config") or self.generation_config
        beams = kwargs.get("num_beams", getattr(config, "num_beams", 1) or 1)
        if self.config.use_cache_processor and beams > 1:
            raise ValueError(
                f"num_beams={beams}: beam search is not supported by the Bottlenecked Transformer's Cache "
                "Processor (beams would reorder a cache rewritten for another beam's history); use greedy or "
                "sampling, or set config.use_cache_processor=False"
            )
        return super().generate(*args, **kwargs)

    def _rewrite(
        self,
        cache: DynamicCache,
        state: _ProcessorState,
        row: int,
        step_start: int,
        step_end: int,
        padding_mask: torch.Tensor | None,
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
        for li, layer in enumerate(layers):
            keys, values = layer.keys[row], layer.values[row]  # (kv_heads, T, head_dim)
            idx = step_idx
            if k:
                mass = state.mass[li][row, candidates]
                idx = torch.cat([_select_earlier(mass, candidates, k), step_idx])
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
        for mass in state.mass.values():
            mass[row] = 0  # the next step accumulates afresh
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
