"""Bottlenecked Transformer: rewrites happen at trigger tokens only, change what follows, and replay exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from dfloat.models import RewriteEvent
from dfloat.models.testing import prompt, tiny_model

# With the tiny seed-0 model, greedy decoding of prompt(seed=0) emits token 55 several times: it is the trigger.
TRIGGER = 55
PROMPT_LEN = 6
N_LAYERS = 3


def _model(trained: bool = True, **overrides):
    """The tiny model; ``trained`` gives out_proj random weights (it starts at zero, an identity processor)."""
    model = tiny_model("bottlenecked", **overrides)
    if trained:
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            w = model.cache_processor.out_proj.weight
            w.copy_(torch.randn(w.shape, generator=g) * model.config.initializer_range)
    return model


def _trigger_slots(seq: torch.Tensor, start: int) -> list[int]:
    """Slots of trigger tokens that went through a forward: from ``start`` on, the last token excluded."""
    return [i for i in range(start, seq.shape[1] - 1) if int(seq[0, i]) == TRIGGER]


def _step_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of a prefill then one-token cached steps, as generate() runs the model."""
    cache = DynamicCache()
    with torch.no_grad():
        out = [model(ids[:, :prefill], cache=cache).logits]
        for i in range(prefill, ids.shape[1]):
            out.append(model(ids[:, i : i + 1], cache=cache).logits)
    return torch.cat(out, dim=1)


def test_rewrites_happen_at_generated_triggers_only():
    model = _model()
    ids = prompt(seed=0, length=PROMPT_LEN)
    seq = model.generate(ids, max_new_tokens=20, do_sample=False)
    slots = _trigger_slots(seq, PROMPT_LEN)
    assert len(slots) >= 2, "fixture drifted: the trigger should be generated at least twice"
    log = model.rewrite_log
    assert all(isinstance(e, RewriteEvent) for e in log)
    assert [e.position for e in log] == [p for p in slots for _ in range(N_LAYERS)]
    assert [e.layer for e in log] == list(range(N_LAYERS)) * len(slots)
    k = model.config.reconsolidate_top_k
    step_start = PROMPT_LEN
    for p in slots:
        for e in (e for e in log if e.position == p):
            earlier, step = e.indices[:k], e.indices[k:]
            assert step == tuple(range(step_start, p + 1))  # the step just finished, trigger included
            assert len(earlier) == k and all(i < step_start for i in earlier)
            assert list(earlier) == sorted(set(earlier))
        step_start = p + 1


def test_no_trigger_no_rewrite_and_plain_logits():
    ids = prompt(seed=0, length=PROMPT_LEN)
    never = _model(trigger_token_ids=[95])
    off = _model(use_cache_processor=False)
    seq = never.generate(ids, max_new_tokens=20, do_sample=False)
    assert 95 not in seq[0, PROMPT_LEN:-1].tolist()
    assert never.rewrite_log == []
    assert torch.equal(seq, off.generate(ids, max_new_tokens=20, do_sample=False))


def test_prompt_triggers_count_only_when_configured():
    ids = prompt(seed=0, length=PROMPT_LEN).clone()
    ids[0, 2] = TRIGGER
    default = _model(trigger_token_ids=[TRIGGER, 95])
    with torch.no_grad():
        default(ids, cache=DynamicCache())
    assert default.rewrite_log == []
    on_prompt = _model(trigger_token_ids=[TRIGGER, 95], trigger_on_prompt=True)
    with torch.no_grad():
        on_prompt(ids, cache=DynamicCache())
    assert {e.position for e in on_prompt.rewrite_log} == {2}
    assert all(e.indices == (0, 1, 2) for e in on_prompt.rewrite_log)  # no earlier entries to reconsolidate


def test_turning_the_processor_off_changes_logits_after_a_trigger():
    """Same weights: identical up to the forward that consumes the trigger, different from the next one on."""
    ids = prompt(seed=0, length=12).clone()
    ids[0, 8] = TRIGGER
    on = _step_logits(_model(), ids, prefill=PROMPT_LEN)
    off = _step_logits(_model(use_cache_processor=False), ids, prefill=PROMPT_LEN)
    assert torch.equal(on[:, :9], off[:, :9])
    assert not torch.equal(on[:, 9], off[:, 9])
    assert (on[:, 9:] - off[:, 9:]).abs().amax(-1).min() > 0


def test_cache_entries_are_rewritten_in_place():
    ids = prompt(seed=0, length=12).clone()
    ids[0, 8] = TRIGGER
    caches, model = {}, None
    for flag in (True, False):  # same call shapes both ways, so untouched entries match bit for bit
        model = _model(use_cache_processor=flag) if model is None else model
        model.config.use_cache_processor = flag
        caches[flag] = DynamicCache()
        with torch.no_grad():
            model(ids[:, :9], cache=caches[flag], trigger_from=PROMPT_LEN)
            model(ids[:, 9:], cache=caches[flag])
        if flag:
            log = list(model.rewrite_log)
    assert {e.position for e in log} == {8}
    for li, (a, b) in enumerate(zip(caches[True].layers, caches[False].layers, strict=True)):
        touched = set(next(e.indices for e in log if e.layer == li))
        for slot in range(9):  # up to the trigger: exactly the backbone's unless rewritten
            same = torch.equal(a.keys[:, :, slot], b.keys[:, :, slot]) and torch.equal(
                a.values[:, :, slot], b.values[:, :, slot]
            )
            assert same == (slot not in touched), (li, slot)
        # after the trigger, layers above the first attended to rewritten entries (layer 0 only sees tokens)
        gap = (a.keys[:, :, 9:] - b.keys[:, :, 9:]).abs().max()
        assert gap < 1e-5 if li == 0 else gap > 1e-3, (li, gap)


def test_full_forward_replays_cached_generation():
    """A one-call forward split at triggers equals token-by-token decoding (given where the prompt ends)."""
    model = _model()
    ids = prompt(seed=0, length=PROMPT_LEN)
    seq = model.generate(ids, max_new_tokens=16, do_sample=False)
    log = list(model.rewrite_log)
    assert log
    stepped = _step_logits(model, seq, prefill=PROMPT_LEN)
    assert model.rewrite_log == log
    with torch.no_grad():
        full = model(seq, trigger_from=PROMPT_LEN).logits
    assert model.rewrite_log == log
    torch.testing.assert_close(full, stepped, rtol=0, atol=1e-5)
    assert torch.equal(full[0, PROMPT_LEN - 1 : -1].argmax(-1), seq[0, PROMPT_LEN:])


def test_training_reaches_the_processor():
    """With labels every trigger counts (teacher forcing), so the processor gets gradients and learns."""
    model = _model().train()
    ids = prompt(seed=3, length=16, batch=2).clone()
    ids[:, [4, 9]] = TRIGGER
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.cache_processor.parameters():
        p.requires_grad_(True)  # frozen backbone, as in the paper
    opt = torch.optim.AdamW(model.cache_processor.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(model.rewrite_log) == 2 * 2 * N_LAYERS  # 2 rows x 2 triggers x layers, every call
    assert losses[-1] < losses[0]


def test_processor_weights_are_plain_two_d_linear_or_embedding():
    model = _model()
    names = dict(model.cache_processor.named_modules())
    for name, param in model.cache_processor.named_parameters():
        owner = names[name.rsplit(".", 1)[0]]
        if param.dim() == 2:
            assert isinstance(owner, (torch.nn.Linear, torch.nn.Embedding)) and name.endswith("weight"), name
    two_d = [n for n, p in model.cache_processor.named_parameters() if p.dim() == 2]
    assert (
        "in_proj.weight" in two_d
        and "out_proj.weight" in two_d
        and "layers.1.self_attn.q_proj.weight" in two_d
    )


def test_left_padded_batch_rewrites_each_row_at_its_own_trigger():
    model = _model()
    a = prompt(seed=0, length=10).clone()
    b = prompt(seed=1, length=7).clone()
    a[0, 8], b[0, 5] = TRIGGER, TRIGGER
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(batch, attention_mask=mask, position_ids=positions, trigger_from=4).logits
        log = model.rewrite_log
        ref_a = model(a, trigger_from=4).logits
        ref_b = model(b, trigger_from=1).logits
    assert {(e.batch_index, e.position) for e in log} == {(0, 8), (1, 8)}
    row1 = next(e for e in log if e.batch_index == 1)
    assert all(i >= 3 for i in row1.indices)  # padding is never selected
    torch.testing.assert_close(out[0], ref_a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1, 3:], ref_b[0], rtol=0, atol=1e-5)


# --- issue 15: identity at init, selection by the step's real attention, no beams, one trigger rule -------------


def test_untrained_processor_leaves_a_frozen_backbone_unchanged():
    """out_proj starts at zero: rewrites happen but write back exactly what was there."""
    ids = prompt(seed=0, length=PROMPT_LEN)
    fresh = _model(trained=False)
    assert not fresh.cache_processor.out_proj.weight.any()
    off = _model(trained=False, use_cache_processor=False)
    seq = fresh.generate(ids, max_new_tokens=20, do_sample=False)
    assert fresh.rewrite_log  # the processor ran
    assert torch.equal(seq, off.generate(ids, max_new_tokens=20, do_sample=False))
    assert torch.equal(_step_logits(fresh, seq, PROMPT_LEN), _step_logits(off, seq, PROMPT_LEN))


def _hand_attention_mass(model, ids, step_start, trigger):
    """Per layer, attention from the step's queries (slots step_start..trigger) onto slots < step_start,
    recomputed from the plain backbone's q and k (no rewrite happens before the first trigger)."""
    from dfloat.models.skeleton import apply_rotary, repeat_kv, rotary_cos_sin

    inputs = {}
    hooks = [
        layer.self_attn.register_forward_hook(lambda mod, args, out, i=i: inputs.__setitem__(i, args[0]))
        for i, layer in enumerate(model.model.layers)
    ]
    model.config.use_cache_processor = False
    try:
        with torch.no_grad():
            model(ids[:, : trigger + 1], use_cache=False)
    finally:
        model.config.use_cache_processor = True
        for h in hooks:
            h.remove()
    cfg = model.config
    n = trigger + 1
    cos, sin = rotary_cos_sin(torch.arange(n)[None], cfg.head_dim, cfg.rope_theta, torch.float32)
    masses = []
    for i, layer in enumerate(model.model.layers):
        att, x = layer.self_attn, inputs[i]
        q = apply_rotary(att.q_proj(x).view(1, n, cfg.num_attention_heads, -1).transpose(1, 2), cos, sin)
        k = apply_rotary(att.k_proj(x).view(1, n, cfg.num_key_value_heads, -1).transpose(1, 2), cos, sin)
        k = repeat_kv(k, cfg.num_attention_heads // cfg.num_key_value_heads)
        scores = (q @ k.transpose(-1, -2)) * cfg.head_dim**-0.5
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        probs = torch.softmax(scores, -1)[0, :, step_start:, :step_start]  # heads, step queries, earlier keys
        masses.append(probs.sum(dim=(0, 1)))
    return masses


def _selection_follows_the_step_attention(model, ids, step_start, trigger, k) -> bool:
    with torch.no_grad():
        model(ids[:, : trigger + 2], trigger_from=step_start)
    ok = True
    for layer, mass in enumerate(_hand_attention_mass(model, ids, step_start, trigger)):
        event = next(e for e in model.rewrite_log if e.layer == layer and e.position == trigger)
        ok &= set(event.indices[:k]) == set(torch.topk(mass, k).indices.tolist())
    return ok


def _most_recent(mass, candidates, k):
    """Mutation: the k most recent earlier entries, whatever the attention."""
    return candidates[-k:]


def test_top_k_follows_the_steps_attention_not_recency(monkeypatch):
    from dfloat.models import bottleneck

    model = _model(reconsolidate_top_k=3)
    ids = prompt(seed=4, length=16).clone()
    step_start, trigger = 10, 13
    ids[0, trigger] = TRIGGER
    ids[0, :trigger] = torch.where(ids[0, :trigger] == TRIGGER, 0, ids[0, :trigger])
    masses = _hand_attention_mass(model, ids, step_start, trigger)
    recent = set(range(step_start - 3, step_start))
    assert any(set(torch.topk(m, 3).indices.tolist()) != recent for m in masses)  # the fixture discriminates
    assert _selection_follows_the_step_attention(model, ids, step_start, trigger, 3)
    monkeypatch.setattr(bottleneck, "_select_earlier", _most_recent)
    assert not _selection_follows_the_step_attention(model, ids, step_start, trigger, 3)


def test_beam_search_is_refused_with_a_clear_error():
    model = _model()
    ids = prompt(seed=0, length=PROMPT_LEN)
    with pytest.raises(ValueError, match="beam search is not supported"):
        model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False)
    model.config.use_cache_processor = False  # the plain backbone may use beams
    assert model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False).shape == (1, PROMPT_LEN + 4)


def test_training_and_inference_use_the_same_trigger_rule():
    """A trigger inside the prompt (label -100 in training, the first call's input at inference) does not count
    unless trigger_on_prompt; a trigger after it does, both ways."""
    ids = prompt(seed=0, length=12).clone()
    ids[0] = torch.where(ids[0] == TRIGGER, 0, ids[0])
    ids[0, 2], ids[0, 8] = TRIGGER, TRIGGER
    labels = ids.clone()
    labels[0, :PROMPT_LEN] = -100
    for on_prompt in (False, True):
        model = _model(trigger_on_prompt=on_prompt)
        with torch.no_grad():
            model(ids, labels=labels)
            trained = sorted({e.position for e in model.rewrite_log})
            _step_logits(model, ids, prefill=PROMPT_LEN)
            inferred = sorted({e.position for e in model.rewrite_log})
        assert trained == inferred == ([2, 8] if on_prompt else [8])
