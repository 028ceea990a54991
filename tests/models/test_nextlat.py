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
    model = tiny_model("nextlat", latent_loss_weight=0.5)
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


def test_kl_term_is_optional_and_added_with_its_weight():
    model = tiny_model("nextlat", kl_loss_weight=0.25)
    _randomise_head(model)
    ids = prompt(length=8)
    out = model(ids, labels=ids)
    assert out.kl_loss is not None and out.kl_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.latent_loss + 0.25 * out.kl_loss)


def test_training_lowers_the_latent_loss():
    model = tiny_model("nextlat").train()
    ids = prompt(length=16, batch=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        out = model(ids, labels=ids, use_cache=False)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append((out.latent_loss.item(), out.lm_loss.item()))
    assert losses[-1][0] < losses[0][0]
    assert losses[-1][1] < losses[0][1]
    assert model.latent_head.fc3.weight.any()  # the zero-initialised layer learned


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
