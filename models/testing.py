"""Tiny configurations of the four research architectures, for tests and demos (each builds in milliseconds).

The runtime's and codec's tests can use them too: ``tiny_model("nextlat")`` is a real NextLatForCausalLM.
"""

from __future__ import annotations

import torch

from . import ARCHITECTURES

# initializer_range 0.1 (not 0.02) keeps logit gaps wide, so greedy argmax never sits on a float near-tie.
TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
)
EXTRA = {
    "polycom": {},
    "masformer": dict(num_full_attention_layers=1, attention_window=4, attention_block_size=4),
    "nextlat": {},
    "bottlenecked": dict(
        trigger_token_ids=[55],
        processor_num_layers=2,
        processor_hidden_size=16,
        processor_num_heads=2,
        reconsolidate_top_k=2,
    ),
}
ARCHS = list(EXTRA)


def tiny_config(name: str, **overrides):
    """Config of architecture ``name`` ("polycom", "masformer", "nextlat", "bottlenecked") at test size."""
    config_cls = ARCHITECTURES[name][0]
    return config_cls(**{**TINY, **EXTRA[name], **overrides})


def tiny_model(name: str, seed: int = 0, **overrides):
    """A freshly initialised tiny model in eval mode; the seed fixes its weights."""
    torch.manual_seed(seed)
    return ARCHITECTURES[name][2](tiny_config(name, **overrides)).eval()


def prompt(seed: int = 0, length: int = 6, batch: int = 1) -> torch.Tensor:
    """Random token ids in the tiny vocabulary, fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=g)
