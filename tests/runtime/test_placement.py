"""``model.to(device)`` on a compressed model moves its compressed units and rebinds the weights to a decode
buffer on the new device (runtime/placement.py): outputs stay equal, and no BF16 copy of the weights is
made."""

from __future__ import annotations

import pytest
import torch

import dfloat
from dfloat.errors import DFloatError
from dfloat.testing import save_random_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    save_random_model(root / "bf16", trained_scale=True, seed=5, tie_word_embeddings=True, vocab_size=1024)
    dfloat.compress_model(
        root / "bf16", root / "dfloat", bytes_per_window=8, windows_per_block=4
    )  # small blocks
    return root


IDS = torch.tensor([[1, 2, 3, 4, 5]])


def _coded_params(model):
    names = {m.name for ct in model._dfloat_units.values() for m in ct.members}
    return {n: p for n, p in model.named_parameters(remove_duplicate=False) if n in names}


@pytest.mark.parametrize(
    "chunk_numel", [None, 2000]
)  # 2000: the tied embedding / lm_head used piecewise; None: whole
def test_to_cpu_rebinds_and_outputs_stay_equal(folders, chunk_numel):
    model = dfloat.load_compressed(
        folders / "dfloat", device="cpu", chunk_numel=chunk_numel, chunking=chunk_numel is not None
    )
    assert bool(model._dfloat_plan.chunked) == (chunk_numel is not None)
    want = model(IDS).logits
    old_buffer = model._dfloat_buffers[torch.device("cpu")]
    for move in (
        lambda m: m.to("cpu"),
        lambda m: m.cpu(),
        lambda m: m.to(torch.device("cpu"), non_blocking=True),
    ):
        assert move(model) is model
        assert torch.equal(model(IDS).logits, want)
    new_buffer = model._dfloat_buffers[torch.device("cpu")]
    assert new_buffer is old_buffer  # same device: nothing moved, nothing reallocated
    storage = new_buffer.tensor.untyped_storage().data_ptr()
    for name, p in _coded_params(model).items():  # still views of the buffer (or piecewise placeholders)
        assert p.untyped_storage().data_ptr() == storage or 0 in p.stride(), name


@pytest.mark.parametrize("chunk_numel", [None, 2000])  # None: every unit decoded whole
def test_a_move_rebuilds_the_buffer_and_rebinds(folders, chunk_numel):
    """The relocation path of a real device change, on the CPU: units said to be elsewhere (``cpu:0``) come to
    ``cpu``; a new decode buffer is made, the weights point into it, a piecewise unit shares its arrays."""
    model = dfloat.load_compressed(
        folders / "dfloat", device="cpu", chunk_numel=chunk_numel, chunking=chunk_numel is not None
    )
    want = model(IDS).logits
    old = model._dfloat_buffers[torch.device("cpu")]
    elsewhere = torch.device("cpu", 0)
    for unit in model._dfloat_unit_list:
        unit.device = elsewhere
    model._dfloat_buffers[elsewhere] = model._dfloat_buffers.pop(torch.device("cpu"))
    model.to("cpu")
    assert list(model._dfloat_buffers) == [torch.device("cpu")]
    new = model._dfloat_buffers[torch.device("cpu")]
    assert new is not old and new.numel == old.numel
    assert all(u.device == torch.device("cpu") for u in model._dfloat_unit_list)
    chunked = [m._dfloat_chunked for m in model.modules() if getattr(m, "_dfloat_chunked", None) is not None]
    assert bool(chunked) == (chunk_numel is not None)
    for cu in chunked:
        assert cu.buffer is new and any(cu.ct is u.ct for u in model._dfloat_unit_list)
    assert torch.equal(model(IDS).logits, want)
    storage = new.tensor.untyped_storage().data_ptr()
    for name, p in _coded_params(model).items():
        assert p.untyped_storage().data_ptr() == storage or 0 in p.stride(), name


def test_a_dtype_change_is_refused_and_leaves_the_model_intact(folders):
    model = dfloat.load_compressed(folders / "dfloat", device="cpu")
    want = model(IDS).logits
    for cast in (lambda m: m.float(), lambda m: m.half(), lambda m: m.to(torch.float32)):
        with pytest.raises(DFloatError, match="BF16 only"):
            cast(model)
        assert torch.equal(model(IDS).logits, want)


@pytest.mark.gpu
@pytest.mark.parametrize("cpu_offload", [False, True])
def test_to_cuda_and_back(folders, cpu_offload):
    ref = dfloat.load_compressed(folders / "dfloat", device="cuda", cpu_offload=cpu_offload)
    want = ref(IDS.cuda()).logits
    model = dfloat.load_compressed(folders / "dfloat", device="cpu", cpu_offload=cpu_offload)
    model.to("cuda")
    assert all(u.device.type == "cuda" for u in model._dfloat_unit_list)
    assert torch.equal(model(IDS.cuda()).logits, want)
    model.to("cpu")
    assert model._dfloat_buffers.keys() == {torch.device("cpu")}
    assert all(ct.device.type == "cpu" for ct in model._dfloat_units.values())
    model.cuda()
    assert torch.equal(model(IDS.cuda()).logits, want)
