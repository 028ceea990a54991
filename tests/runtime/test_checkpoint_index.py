"""A compressed folder has one index, read by dfloat and transformers alike; older folders (a legacy
dfloat.index.json, alone or beside a copy) still load, and two indexes that disagree are refused. No index entry
makes a reader open a file outside the folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import dfloat
from dfloat.errors import ModelSourceError
from dfloat.runtime.checkpoint import (
    INDEX_NAME,
    LEGACY_INDEX_NAME,
    CompressedCheckpoint,
    describe_unit_layout,
)
from dfloat.runtime.memory import plan_checkpoint
from dfloat.testing import save_random_model

IDS = torch.tensor([[1, 5, 9, 2, 7]])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    save_random_model(root / "bf16", trained_scale=True)
    dfloat.compress_model(root / "bf16", root / "c", allow_raw=False)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(root / "bf16", dtype=torch.bfloat16)
    with torch.no_grad():
        logits = ref(IDS).logits
    return root, logits


def _copy(root, name):
    shutil.copytree(root / "c", root / name)
    return root / name


def _logits(folder):
    with torch.no_grad():
        return dfloat.load_compressed(folder, device="cpu")(IDS).logits


def test_a_new_folder_has_one_index(model):
    root, _ = model
    assert (root / "c" / INDEX_NAME).is_file() and not (root / "c" / LEGACY_INDEX_NAME).exists()


@pytest.mark.parametrize("layout", ["legacy only", "legacy and copy"])
def test_older_folders_still_load(model, layout):
    root, logits = model
    folder = _copy(root, layout.replace(" ", "-"))
    shutil.copy(folder / INDEX_NAME, folder / LEGACY_INDEX_NAME)
    if layout == "legacy only":
        (folder / INDEX_NAME).unlink()
    assert torch.equal(_logits(folder), logits)
    dfloat.verify_checkpoint(folder)
    assert plan_checkpoint(folder).total_bytes > 0


def test_indexes_that_disagree_are_refused_everywhere(model):
    root, _ = model
    folder = _copy(root, "disagree")
    index = json.loads((folder / INDEX_NAME).read_text())
    legacy = dict(index, weight_map=dict(index["weight_map"]))
    legacy["weight_map"].pop(next(iter(legacy["weight_map"])))
    (folder / LEGACY_INDEX_NAME).write_text(json.dumps(legacy))
    says = f"{INDEX_NAME} and {LEGACY_INDEX_NAME} list different"
    for read in (
        lambda: dfloat.load_compressed(folder, device="cpu"),
        lambda: dfloat.verify_checkpoint(folder),
        lambda: plan_checkpoint(folder),
        lambda: dfloat.decompress_model(folder, root / "never"),
    ):
        with pytest.raises(ModelSourceError, match=says):
            read()
    from transformers import AutoModelForCausalLM

    with pytest.raises(ModelSourceError, match=says):
        AutoModelForCausalLM.from_pretrained(folder)
    assert not (root / "never").exists()


def test_a_diffusers_index_copy_that_disagrees_is_refused(model):
    root, _ = model
    folder = _copy(root, "diffusers-copy")
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"].popitem()
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        ModelSourceError, match="diffusion_pytorch_model.safetensors.index.json list different"
    ):
        dfloat.verify_checkpoint(folder)


def test_the_diffusers_index_copy_alone_is_read_only_beside_a_dfloat_config(model):
    """A pipeline component that diffusers fetched from the Hub holds only the copy under diffusers' name; a
    BF16 diffusers model with that index is no dfloat checkpoint."""
    from dfloat.runtime.checkpoint import DIFFUSERS_INDEX, is_compressed_folder

    root, logits = model
    folder = _copy(root, "diffusers-copy-alone")
    (folder / INDEX_NAME).rename(folder / DIFFUSERS_INDEX)
    assert is_compressed_folder(folder)
    assert CompressedCheckpoint.open(folder).index_path == folder / DIFFUSERS_INDEX
    assert torch.equal(_logits(folder), logits)
    dfloat.verify_checkpoint(folder)
    config = json.loads((folder / "config.json").read_text())
    del config["dfloat"]
    (folder / "config.json").write_text(json.dumps(config))
    assert not is_compressed_folder(folder)


@pytest.mark.parametrize("where", ["../elsewhere/outside.safetensors", "ABSOLUTE"])
def test_index_entries_outside_the_folder_are_refused(model, where):
    """The file outside is a valid shard, so only the path check can refuse it."""
    root, _ = model
    folder = _copy(root, "relative" if where.startswith("..") else "absolute")  # no "outside" in the path
    index = json.loads((folder / INDEX_NAME).read_text())
    shard = index["weight_map"][next(iter(index["weight_map"]))]
    outside = root / "elsewhere" / "outside.safetensors"
    outside.parent.mkdir(exist_ok=True)
    shutil.copy(folder / shard, outside)
    name = str(outside) if where == "ABSOLUTE" else where
    index["weight_map"] = {k: (name if v == shard else v) for k, v in index["weight_map"].items()}
    (folder / INDEX_NAME).write_text(json.dumps(index))
    for read in (
        lambda: dfloat.load_compressed(folder, device="cpu"),
        lambda: dfloat.verify_checkpoint(folder),
        lambda: plan_checkpoint(folder),
        lambda: describe_unit_layout(folder),
        lambda: list(CompressedCheckpoint.open(folder).iter_shards()),
        lambda: dfloat.decompress_model(folder, root / "never"),
    ):
        with pytest.raises(ModelSourceError, match="outside .*; refusing to read files outside"):
            read()
    from transformers import AutoModelForCausalLM

    # refused before transformers loads any weight
    with pytest.raises(ModelSourceError, match="shard files outside the checkpoint folder"):
        AutoModelForCausalLM.from_pretrained(folder)
