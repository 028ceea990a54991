"""Inputs that exercise every corner of the codec, shared by the tests of all backends."""

from __future__ import annotations

import numpy as np
import torch


def bits(t: torch.Tensor) -> torch.Tensor:
    """The int16 view used for exact comparison (NaN payloads and -0 compare as bits)."""
    return t.contiguous().reshape(-1).view(torch.int16)


def all_bf16_patterns() -> torch.Tensor:
    """All 65,536 BF16 bit patterns: NaN payloads, +-0, +-inf, subnormals."""
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def weights_like(n: int, seed: int = 0, std: float = 0.02) -> torch.Tensor:
    """Normal weights in BF16: the exponent histogram of a trained layer, roughly."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * std).to(torch.bfloat16)


def random_bits(n: int, seed: int = 0) -> torch.Tensor:
    """Uniform 16-bit patterns: all 256 exponents, about 8 bits of exponent entropy."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(-32768, 32768, (n,), generator=g, dtype=torch.int32)
        .to(torch.int16)
        .view(torch.bfloat16)
    )


def with_exponent_counts(counts: dict[int, int], seed: int = 0) -> torch.Tensor:
    """A shuffled BF16 tensor whose exponent histogram is exactly ``counts`` (random signs and mantissas)."""
    rng = np.random.default_rng(seed)
    exps = np.concatenate([np.full(c, e, np.uint16) for e, c in counts.items()])
    rng.shuffle(exps)
    sm = rng.integers(0, 256, exps.size).astype(np.uint16)
    words = ((sm & 0x80) << 8) | (exps << 7) | (sm & 0x7F)
    return torch.from_numpy(words.view(np.int16).copy()).view(torch.bfloat16)


def fibonacci_exponents(n_symbols: int) -> dict[int, int]:
    """Counts whose unlimited Huffman code is as deep as possible: n_symbols - 1 bits for the rarest two."""
    a, b, counts = 1, 1, {}
    for i in range(n_symbols):
        counts[100 + i] = a
        a, b = b, a + b
    return counts


TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=32,
)


TINY_BERT = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=32,
)


def save_tiny_bert(folder, seed=0):
    """A random BERT encoder (loaded with ``AutoModel``, unlike `save_random_model`'s causal LMs) saved in BF16."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    BertModel(BertConfig(**TINY_BERT)).to(torch.bfloat16).save_pretrained(folder)
    return folder


def save_random_model(
    folder,
    config=None,
    dtype=torch.bfloat16,
    seed=0,
    trained_scale=False,
    max_shard_size=None,
    **llama_overrides,
):
    """A random causal LM saved with ``save_pretrained`` (safetensors): a tiny Llama unless ``config`` is given.

    ``trained_scale`` draws weights of trained magnitude (N(0, 0.05); norms N(0, 1)) instead of the init, whose
    tiny std can make every logit nearly equal.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = config or LlamaConfig(**{**TINY_LLAMA, **llama_overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if trained_scale:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05 if p.ndim > 1 else 1.0)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return folder
