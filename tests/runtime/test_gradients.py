"""Gradients through a compressed model equal the BF16 model's, bit for bit (issue 19).

Whenever autograd may keep a weight for the backward pass (grad mode on and the op's input or a parameter
requires grad, in train or eval mode), that weight must be a decode of its own: the shared buffer and the lm_head's
row chunks are overwritten by the next unit or chunk. Checked for LoRA on every block matrix and on the last
down_proj only (where only the lm_head sees an input that requires grad), for row-chunked and whole vocabulary
matrices, tied and untied, with and without gradient checkpointing, in train and eval mode (`from_pretrained` and
`load_compressed` return eval mode), through `d loss / d (lm_head input)` as well as the adapters' gradients.
"""

from __future__ import annotations

import pytest
import torch

import dfloat
from tests.runtime.test_chunked import SMALL_BLOCKS, VOCAB, _coded_weight_ptrs
from tests.runtime.test_families import save_bf16

peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", params=["tied", "untied"])
def folders(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    save_bf16(LlamaConfig(**VOCAB, tie_word_embeddings=request.param == "tied"), root / "bf16")
    dfloat.compress_model(root / "bf16", root / "dfloat", **SMALL_BLOCKS)
    return root


def _pair(root, chunked: bool):
    """The compressed model (vocabulary matrices row-chunked or whole) and the BF16 one, both in eval mode."""
    if chunked:  # 1024 x 64 is bigger than a block's MLP part: chunked by default
        model = AutoModelForCausalLM.from_pretrained(root / "dfloat")
        assert len(model._dfloat_plan.chunked["model.embed_tokens"].chunks) >= 2
    else:
        model = dfloat.load_compressed(root / "dfloat", device="cpu", chunking=False)
        assert not model._dfloat_plan.chunked
    ref = AutoModelForCausalLM.from_pretrained(root / "bf16", dtype=torch.bfloat16)
    assert not model.training and not ref.training
    return model, ref


def _lora(model, targets, checkpointing):
    if checkpointing:
        reentrant = checkpointing == "reentrant"
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
    model = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # non-zero B so every adapter matrix gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    return model


def _step(model, ids):
    """Loss, and the gradient of the loss with respect to the lm_head's input."""
    seen = []
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda m, args: seen.append(args[0]) or args[0].retain_grad())
    try:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        handle.remove()
    return loss, seen[-1].grad


def _check_same_gradients(model, ref, ids):
    loss, d_hidden = _step(model, ids)
    ref_loss, ref_d_hidden = _step(ref, ids)
    assert torch.equal(loss, ref_loss)
    assert d_hidden is not None and torch.equal(d_hidden, ref_d_hidden)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ref_params = dict(ref.named_parameters())
    assert trainable
    for n, p in trainable.items():
        assert p.grad is not None and torch.equal(p.grad, ref_params[n].grad), n


def _ids(batch=2, length=12):
    return torch.randint(3, VOCAB["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("checkpointing", [None, "non-reentrant", "reentrant"])
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole"])
def test_lora_gradients_equal_bf16(folders, chunked, checkpointing, mode):
    base, ref = _pair(folders, chunked)
    ptrs = sorted(_coded_weight_ptrs(base).values())
    model, ref = _lora(base, ALL, checkpointing), _lora(ref, ALL, checkpointing)
    for m in (model, ref):
        m.train(mode == "train")
    _check_same_gradients(model, ref, _ids())
    # the private decodes are autograd's alone: the weights are the buffer views again
    assert sorted(_coded_weight_ptrs(base).values()) == ptrs


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole"])
def test_lora_on_the_last_down_proj_only_in_eval_mode(folders, chunked):
    """Only the lm_head (and that down_proj's block) sees an input that requires grad: the lm_head's weight
    is what autograd keeps for d loss / d hidden."""
    base, ref = _pair(folders, chunked)
    last = base.config.num_hidden_layers - 1
    target = [f"model.layers.{last}.mlp.down_proj"]
    model, ref = _lora(base, target, None), _lora(ref, target, None)
    _check_same_gradients(model, ref, _ids(batch=3, length=9))


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole"])
def test_input_gradients_without_adapters(folders, chunked):
    """No trainable parameter at all: d logits / d inputs_embeds through every block and the lm_head."""
    model, ref = _pair(folders, chunked)
    ids = _ids()
    with torch.no_grad():
        embeds = ref.get_input_embeddings()(ids)
    grads = []
    for m in (model, ref):
        x = embeds.clone().requires_grad_(True)
        logits = m(inputs_embeds=x).logits
        (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        grads.append((logits, x.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_weights_outside_the_hooks_make_autograd_raise(folders):
    """A weight view of the shared buffer that autograd keeps although no input of its module required grad
    (here: an input made to require grad behind the hooks' back) is marked changed by the next decode, so the
    backward pass raises instead of silently using another unit's weights."""
    model, _ = _pair(folders, chunked=False)
    kept = []

    def behind_the_hooks(module, args, out):
        kept.append(torch.nn.functional.linear(args[0].detach().requires_grad_(), module.weight))

    model.model.layers[0].self_attn.q_proj.register_forward_hook(behind_the_hooks)
    model(_ids())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        kept[0].sum().backward()
