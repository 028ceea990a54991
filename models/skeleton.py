"""One Llama-like decoder that the four research architectures plug their parts into.

Why one skeleton: the runtime groups weights by name ("model.layers.N.") and swaps them for decoded views through
forward pre-hooks, so every architecture must keep Llama's module tree and call every weight through its module.
The plug-in points are methods a subclass overrides:

- ``DecoderModel.build_mlp(config, layer_idx)``: the feed-forward block of a layer (PolyCom).
- ``DecoderModel.build_attention_masks(...)``: which keys each query may see, per layer (MASFormer).
- ``DecoderForCausalLM.build_extra_modules(config)``: modules beside the backbone (NextLat's head, the Cache
  Processor), and overriding ``forward`` for their losses and cache rewrites.

Attention is written here (torch SDPA or plain eager math), not taken from transformers' attention registry, so it
is deterministic on CPU and behaves the same under every transformers 5.x release. Nothing derived from a weight is
cached across forward calls: RoPE tables and masks are rebuilt from positions on every call.

Compatibility: transformers 5.17 names the cache argument and output field ``past_key_values``, 5.24 names them
``cache``; forward accepts both names and outputs use whichever field the installed version has (``CACHE_FIELD``),
so ``generate`` works under either.
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import ModelOutput

try:  # transformers >= 5: init functions that skip weights already loaded from a checkpoint
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - older transformers
    _init = nn.init

FULL_ATTENTION = "full_attention"
ATTENTION_BACKENDS = ("sdpa", "eager")


class DecoderConfig(PretrainedConfig):
    """Llama-shaped configuration shared by the four architectures (they subclass it and add their fields).

    Deliberately has no ``layer_types``, ``sliding_window`` or ``attention_chunk_size`` attribute: transformers'
    ``DynamicCache(config=...)`` reads those and would build sliding cache layers that drop old keys.
    """

    model_type = "dfloat_decoder"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        intermediate_size: int = 5632,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 4096,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        initializer_range: float = 0.02,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        attention_backend: str = "sdpa",
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.attention_backend = attention_backend
        self.use_cache = use_cache
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={attention_backend!r}: expected one of {ATTENTION_BACKENDS}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )


# transformers 5.24 renamed the outputs' cache field from ``past_key_values`` to ``cache`` (and rejects the old
# name when both could apply); build and read outputs through the name this transformers uses.
CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


def make_output(cls: type[ModelOutput], cache: DynamicCache | None, **values) -> ModelOutput:
    """Instantiate a transformers output class with the cache under this version's field name."""
    values[CACHE_FIELD] = cache
    return cls(**values)


def output_cache(output: ModelOutput) -> DynamicCache | None:
    """The cache of a model output, whatever this transformers version calls the field."""
    return getattr(output, CACHE_FIELD, None)


class StaticKVCache:
    """Pre-allocated keys and values for every layer, written at a slot counter kept on the device.

    Why: a decode step over it has fixed shapes and addresses and does no host work, so it can be captured in a
    CUDA graph and replayed (``dfloat.runtime.generate``). A forward writes its tokens at slots ``position ..
    position + seq - 1`` and advances ``position`` itself; attention then sees all ``max_cache_len`` slots and the
    2-D ``attention_mask`` (batch, max_cache_len) says which of them hold real tokens.
    """

    def __init__(
        self, config, batch_size: int, max_cache_len: int, device, dtype: torch.dtype = torch.bfloat16
    ):
        shape = (batch_size, config.num_key_value_heads, max_cache_len, config.head_dim)
        self.max_cache_len = max_cache_len
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        self.position = torch.zeros((), dtype=torch.long, device=device)

    def slots(self, seq: int) -> torch.Tensor:
        """Cache slots of the next ``seq`` tokens."""
        return self.position + torch.arange(seq, device=self.position.device)

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.slots(k.shape[-2])
        self.keys[layer_idx].index_copy_(2, slots, k)
        self.values[layer_idx].index_copy_(2, slots, v)
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self, seq: int) -> None:
        self.position.add_(seq)

    def reset(self) -> None:
        """Empty the cache in place (addresses stay the same)."""
        for t in (*self.keys, *self.values):
            t.zero_()
        self.position.zero_()


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in float32, scale in the input dtype (bit-compatible with LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for the given positions, rebuilt every call (no cached derived tensors)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, heads, seq, head_dim) by (batch, seq, head_dim) tables, Llama's half-split convention."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def causal_allowed(q_slots: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(q, kv) boolean: key slot <= query slot. Slots are cache indices, not RoPE positions."""
    k_slots = torch.arange(kv_len, device=q_slots.device)
    return k_slots[None, :] <= q_slots[:, None]


def combine_padding(allowed: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """(q, kv) -> (batch or 1, 1, q, kv), dropping keys the 2-D attention mask marks as padding."""
    allowed = allowed[None, None]
    if padding_mask is not None:
        kv_len = allowed.shape[-1]
        allowed = allowed & padding_mask[:, None, None, :kv_len].to(torch.bool)
    return allowed


# A layer's mask is one of: NO_MASK (every cached key is visible: single-token decode with full attention),
# CAUSAL (plain causal over a sequence with no past, so SDPA can use its is_causal kernels), an explicit
# boolean (batch|1, 1, q, kv) tensor, or an object with an ``attend`` method (see ``attention``). ``prepare_mask`` turns the tensor into what the backend consumes.
NO_MASK = None
CAUSAL = "causal"


def full_attention_mask(q_slots: torch.Tensor, kv_len: int, padding_mask: torch.Tensor | None):
    """The mask of a full-attention layer, using the cheap forms when there is no padding."""
    if padding_mask is None:
        if q_slots.numel() == kv_len:
            return CAUSAL
        if q_slots.numel() == 1:
            return NO_MASK
    return combine_padding(causal_allowed(q_slots, kv_len), padding_mask)


def prepare_mask(mask, backend: str, dtype: torch.dtype):
    """Boolean mask -> additive bias for SDPA (the dtype's most negative finite value, not -inf, so a query
    with no visible key, i.e. left padding, yields a finite average instead of NaN); sentinels pass through."""
    if not isinstance(mask, torch.Tensor) or backend != "sdpa":
        return mask
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~mask, torch.finfo(dtype).min)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, backend: str) -> torch.Tensor:
    """Masked softmax attention over (batch, heads, seq, head_dim); k/v already expanded to all heads.

    ``mask`` comes from ``prepare_mask``: NO_MASK, CAUSAL, an additive bias (sdpa) or a boolean tensor (eager),
    or an object with ``attend(q, k, v, backend)`` that computes the layer's attention itself (MASFormer's sparse
    layers, which skip the keys their span cannot see).
    """
    if hasattr(mask, "attend"):
        return mask.attend(q, k, v, backend)
    scale = q.shape[-1] ** -0.5
    if backend == "sdpa":
        if mask is CAUSAL:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)).to(torch.float32) * scale
    if mask is CAUSAL:
        n = q.shape[-2]
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    if mask is not NO_MASK:
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


# A cache may carry ``observer(layer_idx, q, k, mask)``, called by every attention layer with its queries, the keys
# it attends to (expanded to all heads) and its prepared mask (see ``attention_probabilities``).
ATTENTION_OBSERVER_ATTR = "_dfloat_attention_observer"


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, mask) -> torch.Tensor:
    """Softmax attention weights (batch, heads, q, kv) in float32, for any mask form ``attention`` takes."""
    scores = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is CAUSAL:
        n, kv = q.shape[-2], k.shape[-2]
        mask = torch.ones(n, kv, dtype=torch.bool, device=q.device).tril(kv - n)
    if isinstance(mask, torch.Tensor):
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        else:  # additive bias
            scores = scores + mask.to(torch.float32)
    return torch.softmax(scores, dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, d) -> (batch, kv_heads * n_rep, seq, d) for grouped-query attention."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class Attention(nn.Module):
    """GQA self-attention with RoPE; keys enter the cache after RoPE (the Bottlenecked processor relies on it)."""

    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.backend = config.attention_backend
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask,
        cache: DynamicCache | None,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        n_rep = self.num_heads // self.num_kv_heads
        observer = getattr(cache, ATTENTION_OBSERVER_ATTR, None)
        if observer is not None:  # the Bottlenecked processor accumulates the step's attention probabilities
            observer(self.layer_idx, q, repeat_kv(k, n_rep), mask)
        out = attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask, self.backend)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class GatedMLP(nn.Module):
    """Llama SwiGLU MLP, the default feed-forward block: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block; one module per layer so the runtime can hook it."""

    def __init__(self, config: DecoderConfig, layer_idx: int, mlp: nn.Module):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderPreTrainedModel(PreTrainedModel):
    """Weight init shared by all four architectures.

    A module may define ``init_parameters(init)`` to set its own non-Linear parameters (PolyCom's activation
    coefficients), and a Linear flagged ``_zero_init = True`` starts at zero (NextLat's last head layer). The
    ``init`` functions are transformers' guarded ones, so weights loaded from a checkpoint are left alone.
    """

    config_class = DecoderConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "_zero_init", False):
                _init.zeros_(module.weight)
            else:
                _init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                _init.zeros_(module.weight[module.padding_idx])  # as Llama: the pad row starts at zero
        elif isinstance(module, RMSNorm):
            _init.ones_(module.weight)
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                _init.ones_(module.weight)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif hasattr(module, "init_parameters"):
            module.init_parameters(_init)


class DecoderModel(DecoderPreTrainedModel):
    """Embedding, layers, final norm. Subclasses override ``build_mlp`` / ``build_attention_masks``."""

    def __init__(self, config: DecoderConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            [DecoderLayer(config, i, self.build_mlp(config, i)) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def build_mlp(self, config: DecoderConfig, layer_idx: int) -> nn.Module:
        """Feed-forward block of layer ``layer_idx``; the default is Llama's SwiGLU."""
        return GatedMLP(config)

    def build_attention_masks(
        self, q_slots: torch.Tensor, kv_len: int, padding_mask: torch.Tensor | None
    ) -> list:
        """One mask per layer (NO_MASK, CAUSAL or a boolean (batch|1, 1, q, kv) tensor); default causal everywhere.

        ``padding_mask`` is the 2-D attention mask, or None when it has no padding.
        """
        return [full_attention_mask(q_slots, kv_len, padding_mask)] * len(self.layers)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        cache: DynamicCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        batch, seq = inputs_embeds.shape[:2]
        if isinstance(cache, StaticKVCache):  # fixed shapes, no host sync: keys span every slot of the cache
            q_slots, kv_len = cache.slots(seq), cache.max_cache_len
            if attention_mask is None or attention_mask.shape != (batch, kv_len):
                raise ValueError(
                    "with a StaticKVCache, attention_mask must be the 2-D (batch, max_cache_len) mask"
                )
        else:
            past = cache.get_seq_length() if cache is not None else 0
            q_slots, kv_len = torch.arange(past, past + seq, device=inputs_embeds.device), past + seq
        if position_ids is None:
            position_ids = q_slots[None].expand(batch, -1)
        if attention_mask is not None and not isinstance(cache, StaticKVCache):
            if attention_mask.dim() != 2:
                raise ValueError("attention_mask must be the 2-D (batch, past + seq) padding mask")
            if bool(attention_mask.all()):  # generate() always passes one; all ones = no padding
                attention_mask = None
        cos, sin = rotary_cos_sin(
            position_ids, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype
        )
        prepared = {}  # layers sharing a mask object share its conversion
        masks = []
        for mask in self.build_attention_masks(q_slots, kv_len, attention_mask):
            if id(mask) not in prepared:
                prepared[id(mask)] = prepare_mask(mask, self.config.attention_backend, inputs_embeds.dtype)
            masks.append(prepared[id(mask)])

        h = inputs_embeds
        all_hidden = [h] if output_hidden_states else None
        for layer, mask in zip(self.layers, masks, strict=True):
            h = layer(h, cos, sin, mask, cache)
            if all_hidden is not None:
                all_hidden.append(h)
        h = self.norm(h)
        if isinstance(cache, StaticKVCache):
            cache.advance(seq)
        if all_hidden is not None:
            all_hidden[-1] = h
        return make_output(
            BaseModelOutputWithPast,
            cache,
            last_hidden_state=h,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in float32; labels are the inputs (shifted here), -100 is ignored."""
    shift_logits = logits[:, :-1].to(torch.float32)
    shift_labels = labels[:, 1:].to(shift_logits.device)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100
    )


def keep_logits(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions generate() asks logits for (0 = all)."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    return hidden[:, logits_to_keep]


class DecoderForCausalLM(DecoderPreTrainedModel, GenerationMixin):
    """Backbone + lm_head with generate(); subclasses set ``base_model_class`` and ``config_class``."""

    base_model_class = DecoderModel
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DecoderConfig):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.build_extra_modules(config)
        self.post_init()

    def build_extra_modules(self, config: DecoderConfig) -> None:
        """Hook for modules beside the backbone (NextLat's head, the Cache Processor), created before post_init."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

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
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        return self._lm_output(
            out.last_hidden_state, output_cache(out), out.hidden_states, labels, logits_to_keep
        )

    def _lm_output(
        self,
        hidden,
        cache,
        all_hidden,
        labels,
        logits_to_keep,
        output_class: type[ModelOutput] = CausalLMOutputWithPast,
    ) -> ModelOutput:
        """Logits and loss from final hidden states (the shared tail of every forward)."""
        if labels is not None:
            logits = self.lm_head(hidden)
            loss = causal_lm_loss(logits, labels)
            logits = keep_logits(logits, logits_to_keep)
        else:
            logits = self.lm_head(keep_logits(hidden, logits_to_keep))
            loss = None
        return make_output(output_class, cache, loss=loss, logits=logits, hidden_states=all_hidden)
