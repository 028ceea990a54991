"""LoRA on a compressed base: adapters train (same gradients as on the BF16 model), the base stays untouched,
adapters round-trip through PEFT's own save/load, and the merged export equals PEFT's merge on the BF16 model."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch

import dfloat
from dfloat.testing import save_random_model

peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    save_random_model(root / "bf16", trained_scale=True, seed=3)
    dfloat.compress_model(root / "bf16", root / "dfloat")
    return root


def _lora(model, seed=0):
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=True)
    return peft.get_peft_model(model, cfg)


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (2, 12), generator=g)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def _step(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


def test_lora_gradients_equal_bf16_and_only_adapters_train(folders):
    base = _lora(AutoModelForCausalLM.from_pretrained(folders / "dfloat"))
    ref = _lora(AutoModelForCausalLM.from_pretrained(folders / "bf16", dtype=torch.bfloat16))
    for m in (base, ref):
        m.train()
        with torch.no_grad():  # non-zero B so every adapter matrix gets a gradient
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
    ids = _batch()
    loss, ref_loss = _step(base, ids), _step(ref, ids)
    assert torch.equal(loss, ref_loss)
    trainable = {n: p for n, p in base.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ref_params = dict(ref.named_parameters())
    for n, p in trainable.items():
        assert p.grad is not None and torch.equal(p.grad, ref_params[n].grad), n
    assert all(p.grad is None for p in base.parameters() if not p.requires_grad)


def test_training_lowers_loss_base_bytes_unchanged_adapters_roundtrip(folders, tmp_path):
    before = _digest(folders / "dfloat")
    model = _lora(AutoModelForCausalLM.from_pretrained(folders / "dfloat"))
    units = model.get_base_model()._dfloat_units
    stored = {u: {k: v.clone() for k, v in ct.stored_tensors().items()} for u, ct in units.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    ids, losses = _batch(), []
    for _ in range(6):
        opt.zero_grad()
        losses.append(_step(model, ids).item())
        opt.step()
    assert losses[-1] < losses[0] - 0.05, losses
    assert _digest(folders / "dfloat") == before
    for u, ct in units.items():
        assert all(torch.equal(v, stored[u][k]) for k, v in ct.stored_tensors().items()), u

    model.save_pretrained(tmp_path / "adapter")  # PEFT's own format: adapters only
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    model.eval()
    loaded = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(folders / "dfloat"), tmp_path / "adapter"
    ).eval()
    on_bf16 = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(folders / "bf16", dtype=torch.bfloat16), tmp_path / "adapter"
    ).eval()
    with torch.no_grad():
        got, want, trained = loaded(ids).logits, on_bf16(ids).logits, model(ids).logits
    assert torch.equal(got, want)
    assert torch.equal(got, trained)

    # Merged export: PEFT's merge on the decompressed base equals PEFT's merge on the BF16 original.
    from dfloat.runtime.peft_export import export_merged

    export_merged(model, tmp_path / "merged")
    export_merged(model, tmp_path / "merged-dfloat", compress=True)
    merged_ref = on_bf16.merge_and_unload()
    with torch.no_grad():
        want = merged_ref(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16)
        assert torch.equal(merged(ids).logits, want)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "merged-dfloat")(ids).logits, want)
    for name, p in merged_ref.state_dict().items():
        assert torch.equal(merged.state_dict()[name], p), name


def test_private_decodes_only_while_autograd_needs_them(folders):
    """A forward whose weights autograd may keep decodes them into private tensors (train or eval mode); right
    after each module its weights are the fixed buffer views again: the CUDA-graph path records those addresses,
    and private copies held by the modules would keep the whole model decoded."""
    model = dfloat.load_compressed(folders / "dfloat")
    ids = _batch()
    with torch.no_grad():
        want = model(ids).logits
    buf = next(iter(model._dfloat_buffers.values())).tensor
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
    q = model.model.layers[0].self_attn.q_proj
    during = []
    q.register_forward_pre_hook(lambda m, args: during.append(m.weight.data_ptr()))
    model.train()
    model(input_ids=ids, labels=ids)  # nothing requires grad: autograd keeps no weight, the buffer serves
    assert lo <= during[-1] < hi
    model.enable_input_require_grads()  # the blocks' inputs require grad: their weights are kept
    for mode in (True, False):
        model.train(mode)
        loss = model(input_ids=ids, labels=ids).loss
        assert not lo <= during[-1] < hi
        assert lo <= q.weight.data_ptr() < hi
        loss.backward()
    model.eval()
    with torch.no_grad():
        got = model(ids).logits
    assert lo <= during[-1] < hi
    assert torch.equal(got, want)


def _ready(model, ids):
    """A forward and backward pass: the guard runs before the forward."""
    model(input_ids=ids, labels=ids).loss.backward()


def test_copying_compressed_modules_is_refused(folders):
    """PEFT's modules_to_save trains a deep copy of the module: the copy's weights would be a snapshot of the
    decode buffer (another unit's bits) and its hooks would decode into the original's. Refused, as is any
    deepcopy of a compressed model; modules_to_save on plain modules (the norms) still works."""
    import copy

    model = AutoModelForCausalLM.from_pretrained(folders / "dfloat")
    for target in (["down_proj"], ["lm_head"], ["embed_tokens"]):
        cfg = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=target)
        with pytest.raises(dfloat.DFloatError, match="modules_to_save"):
            peft.get_peft_model(AutoModelForCausalLM.from_pretrained(folders / "dfloat"), cfg)
    with pytest.raises(
        dfloat.DFloatError, match=r"model\.embed_tokens: holds compressed weights, which cannot be copied"
    ):
        copy.deepcopy(model)
    norms = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["norm"])
    )
    ref = AutoModelForCausalLM.from_pretrained(folders / "bf16", dtype=torch.bfloat16)
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["norm"]))
    ids = _batch()
    with torch.no_grad():
        assert torch.equal(norms(ids).logits, ref(ids).logits)


@pytest.mark.parametrize(
    "options,says",
    [
        ({"use_dora": True}, "DoRA"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
        ({"trainable_token_indices": [1, 2]}, "TrainableTokensLayer"),
    ],
)
def test_adapters_that_read_the_base_weights_outside_a_forward_are_refused(folders, options, says):
    """These read the base weights when the adapter is made (and PiSSA / OLoRA change them): a compressed
    weight then holds another unit's bits. Before issue 19's review the loss and gradients were silently
    wrong (PiSSA: NaN, or an SVD error when the buffer was never written); now the first forward refuses."""
    model = AutoModelForCausalLM.from_pretrained(folders / "dfloat")
    with torch.no_grad():  # the buffer then holds the last unit decoded (finite: PiSSA's SVD of it works)
        model(_batch())
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=TARGETS, **options))
    with pytest.raises(dfloat.DFloatError, match=re.escape(says)):
        _ready(model, _batch())


@pytest.mark.parametrize("init", ["gaussian", "orthogonal"])
def test_initialisations_that_ignore_the_base_weights_train_as_on_bf16(folders, init):
    got = []
    for folder, kw in ((folders / "dfloat", {}), (folders / "bf16", {"dtype": torch.bfloat16})):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(folder, **kw)
        model = peft.get_peft_model(
            model, peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=init)
        )
        loss = model(input_ids=_batch(), labels=_batch()).loss
        loss.backward()
        got.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert torch.equal(got[0][0], got[1][0])
    assert got[0][1].keys() == got[1][1].keys() and all(
        torch.equal(g, got[1][1][n]) for n, g in got[0][1].items()
    )


def test_merged_adapters_are_refused_until_unmerged(folders):
    """merge_adapter writes into the decode buffer, which the next decode overwrites: the adapters' effect
    would be silently lost. Refused at the next forward; unmerged, the adapters run as before."""
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(folders / "dfloat"), peft.LoraConfig(r=4, target_modules=TARGETS)
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.05)
        ids = _batch()
        want = model(ids).logits
        model.merge_adapter()
        with pytest.raises(dfloat.DFloatError, match="merge_adapter"):
            model(ids)
        model.unmerge_adapter()
        assert torch.equal(model(ids).logits, want)
