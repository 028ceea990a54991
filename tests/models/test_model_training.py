"""A few optimiser steps on CPU lower the language-model loss of every architecture (gradients reach all parts)."""

from __future__ import annotations

import pytest
import torch

from dfloat.models.testing import ARCHS, prompt, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_a_few_training_steps_lower_the_loss(arch):
    model = tiny_model(arch).train()
    ids = prompt(seed=4, length=16, batch=2).clone()
    if arch == "bottlenecked":
        ids[:, 7] = model.config.trigger_token_ids[0]  # make the Cache Processor part of the computation
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient reached {missing}"
