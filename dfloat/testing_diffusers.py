"""Tiny diffusers pipelines built offline from configs, in BF16: FLUX, SD3, Wan and a Stable Diffusion UNet.

For tests and benchmarks: random weights (the models' own initialisation, seeded), text encoders and
tokenizers with a 27-letter vocabulary made on the spot, no Hub access. Each ``save_tiny_pipeline(kind,
folder)`` writes a folder that ``DiffusionPipeline.from_pretrained`` loads; ``PIPELINE_CALLS[kind]`` are
arguments that make a call take two denoising steps at 32x32 pixels.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

KINDS = ("flux", "sd3", "wan", "unet")

PIPELINE_CALLS = {
    "flux": dict(height=32, width=32, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=16),
    "sd3": dict(height=32, width=32, num_inference_steps=2, guidance_scale=5.0, max_sequence_length=16),
    "wan": dict(
        height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=5.0, max_sequence_length=16
    ),
    "unet": dict(height=32, width=32, num_inference_steps=2, guidance_scale=7.5),
}


def clip_tokenizer():
    """A CLIP tokenizer over single letters (no merges), 77 tokens long."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    """A T5 (unigram) tokenizer over single letters, 16 tokens long."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=16)


def _clip(tokenizer, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(tokenizer, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kw = dict(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))


def _vae(latent_channels: int, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16],
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **kw,
    )


def build_tiny_pipeline(kind: str, seed: int = 0, **transformer):
    """The pipeline object (random BF16 weights, in eval mode); ``transformer`` overrides the denoiser's
    config (e.g. ``attention_head_dim=128, axes_dims_rope=[16, 56, 56]`` for FLUX's real head size)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in BF16 (casting after would warn about float32 modules)
    try:
        pipe = _build(kind, seed, transformer)
    finally:
        torch.set_default_dtype(before)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def _build(kind: str, seed: int, overrides: dict):
    import diffusers

    torch.manual_seed(seed)
    if kind == "flux":
        tok, t5tok = clip_tokenizer(), t5_tokenizer()
        transformer = diffusers.FluxTransformer2DModel(
            **{
                "patch_size": 1,
                "in_channels": 16,
                "num_layers": 2,
                "num_single_layers": 2,
                "attention_head_dim": 16,
                "num_attention_heads": 2,
                "joint_attention_dim": 32,
                "pooled_projection_dim": 32,
                "axes_dims_rope": [4, 4, 8],
                **overrides,
            }
        )
        pipe = diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            vae=_vae(4, shift_factor=0.1, scaling_factor=0.5),
            text_encoder=_clip(tok, projection=False),
            tokenizer=tok,
            text_encoder_2=_t5(t5tok),
            tokenizer_2=t5tok,
            transformer=transformer,
        )
    elif kind == "sd3":
        tok, t5tok = clip_tokenizer(), t5_tokenizer()
        transformer = diffusers.SD3Transformer2DModel(
            **{
                "sample_size": 32,
                "patch_size": 1,
                "in_channels": 4,
                "num_layers": 2,
                "attention_head_dim": 8,
                "num_attention_heads": 4,
                "caption_projection_dim": 32,
                "joint_attention_dim": 32,
                "pooled_projection_dim": 64,
                "out_channels": 4,
                **overrides,
            }
        )
        pipe = diffusers.StableDiffusion3Pipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            vae=_vae(4, shift_factor=0.1, scaling_factor=0.5),
            text_encoder=_clip(tok, projection=True),
            tokenizer=tok,
            text_encoder_2=_clip(tok, projection=True),
            tokenizer_2=clip_tokenizer(),
            text_encoder_3=_t5(t5tok),
            tokenizer_3=t5tok,
            transformer=transformer,
        )
    elif kind == "wan":
        t5tok = t5_tokenizer()
        transformer = diffusers.WanTransformer3DModel(
            **{
                "patch_size": (1, 2, 2),
                "num_attention_heads": 2,
                "attention_head_dim": 12,
                "in_channels": 16,
                "out_channels": 16,
                "text_dim": 32,
                "freq_dim": 32,
                "ffn_dim": 32,
                "num_layers": 2,
                "cross_attn_norm": True,
                "qk_norm": "rms_norm_across_heads",
                "rope_max_seq_len": 32,
                **overrides,
            }
        )
        vae = diffusers.AutoencoderKLWan(
            base_dim=12,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
        pipe = diffusers.WanPipeline(
            tokenizer=t5tok,
            text_encoder=_t5(t5tok, umt5=True),
            vae=vae,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            transformer=transformer,
        )
    elif kind == "unet":
        tok = clip_tokenizer()
        unet = diffusers.UNet2DConditionModel(
            **{
                "block_out_channels": (8, 16),
                "layers_per_block": 1,
                "sample_size": 16,
                "in_channels": 4,
                "out_channels": 4,
                "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
                "cross_attention_dim": 32,
                "attention_head_dim": 4,
                "norm_num_groups": 4,
                **overrides,
            }
        )
        pipe = diffusers.StableDiffusionPipeline(
            vae=_vae(4, scaling_factor=0.5),
            text_encoder=_clip(tok, projection=False),
            tokenizer=tok,
            unet=unet,
            scheduler=diffusers.EulerDiscreteScheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return pipe


def save_tiny_pipeline(kind: str, folder: str | Path, seed: int = 0, **transformer) -> Path:
    """``build_tiny_pipeline(kind, seed, **transformer)`` saved to ``folder`` (safetensors, BF16)."""
    folder = Path(folder)
    build_tiny_pipeline(kind, seed, **transformer).save_pretrained(folder)
    return folder


def flux_inputs(config, image_tokens: int, text_tokens: int, seed: int = 0) -> dict:
    """Random inputs for one forward of a `FluxTransformer2DModel` with ``config`` (its ``.config``): BF16
    latents and text states, as a pipeline step passes them."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, image_tokens, config.in_channels, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, text_tokens, config.joint_attention_dim, generator=g).bfloat16(),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g).bfloat16(),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(image_tokens, 3),
        txt_ids=torch.zeros(text_tokens, 3),
    )
