"""Units of diffusers models from tensor names: the deepest numbered entry of a list of blocks."""

from __future__ import annotations

from dfloat.runtime.diffusers_units import block_of, diffusers_grouping


def test_deepest_block_of_a_list():
    cases = {
        "transformer_blocks.3.attn.to_q.weight": "transformer_blocks.3",
        "transformer_blocks.0.attn.to_out.0.weight": "transformer_blocks.0",  # to_out.0: a Sequential, not a list
        "single_transformer_blocks.37.proj_mlp.weight": "single_transformer_blocks.37",
        "blocks.12.ffn.net.0.proj.weight": "blocks.12",  # Wan
        "down_blocks.1.resnets.0.conv1.weight": "down_blocks.1.resnets.0",
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight": "down_blocks.2.attentions.1.transformer_blocks.9",
        "down_blocks.2.attentions.1.proj_in.weight": "down_blocks.2.attentions.1",
        "encoder.mid_block.resnets.1.conv2.weight": "encoder.mid_block.resnets.1",
        "encoder.down_blocks.0.downsamplers.0.conv.weight": "encoder.down_blocks.0.downsamplers.0",
        "x_embedder.weight": None,
        "encoder.conv_in.weight": None,
    }
    for name, want in cases.items():
        assert block_of(name) == want, name


def test_grouping_keeps_fp32_modules_buffers_and_vectors_plain():
    unit_of = diffusers_grouping(
        ["time_embedder", "scale_shift_table"],
        parameters={
            "blocks.0.attn1.to_q.weight",
            "condition_embedder.time_embedder.linear_1.weight",
            "scale_shift_table",
            "proj_out.weight",
            "blocks.0.norm2.weight",
        },
    )
    assert unit_of("blocks.0.attn1.to_q.weight", (8, 8)) == "blocks.0"
    assert unit_of("proj_out.weight", (8, 8)) == "proj_out"  # outside blocks: a unit of its own
    assert unit_of("condition_embedder.time_embedder.linear_1.weight", (8, 8)) is None  # kept in float32
    assert unit_of("scale_shift_table", (1, 2, 8)) is None
    assert unit_of("blocks.0.norm2.weight", (8,)) is None  # 1-D
    assert unit_of("pos_embed.pos_embed", (1, 16, 8)) is None  # a buffer saved with the weights
    matrix = diffusers_grouping(unit="matrix")
    assert matrix("blocks.0.attn1.to_q.weight", (8, 8)) == "blocks.0.attn1.to_q"
