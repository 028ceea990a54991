"""MASFormer: per-layer spans, what each span can see, and cached decoding equal to a full forward."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from dfloat.models import MASFormerConfig
from dfloat.models.masformer import span_allowed
from dfloat.models.testing import prompt, tiny_config, tiny_model

FULL, SLIDING, BLOCK = "full_attention", "sliding_attention", "block_attention"


def test_default_spans_put_full_attention_at_the_bottom():
    cfg = MASFormerConfig(num_hidden_layers=6, num_full_attention_layers=2, sparse_attention_type="block")
    assert cfg.resolved_attention_spans() == [FULL, FULL, BLOCK, BLOCK, BLOCK, BLOCK]
    cfg = MASFormerConfig(num_hidden_layers=3, num_full_attention_layers=1)
    assert cfg.resolved_attention_spans() == [FULL, SLIDING, SLIDING]


def test_explicit_spans_override_and_are_checked():
    cfg = MASFormerConfig(num_hidden_layers=3, attention_spans=[SLIDING, FULL, BLOCK])
    assert cfg.resolved_attention_spans() == [SLIDING, FULL, BLOCK]
    with pytest.raises(ValueError, match="entries"):
        MASFormerConfig(num_hidden_layers=3, attention_spans=[FULL])
    with pytest.raises(ValueError, match="unknown"):
        MASFormerConfig(num_hidden_layers=1, attention_spans=["dilated"])


@pytest.mark.parametrize("past,seq", [(0, 13), (9, 1), (5, 4)])
def test_span_masks_match_the_written_rules(past, seq):
    """Brute-force the three rules at odd sizes (window 4, block 3), with and without a cache offset."""
    q_slots = torch.arange(past, past + seq)
    kv = past + seq
    window, block = 4, 3
    rules = {
        FULL: lambda q, k: k <= q,
        SLIDING: lambda q, k: k <= q and q - k < window,
        BLOCK: lambda q, k: k <= q and k // block >= q // block - 1,
    }
    for span, rule in rules.items():
        expected = torch.tensor([[rule(int(q), k) for k in range(kv)] for q in q_slots])
        assert torch.equal(span_allowed(span, q_slots, kv, window, block), expected), span


def _logits_after_changing(model, ids, position):
    changed = ids.clone()
    changed[0, position] = (changed[0, position] + 1) % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits[0], model(changed).logits[0]


def test_sliding_layer_ignores_a_token_outside_its_window():
    ids = prompt(length=12)
    model = tiny_model("masformer", num_hidden_layers=1, attention_spans=[SLIDING], attention_window=4)
    before, after = _logits_after_changing(model, ids, position=2)
    assert torch.equal(before[6:], after[6:])  # positions 6.. see only 3.. : token 2 is outside
    assert not torch.equal(before[2:6], after[2:6])  # positions 2..5 see it
    full = tiny_model("masformer", num_hidden_layers=1, attention_spans=[FULL])
    before, after = _logits_after_changing(full, ids, position=2)
    assert not torch.equal(before[-1], after[-1])


def test_block_layer_sees_its_own_and_the_previous_block_only():
    ids = prompt(length=12)
    model = tiny_model("masformer", num_hidden_layers=1, attention_spans=[BLOCK], attention_block_size=4)
    before, after = _logits_after_changing(model, ids, position=3)  # block 0
    assert torch.equal(before[8:], after[8:])  # block 2 sees blocks 1 and 2
    assert not torch.equal(before[4:8], after[4:8])  # block 1 sees block 0
    before, after = _logits_after_changing(model, ids, position=4)  # block 1
    assert not torch.equal(before[8:], after[8:])


def test_mixed_model_reaches_past_the_window_through_its_full_layer():
    """Default layout (1 full layer at the bottom, sliding above): the far token still matters."""
    ids = prompt(length=12)
    model = tiny_model("masformer", num_hidden_layers=2, attention_window=4)
    assert model.config.resolved_attention_spans() == [FULL, SLIDING]
    before, after = _logits_after_changing(model, ids, position=0)
    assert not torch.equal(before[-1], after[-1])
    sparse_only = tiny_model("masformer", num_hidden_layers=2, attention_spans=[SLIDING, SLIDING])
    before, after = _logits_after_changing(sparse_only, ids, position=0)
    assert torch.equal(before[-1], after[-1])  # receptive field of two 4-token windows is 7 tokens


@pytest.mark.parametrize("sparse", ["sliding", "block"])
def test_cached_decoding_equals_full_forward(sparse):
    """Prefill 5 tokens then decode one at a time past several windows/blocks: same logits as one forward."""
    model = tiny_model("masformer", sparse_attention_type=sparse)
    ids = prompt(length=18)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache()
        steps = [model(ids[:, :5], cache=cache).logits]
        for i in range(5, ids.shape[1]):
            steps.append(model(ids[:, i : i + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    assert cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("sparse", ["sliding", "block"])
def test_generate_with_cache_equals_greedy_recompute(sparse):
    model = tiny_model("masformer", sparse_attention_type=sparse)
    ids = prompt(length=5)
    cached = model.generate(ids, max_new_tokens=12, do_sample=False)
    recomputed = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.shape == (1, 17)
    assert torch.equal(cached, recomputed)


def test_left_padded_full_attention_batch_matches_unpadded_rows():
    """A 2-D padding mask hides pad slots."""
    model = tiny_model("masformer", attention_spans=[FULL, FULL, FULL])
    a, b = prompt(seed=1, length=7), prompt(seed=2, length=4)
    pad = torch.zeros(1, 3, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(batch, attention_mask=mask, position_ids=positions).logits
        ref_a, ref_b = model(a).logits, model(b).logits
    torch.testing.assert_close(out[0], ref_a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1, 3:], ref_b[0], rtol=0, atol=1e-5)
    assert torch.isfinite(out).all()


def test_config_has_no_layer_types_for_the_cache_to_misread():
    """DynamicCache(config=...) must not build transformers' own sliding layers (the model installs its own)."""
    cfg = tiny_config("masformer")
    assert getattr(cfg, "layer_types", None) is None and getattr(cfg, "sliding_window", None) is None


# --- chunked sparse attention and the rolling cache (issue 15) -----------------------------------------------
# The chunked path drops only keys whose softmax weight is exactly 0, but sums in another order than the dense
# reference, so the two agree to float32 rounding: atol 1e-5 on logits of magnitude ~1 (measured gaps ~1e-7).
ATOL = 1e-5


def _pair(sparse, **kw):
    """The same weights under the chunked implementation and the dense reference."""
    chunked = tiny_model("masformer", sparse_attention_type=sparse, **kw)
    dense = tiny_model("masformer", sparse_attention_type=sparse, sparse_attention_impl="dense", **kw)
    dense.load_state_dict(chunked.state_dict())
    return chunked, dense


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("sparse", ["sliding", "block"])
def test_chunked_sparse_attention_equals_dense_reference(sparse, backend):
    chunked, dense = _pair(sparse, attention_backend=backend, attention_window=5, attention_block_size=3,
                           sparse_query_chunk=4)  # fmt: skip
    for length in (1, 7, 29):
        ids = prompt(seed=length, length=length, batch=2)
        with torch.no_grad():
            torch.testing.assert_close(chunked(ids).logits, dense(ids).logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("sparse,window,block,kept", [("sliding", 5, 3, 4), ("block", 5, 3, 5)])
def test_sparse_layers_keep_only_a_rolling_window_of_cache(sparse, window, block, kept):
    """Sliding keeps window - 1 entries, block 2 x block - 1; the full layer keeps all; positions still count all."""
    model = tiny_model("masformer", sparse_attention_type=sparse, attention_window=window,
                       attention_block_size=block)  # fmt: skip
    ids = prompt(length=30)
    cache = DynamicCache()
    with torch.no_grad():
        model(ids[:, :20], cache=cache)
        for i in range(20, 30):
            model(ids[:, i : i + 1], cache=cache)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [30, kept, kept]
    assert cache.get_seq_length() == 30


def test_dense_reference_keeps_the_whole_cache():
    model = tiny_model("masformer", sparse_attention_impl="dense")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt(length=12), cache=cache)
    assert all(layer.keys.shape[-2] == 12 for layer in cache.layers)


@pytest.mark.parametrize("sparse", ["sliding", "block"])
def test_chunked_attention_only_computes_what_the_span_allows(sparse, monkeypatch):
    """Every chunk's key range is at most chunk + lookback wide, not the whole sequence."""
    from dfloat.models import masformer

    seen = []
    real = masformer._masked_attention

    def spy(q, k, v, allowed, backend):
        seen.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, allowed, backend)

    monkeypatch.setattr(masformer, "_masked_attention", spy)
    model = tiny_model("masformer", sparse_attention_type=sparse, attention_window=4, attention_block_size=4,
                       sparse_query_chunk=4)  # fmt: skip
    with torch.no_grad():
        model(prompt(length=64))
    assert len(seen) == 2 * 16  # two sparse layers, 16 chunks of 4 queries each
    widest = 4 + 3 if sparse == "sliding" else 2 * 4  # chunk + (window - 1); or own + previous block
    assert max(k for _, k in seen) == widest


def _left_padded(prompts):
    width = max(p.shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1] :] = p[0]
        mask[row, width - p.shape[1] :] = 1
    return ids, mask


@pytest.mark.parametrize("impl", ["chunked", "dense"])
@pytest.mark.parametrize("sparse", ["sliding", "block"])
def test_left_padded_batched_generate_equals_each_prompt_alone(sparse, impl):
    """Padding 0-3 with block size 4 (the failing case of issue 15): boundaries sit on token positions."""
    model = tiny_model("masformer", sparse_attention_type=sparse, attention_window=4, attention_block_size=4,
                       sparse_attention_impl=impl, sparse_query_chunk=3)  # fmt: skip
    prompts = [prompt(seed=s, length=n) for s, n in enumerate((9, 8, 7, 6))]  # padding 0, 1, 2, 3
    ids, mask = _left_padded(prompts)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    for row, p in enumerate(prompts):
        ones = torch.ones_like(p)
        alone = model.generate(p, attention_mask=ones, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(batched[row, ids.shape[1] :], alone[0, p.shape[1] :]), (sparse, row)


@pytest.mark.parametrize("sparse", ["sliding", "block"])
def test_left_padded_forward_logits_match_each_prompt_alone(sparse):
    model = tiny_model("masformer", sparse_attention_type=sparse, attention_window=4, attention_block_size=4,
                       sparse_query_chunk=3)  # fmt: skip
    prompts = [prompt(seed=s, length=n) for s, n in enumerate((11, 9, 8))]
    ids, mask = _left_padded(prompts)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        for row, p in enumerate(prompts):
            ref = model(p).logits[0]
            torch.testing.assert_close(out[row, ids.shape[1] - p.shape[1] :], ref, rtol=0, atol=ATOL)


def test_chunked_path_refuses_padding_with_holes():
    model = tiny_model("masformer")
    ids = prompt(length=6)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1]])
    with pytest.raises(ValueError, match="padding only at the ends"):
        model(ids, attention_mask=mask)
    dense = tiny_model("masformer", sparse_attention_impl="dense")
    assert torch.isfinite(dense(ids, attention_mask=mask).logits).all()


def test_rolling_cache_refuses_to_rewind_past_evicted_entries():
    model = tiny_model("masformer", attention_window=4)
    cache = DynamicCache()
    with torch.no_grad():
        model(prompt(length=10), cache=cache)
    with pytest.raises(RuntimeError, match="rewind"):
        cache.crop(-2)
