"""NextLat: the latent head's shape and loss, that it stays off the logits path, and speculative decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dfloat.models import LatentHead
from dfloat.models.testing import prompt, tiny_model


def _randomise_head(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.latent_head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_head_layout_and_zero_initialised_last_layer():
    model = tiny_model("nextlat")
    head = model.latent_head
    assert isinstance(head, LatentHead)
    d = model.config.hidden_size
    shapes = {name: tuple(p.shape) for name, p in head.named_parameters()}
    assert shapes == {
        "norm.weight": (2 * d,),
        "norm.bias": (2 * d,),
        "fc1.weight": (d, 2 * d),
        "fc1.bias": (d,),
        "fc2.weight": (d, d),
        "fc2.bias": (d,),
        "fc3.weight": (d, d),
        "fc3.bias": (d,),
    }
    assert not head.fc3.weight.any() and not head.fc3.bias.any()
    assert head.fc1.weight.std() > 0
    h, e = torch.randn(2, 3, d), torch.randn(2, 3, d)
    with torch.no_grad():
        assert torch.equal(head(h, e), h)  # zero last layer: residual only


def test_head_formula():
    model = tiny_model("nextlat")
    _randomise_head(model)
    head = model.latent_head
    d = model.config.hidden_size
    h, e = torch.randn(4, d), torch.randn(4, d)
    with torch.no_grad():
        x = F.layer_norm(torch.cat([h, e], -1), (2 * d,), head.norm.weight, head.norm.bias, eps=1e-5)
        x = F.linear(F.gelu(F.linear(F.gelu(F.linear(x, head.fc1.weight, head.fc1.bias)), head.fc2.weight, head.fc2.bias)), head.fc3.weight, head.fc3.bias)  # fmt: skip
        assert torch.equal(head(h, e), h + x)


def test_head_is_off_the_logits_path():
    model = tiny_model("nextlat")
    ids = prompt(length=8)
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    _randomise_head(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), generated)


def test_loss_is_cross_entropy_plus_weighted_latent_mse():
    model = tiny_model("nextlat", latent_loss_weight=0.5, latent_loss="mse", latent_pairs="labels")
    _randomise_head(model)
    ids = prompt(length=10, batch=2)
    labels = ids.clone()
    labels[0, 4] = -100  # pair (3, 4) of row 0 is not counted
    out = model(ids, labels=labels)
    with torch.no_grad():
        h = model.model(ids).last_hidden_state
        h_hat = model.latent_head(h[:, :-1], model.model.embed_tokens(ids[:, 1:]))
        per_pair = ((h_hat - h[:, 1:]) ** 2).mean(-1)
        keep = labels[:, 1:] != -100
        mse = per_pair[keep].mean()
        ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 96), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.latent_loss, mse)
    torch.testing.assert_close(out.lm_loss, ce)
    torch.testing.assert_close(out.loss, ce + 0.5 * mse)
    assert out.kl_loss is None  # weight 0 by default


def test_default_latent_loss_is_smooth_l1_over_all_pairs():
    """The authors' public code: smooth L1 to the detached next latent, every pair counted."""
    model = tiny_model("nextlat")
    _randomise_head(model)
    ids = prompt(length=10, batch=2)
    labels = ids.clone()
    labels[0, 4] = -100  # still counted under latent_pairs="all"
    out = model(ids, labels=labels)
    with torch.no_grad():
        h = model.model(ids).last_hidden_state
        h_hat = model.latent_head(h[:, :-1], model.model.embed_tokens(ids[:, 1:]))
        diff = (h_hat - h[:, 1:]).abs()
        expected = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()
    torch.testing.assert_close(out.latent_loss, expected)


def test_latent_target_is_stop_gradient():
    """The last position is only ever a target, so the latent loss must send it no gradient."""
    model = tiny_model("nextlat")
    _randomise_head(model)
    ids = prompt(length=6)
    hidden = model.model(ids).last_hidden_state.detach().requires_grad_(True)
    latent_loss, _ = model.latent_losses(hidden, ids, ids)
    (grad,) = torch.autograd.grad(latent_loss, hidden)
    assert not grad[:, -1].any()
    assert grad[:, :-1].abs().sum() > 0


def _kl_check(model, ids):
    """(KL value matches sum p (log p - log p_hat) with p from h(t+1), the target position gets no gradient)."""
    hidden = model.model(ids).last_hidden_state.detach().requires_grad_(True)
    _, kl = model.latent_losses(hidden, ids, ids)
    (grad,) = torch.autograd.grad(kl, hidden)
    with torch.no_grad():
        h_hat = model.latent_head(hidden[:, :-1], model.model.embed_tokens(ids[:, 1:]))
        log_p = F.log_softmax(model.lm_head(hidden[:, 1:]), -1)
        log_q = F.log_softmax(model.lm_head(h_hat), -1)
        expected = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    value_ok = torch.allclose(kl, expected, rtol=1e-5, atol=1e-7)
    return value_ok, not grad[:, -1].any()


def _flipped_kl_undetached(self, hidden, input_ids, labels):
    """Mutation from issue 15: KL(p_hat || p) with the target left attached to the graph."""
    h_hat = self.latent_head(hidden[:, :-1], self.model.embed_tokens(input_ids[:, 1:]))
    log_p = F.log_softmax(self.lm_head(hidden[:, 1:]), -1)
    log_q = F.log_softmax(self.lm_head(h_hat), -1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    return F.smooth_l1_loss(h_hat, hidden[:, 1:].detach()), kl


def test_kl_is_forward_kl_to_a_detached_target(monkeypatch):
    model = tiny_model("nextlat", kl_loss_weight=1.0)
    _randomise_head(model)
    ids = prompt(length=9)
    assert _kl_check(model, ids) == (True, True)
    monkeypatch.setattr(type(model), "latent_losses", _flipped_kl_undetached)
    assert _kl_check(model, ids) == (False, False)  # the check catches the flipped, attached KL


@pytest.mark.parametrize("trains", [False, True])
def test_kl_trains_lm_head_flag(trains):
    model = tiny_model("nextlat", kl_loss_weight=1.0, kl_trains_lm_head=trains)
    _randomise_head(model)
    ids = prompt(length=9)
    hidden = model.model(ids).last_hidden_state.detach()
    _, kl = model.latent_losses(hidden, ids, ids)
    kl.backward()
    grad = model.lm_head.weight.grad
    assert (grad is not None and bool(grad.any())) == trains
    assert model.latent_head.fc1.weight.grad.any()  # the head always learns from it


@pytest.mark.parametrize("trains", [False, True])
def test_latent_trains_embeddings_flag(trains):
    model = tiny_model("nextlat", latent_trains_embeddings=trains)
    _randomise_head(model)
    ids = prompt(length=9)
    hidden = model.model(ids).last_hidden_state.detach()
    latent, _ = model.latent_losses(hidden, ids, ids)
    latent.backward()
    grad = model.model.embed_tokens.weight.grad
    assert (grad is not None and bool(grad.any())) == trains


def test_latent_pairs_labels_ignores_masked_pairs():
    model = tiny_model("nextlat", latent_pairs="labels")
    _randomise_head(model)
    ids = prompt(length=9)
    hidden = model.model(ids).last_hidden_state.detach().requires_grad_(True)
    labels = ids.clone()
    labels[0, 5:] = -100  # pairs (4,5) .. (7,8) do not count
    latent, _ = model.latent_losses(hidden, ids, labels)
    (grad,) = torch.autograd.grad(latent, hidden)
    assert not grad[:, 5:].any() and grad[:, :4].abs().sum() > 0


def test_kl_term_is_optional_and_added_with_its_weight():
    model = tiny_model("nextlat", kl_loss_weight=0.25)
    _randomise_head(model)
    ids = prompt(length=8)
    out = model(ids, labels=ids)
    assert out.kl_loss is not None and out.kl_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.latent_loss + 0.25 * out.kl_loss)


def test_training_lowers_the_latent_loss():
    """Joint training moves the target too, so compare the trained head with an untrained one on the final model."""
    model = tiny_model("nextlat").train()
    ids = prompt(length=16, batch=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lm_losses = []
    for _ in range(8):
        out = model(ids, labels=ids, use_cache=False)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        lm_losses.append(out.lm_loss.item())
    assert lm_losses[-1] < lm_losses[0]
    assert model.latent_head.fc3.weight.any()  # the zero-initialised layer learned
    with torch.no_grad():
        trained = model(ids, labels=ids, use_cache=False).latent_loss
        model.latent_head.fc3.weight.zero_()
        model.latent_head.fc3.bias.zero_()
        untrained = model(ids, labels=ids, use_cache=False).latent_loss
    assert trained < untrained


@pytest.mark.parametrize("draft_tokens", [1, 3, 5])
@pytest.mark.parametrize("seed", [0, 2])
def test_speculative_equals_greedy_generate(draft_tokens, seed):
    model = tiny_model("nextlat")
    _randomise_head(model, seed=seed)
    ids = prompt(seed=seed, length=7)
    greedy = model.generate(ids, max_new_tokens=20, do_sample=False)
    spec, stats = model.generate_speculative(ids, 20, draft_tokens=draft_tokens, return_stats=True)
    assert torch.equal(spec, greedy)
    assert stats.new_tokens == 20 and 0 <= stats.accepted <= stats.drafted
    assert stats.verify_steps == 19 - stats.accepted  # every step emits its accepted drafts plus one token
    assert model.last_speculative_stats is stats


def test_speculative_accepts_matching_drafts():
    """The untrained (zero) head drafts "the same token again": on a repetitive continuation drafts are accepted."""
    model = tiny_model("nextlat")
    ids = prompt(seed=0, length=7)
    greedy = model.generate(ids, max_new_tokens=20, do_sample=False)
    spec, stats = model.generate_speculative(ids, 20, draft_tokens=4, return_stats=True)
    assert torch.equal(spec, greedy)
    assert stats.acceptance_rate > 0.5 and stats.tokens_per_step > 2


def test_speculative_stops_at_eos_like_generate():
    model = tiny_model("nextlat")
    _randomise_head(model)
    ids = prompt(seed=2, length=7)
    free = model.generate(ids, max_new_tokens=20, do_sample=False)
    eos = int(free[0, 7 + 5])  # a token generated mid-way
    greedy = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=eos)
    spec = model.generate_speculative(ids, 20, draft_tokens=3, eos_token_id=eos)
    assert torch.equal(spec, greedy)
    assert int(spec[0, -1]) == eos and spec.shape[1] <= 7 + 6


# --- drafting: what the head is fed (issue 15's mutations) ----------------------------------------------------


def _token_sensitive_head(model, seed=5):
    """A random head whose LayerNorm amplifies the token half of its input: the tiny model's embeddings (std 0.1)
    are small next to h (RMS 1), so otherwise the drafted token barely moves the next latent."""
    _randomise_head(model, seed)
    with torch.no_grad():
        model.latent_head.norm.weight[model.config.hidden_size :] *= 30


def _hand_draft(model, h_last, token, k):
    """The drafting rule written out: each step feeds the latent it just predicted and the token it just drafted."""
    out, z, tok = [], h_last, token
    for _ in range(k):
        z = model.latent_head(z, model.model.embed_tokens(tok))
        tok = model.lm_head(z).argmax(-1)
        out.append(int(tok))
    return out


def _draft_repeating_current_token(self, h_last, token, draft_tokens, min_confidence=0.0):
    """Mutation: feed the current token at every step instead of the token just drafted."""
    drafts, z = [], h_last
    for _ in range(draft_tokens):
        z = self.latent_head(z, self.model.embed_tokens(token))
        drafts.append(self.lm_head(z).argmax(-1)[:, None])
    return torch.cat(drafts, dim=1)


def _drafts_match_hand_rule(model) -> bool:
    ok = True
    with torch.no_grad():
        for seed in range(4):
            ids = prompt(seed=seed, length=6)
            h = model.model(ids).last_hidden_state[:, -2]
            ok &= model.draft(h, ids[:, -1], 5)[0].tolist() == _hand_draft(model, h, ids[:, -1], 5)
    return ok


def test_draft_feeds_back_each_drafted_token(monkeypatch):
    model = tiny_model("nextlat")
    _token_sensitive_head(model)
    assert _drafts_match_hand_rule(model)
    monkeypatch.setattr(type(model), "draft", _draft_repeating_current_token)
    assert not _drafts_match_hand_rule(model)


def _spy_draft_inputs(model, ids, n):
    """Run generate_speculative, recording every draft call's (h_last, token) and the sequence at that moment."""
    calls = []
    real = type(model).draft

    def spy(self, h_last, token, draft_tokens, min_confidence=0.0):
        calls.append((h_last.clone(), int(token)))
        return real(self, h_last, token, draft_tokens, min_confidence)

    type(model).draft = spy
    try:
        seq = model.generate_speculative(ids, n, draft_tokens=3)
    finally:
        type(model).draft = real
    return calls, seq


def _drafts_conditioned_on_the_right_position(model, ids) -> bool:
    """Each draft must start from h(p) of a position p of the final sequence and the token at p + 1."""
    calls, seq = _spy_draft_inputs(model, ids, 16)
    with torch.no_grad():
        hidden = model.model(seq).last_hidden_state[0]
    p, ok = ids.shape[1] - 1, True
    for h_last, token in calls:
        while p < seq.shape[1] - 1 and not torch.allclose(h_last[0], hidden[p], atol=1e-5):
            p += 1
        ok &= p < seq.shape[1] - 1 and int(seq[0, p + 1]) == token
    return ok and len(calls) > 1


def _wrong_token_inputs(hidden, block, greedy, accepted):
    """Mutation (off by one): pair h(t) with the token at t instead of the token after it."""
    return hidden[:, accepted], block[0, accepted : accepted + 1]


def test_drafts_start_from_the_last_latent_and_the_next_token(monkeypatch):
    model = tiny_model("nextlat")
    _token_sensitive_head(model, seed=3)
    prompts = [prompt(seed=s, length=6) for s in range(3)]
    assert all(_drafts_conditioned_on_the_right_position(model, ids) for ids in prompts)
    monkeypatch.setattr(type(model), "_next_draft_inputs", staticmethod(_wrong_token_inputs))
    assert not all(_drafts_conditioned_on_the_right_position(model, ids) for ids in prompts)


def test_variable_length_drafting_stops_when_confidence_drops():
    model = tiny_model("nextlat")
    _randomise_head(model)
    ids = prompt(seed=1, length=6)
    with torch.no_grad():
        h = model.model(ids).last_hidden_state[:, -1]
        tok = model.lm_head(h).argmax(-1)
        # the head's top probability at each of 6 fixed-length draft steps, written out
        probs, z, t = [], h, tok
        for _ in range(6):
            z = model.latent_head(z, model.model.embed_tokens(t))
            p = torch.softmax(model.lm_head(z).float(), -1)
            probs.append(float(p.max()))
            t = p.argmax(-1)
        threshold = sorted(probs)[len(probs) // 2]  # a threshold some steps fall under
        expected = next((i for i, q in enumerate(probs) if q < threshold), 6)
        assert model.draft(h, tok, 6, min_confidence=threshold).shape[1] == expected
        assert model.draft(h, tok, 6).shape[1] == 6
    greedy = model.generate(ids, max_new_tokens=20, do_sample=False)
    spec, stats = model.generate_speculative(ids, 20, draft_tokens=6, draft_confidence=0.5, return_stats=True)
    assert torch.equal(spec, greedy)  # variable length drafting changes the speed, not the output
    full = model.generate_speculative(ids, 20, draft_tokens=6, return_stats=True)[1]
    assert stats.drafted < full.drafted
