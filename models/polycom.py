"""PolyCom (arXiv 2411.03884): polynomial composition activations in the MLP.

PolyNorm(x) = w0*norm(x^3) + w1*norm(x^2) + w2*norm(x) + b, norm(u) = u * rsqrt(mean(u^2, -1) + eps)
PolyReLU(x) = w0*relu(x)^3 + w1*relu(x)^2 + w2*relu(x) + b
weight (3,) starts at 1/3 (w0 goes with the cubic term), bias (1,) at 0, eps 1e-6, as in the reference code.

Two conventions exist and give different bits, so each is a fixed config value:
- ``activation_dtype="activation"`` (the reference): compute in the input dtype, coefficients cast to it.
- ``activation_dtype="float32"`` (Motif): upcast input and coefficients, compute, cast back to the input dtype.
The published dense models use a non-gated MLP, down(act(up(x))); ``mlp_gated=True`` gives Motif's
down(act(gate(x)) * up(x)), where the product is taken in the input dtype after the cast back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .skeleton import DecoderConfig, DecoderForCausalLM, DecoderModel

POLY_ACTIVATIONS = ("polynorm", "polyrelu")

# The reference training script (Megatron): a 32000-token tokenizer, the embedding padded to a multiple of 128
# (make-vocab-size-divisible-by), and Megatron's norm epsilon 1e-5.
REFERENCE_TOKENIZER_VOCAB = 32000
REFERENCE_VOCAB_MULTIPLE = 128
REFERENCE_NORM_EPS = 1e-5


def padded_vocab_size(tokenizer_vocab: int, multiple: int = REFERENCE_VOCAB_MULTIPLE) -> int:
    """Megatron's embedding size: the tokenizer's vocabulary rounded up to a multiple of ``multiple``."""
    return -(-tokenizer_vocab // multiple) * multiple


ACTIVATION_DTYPES = ("activation", "float32")


def poly_norm_unit(u: torch.Tensor, eps: float) -> torch.Tensor:
    """norm(u) of the paper: RMS normalisation over the last dim, no learned scale."""
    return u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps)


class _PolyActivation(nn.Module):
    """Shared parameters and dtype handling; subclasses define ``_poly`` on already-cast tensors."""

    def __init__(self, eps: float = 1e-6, activation_dtype: str = "activation"):
        super().__init__()
        if activation_dtype not in ACTIVATION_DTYPES:
            raise ValueError(f"activation_dtype={activation_dtype!r}: expected one of {ACTIVATION_DTYPES}")
        self.weight = nn.Parameter(torch.full((3,), 1.0 / 3.0))
        self.bias = nn.Parameter(torch.zeros(1))
        self.eps = eps
        self.activation_dtype = activation_dtype

    def init_parameters(self, init) -> None:
        """Reference init, called by the model's weight initialisation (transformers' guarded init functions)."""
        init.constant_(self.weight, 1.0 / 3.0)
        init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        dtype = torch.float32 if self.activation_dtype == "float32" else in_dtype
        w = self.weight.to(dtype)
        b = self.bias.to(dtype)
        return self._poly(x.to(dtype), w, b).to(in_dtype)

    def _poly(self, x, w, b):  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"eps={self.eps}, activation_dtype={self.activation_dtype!r}"


class PolyNorm(_PolyActivation):
    """w0*norm(x^3) + w1*norm(x^2) + w2*norm(x) + b, evaluated left to right like the reference."""

    def _poly(self, x, w, b):
        return (
            w[0] * poly_norm_unit(x**3, self.eps)
            + w[1] * poly_norm_unit(x**2, self.eps)
            + w[2] * poly_norm_unit(x, self.eps)
            + b
        )


class PolyReLU(_PolyActivation):
    """w0*relu(x)^3 + w1*relu(x)^2 + w2*relu(x) + b, evaluated left to right like the reference."""

    def _poly(self, x, w, b):
        r = F.relu(x)
        return w[0] * r**3 + w[1] * r**2 + w[2] * r + b


class PolyComMLP(nn.Module):
    """Non-gated down(act(up(x))) or gated down(act(gate(x)) * up(x)); no biases unless mlp_bias."""

    def __init__(self, config: PolyComConfig):
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gated = config.mlp_gated
        if self.gated:
            self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        act_cls = PolyNorm if config.hidden_act == "polynorm" else PolyReLU
        self.act_fn = act_cls(eps=config.activation_eps, activation_dtype=config.activation_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


class PolyComConfig(DecoderConfig):
    """Defaults follow the paper's 1.3B dense model (24 x 2048, 16 heads, FFN 8256, untied) and its reference
    script (vocab 32000 padded to a multiple of 128, RMSNorm eps 1e-5); ``reference_preset`` builds that config.

    Args (beyond DecoderConfig):
        hidden_act: "polynorm" or "polyrelu".
        mlp_gated: False = down(act(up(x))) as published; True = down(act(gate(x)) * up(x)) as in Motif.
        activation_dtype: "activation" (compute in the input dtype, the reference) or "float32" (upcast, Motif).
        activation_eps: eps inside norm(u), 1e-6 in the reference.
    """

    model_type = "polycom"

    def __init__(
        self,
        hidden_act: str = "polynorm",
        mlp_gated: bool = False,
        activation_dtype: str = "activation",
        activation_eps: float = 1e-6,
        vocab_size: int = padded_vocab_size(REFERENCE_TOKENIZER_VOCAB),
        rms_norm_eps: float = REFERENCE_NORM_EPS,
        hidden_size: int = 2048,
        intermediate_size: int = 8256,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        **kwargs,
    ):
        if hidden_act not in POLY_ACTIVATIONS:
            raise ValueError(f"hidden_act={hidden_act!r}: expected one of {POLY_ACTIVATIONS}")
        if activation_dtype not in ACTIVATION_DTYPES:
            raise ValueError(f"activation_dtype={activation_dtype!r}: expected one of {ACTIVATION_DTYPES}")
        self.hidden_act = hidden_act
        self.mlp_gated = mlp_gated
        self.activation_dtype = activation_dtype
        self.activation_eps = activation_eps
        super().__init__(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            rms_norm_eps=rms_norm_eps,
            **kwargs,
        )

    @classmethod
    def reference_preset(cls, tokenizer_vocab: int = REFERENCE_TOKENIZER_VOCAB, **overrides) -> PolyComConfig:
        """The reference script's 1B setup: vocab ``tokenizer_vocab`` padded to 128, eps 1e-5, untied, 24 x 2048."""
        values = dict(
            vocab_size=padded_vocab_size(tokenizer_vocab),
            hidden_size=2048,
            intermediate_size=8256,
            num_hidden_layers=24,
            num_attention_heads=16,
            rms_norm_eps=REFERENCE_NORM_EPS,
            tie_word_embeddings=False,
        )
        return cls(**{**values, **overrides})


class PolyComModel(DecoderModel):
    config_class = PolyComConfig

    def build_mlp(self, config: PolyComConfig, layer_idx: int) -> nn.Module:
        return PolyComMLP(config)


class PolyComForCausalLM(DecoderForCausalLM):
    config_class = PolyComConfig
    base_model_class = PolyComModel
