"""Each research architecture through the whole pipeline: BF16 checkpoint -> dfloat.compress_model ->
dfloat.load_compressed, with logits and greedy generations bit-identical to the uncompressed model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import dfloat
from dfloat.models.testing import ARCHS, prompt, tiny_model
from dfloat.runtime.checkpoint import describe_unit_layout


@pytest.mark.parametrize("arch", ARCHS)
def test_compressed_model_is_bit_identical(arch, tmp_path):
    src, out = tmp_path / "bf16", tmp_path / "compressed"
    model = tiny_model(arch)
    model.to(torch.bfloat16)
    ids = prompt(seed=0, length=8)
    if arch == "bottlenecked":  # trigger on a token the BF16 model generates, so the processor runs
        model.config.use_cache_processor = False
        generated = model.generate(ids, max_new_tokens=20, do_sample=False)[0, 8:-1]
        model.config.use_cache_processor = True
        model.config.trigger_token_ids = [int(generated[len(generated) // 2])]
    model.save_pretrained(src, safe_serialization=True)
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()

    report = dfloat.compress_model(src, out, allow_raw=False)  # tiny units would otherwise be stored raw
    assert report.coded_units == report.units  # every unit is Huffman-coded, none fell back to raw
    coded = {n for names in describe_unit_layout(out).values() for n in names}
    weights_2d = {n for n, p in reference.named_parameters() if p.ndim == 2}
    assert weights_2d <= coded  # processor and latent head included
    compressed = dfloat.load_compressed(out, device="cpu")

    with torch.no_grad():
        assert torch.equal(compressed(ids).logits, reference(ids).logits)
    assert torch.equal(
        compressed.generate(ids, max_new_tokens=20, do_sample=False),
        reference.generate(ids, max_new_tokens=20, do_sample=False),
    )
    if arch == "nextlat":  # the head drafts through compressed weights too
        assert torch.equal(
            compressed.generate_speculative(ids, 20, draft_tokens=3),
            reference.generate_speculative(ids, 20, draft_tokens=3),
        )
    if arch == "bottlenecked":  # the Cache Processor's compressed weights rewrite the same entries
        assert reference.rewrite_log and compressed.rewrite_log == reference.rewrite_log
