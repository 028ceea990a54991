"""dfloat reads exactly the weights transformers reads from a folder, refuses ambiguous ones, and never follows
an index outside the folder (runtime/source.py)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dfloat
from dfloat.errors import ChecksumError, ModelSourceError
from dfloat.runtime import source as src
from dfloat.testing import save_random_model


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """A tiny Llama saved as one model.safetensors."""
    return save_random_model(tmp_path_factory.mktemp("single") / "m", trained_scale=True)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Another model (other weights) in several shards with model.safetensors.index.json."""
    folder = tmp_path_factory.mktemp("sharded") / "m"
    save_random_model(folder, trained_scale=True, seed=1, max_shard_size="20KB")
    assert (folder / src.WEIGHT_INDEX).is_file() and len(list(folder.glob("*.safetensors"))) > 2
    return folder


def _copy(folder, to):
    shutil.copytree(folder, to)
    return to


def _bits_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a
    )


def _loaded_by_transformers(folder) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).state_dict()


def test_stray_file_with_a_duplicate_name_is_ignored_as_transformers_does(single, tmp_path, caplog):
    """The regression: a stray *.safetensors beside model.safetensors, holding one of its tensor names, was
    compressed (last file wins) and `verify --against` agreed. Now neither reads it, as transformers does not."""
    folder = _copy(single, tmp_path / "m")
    tensors = load_file(str(folder / "model.safetensors"))
    name = next(k for k, t in tensors.items() if t.ndim == 2)
    stray = {name: torch.zeros_like(tensors[name]), "extra.weight": torch.ones(4, 4)}
    save_file(stray, str(folder / "z.safetensors"))
    with caplog.at_level(logging.WARNING, logger="dfloat.runtime.source"):
        dfloat.compress_model(folder, tmp_path / "c")
    assert "ignoring z.safetensors" in caplog.text
    dfloat.verify_checkpoint(tmp_path / "c", against=folder)  # the same rule on both sides
    dfloat.decompress_model(tmp_path / "c", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert _bits_equal(back, tensors)
    state = _loaded_by_transformers(folder)
    assert torch.equal(state[name].view(torch.int16), back[name].view(torch.int16))
    # and verify --against a checkpoint that really differs still finds it
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ChecksumError, match=rf"{name}: differs from the original"):
        dfloat.verify_checkpoint(tmp_path / "c", against=folder)


def test_a_name_in_two_of_the_files_read_is_refused_naming_both(sharded, tmp_path):
    folder = _copy(sharded, tmp_path / "m")
    index = json.loads((folder / src.WEIGHT_INDEX).read_text())
    first, second = list(dict.fromkeys(index["weight_map"].values()))[:2]
    shard = load_file(str(folder / second))
    name = next(n for n, f in index["weight_map"].items() if f == first)
    shard[name] = load_file(str(folder / first))[name]
    save_file(shard, str(folder / second), metadata={"format": "pt"})
    with pytest.raises(ModelSourceError, match=rf"'{name}' is in both {first} and {second}"):
        dfloat.compress_model(folder, tmp_path / "out")
    with pytest.raises(ModelSourceError, match="in both"):
        dfloat.verify_checkpoint(dfloat.__path__[0] + "/demo/model", against=folder)
    assert not (tmp_path / "out").exists()
    # the official DFloat11 rule (every file of the folder) refuses duplicates the same way
    with pytest.raises(ModelSourceError, match="in both"):
        src.read_all_safetensors(folder)


def test_single_file_wins_over_an_index_as_in_transformers(single, sharded, tmp_path):
    """Both model.safetensors and an index with its shards: transformers reads model.safetensors; so does dfloat."""
    folder = _copy(sharded, tmp_path / "both")
    shutil.copy(single / "model.safetensors", folder / "model.safetensors")
    layout = src.read_weight_layout(folder)
    assert layout.files == [folder / "model.safetensors"]
    dfloat.compress_model(folder, tmp_path / "c")
    dfloat.decompress_model(tmp_path / "c", tmp_path / "back")
    got = load_file(str(tmp_path / "back" / "model.safetensors"))
    state = _loaded_by_transformers(folder)
    assert all(torch.equal(got[k].view(torch.int16), state[k].view(torch.int16)) for k in got)
    assert _bits_equal(got, load_file(str(single / "model.safetensors")))
    # diffusers' order, for its component folders: the index first
    assert src.read_weight_layout(folder, index_first=True).files[0].name.startswith("model-0000")


def test_sharded_layout_maps_every_tensor_to_its_shard(sharded):
    layout = src.read_weight_layout(sharded)
    weight_map = json.loads((sharded / src.WEIGHT_INDEX).read_text())["weight_map"]
    assert {k: p.name for k, p in layout.tensor_file.items()} == weight_map
    assert layout.files == [sharded / f for f in dict.fromkeys(weight_map.values())]


def test_index_listing_a_tensor_in_the_wrong_shard_is_refused(sharded, tmp_path):
    folder = _copy(sharded, tmp_path / "m")
    index = json.loads((folder / src.WEIGHT_INDEX).read_text())
    files = sorted(set(index["weight_map"].values()), key=list(index["weight_map"].values()).count)
    source, target = files[-1], files[0]  # from the shard with the most tensors: it stays in the index
    moved = next(n for n, f in index["weight_map"].items() if f == source)
    index["weight_map"][moved] = target
    (folder / src.WEIGHT_INDEX).write_text(json.dumps(index))
    with pytest.raises(ModelSourceError, match=rf"lists '{moved}' in {target}, but {source} holds it"):
        src.read_weight_layout(folder)


@pytest.mark.parametrize(
    "bad", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors"]
)
def test_source_index_naming_a_file_outside_the_folder_is_refused(sharded, tmp_path, bad):
    folder = _copy(sharded, tmp_path / "m")
    shutil.copy(next(folder.glob("model-*.safetensors")), tmp_path / "outside.safetensors")
    index = json.loads((folder / src.WEIGHT_INDEX).read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = bad
    (folder / src.WEIGHT_INDEX).write_text(json.dumps(index))
    with pytest.raises(ModelSourceError, match="refusing to read files outside the model folder"):
        dfloat.compress_model(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_deeply_nested_json_is_one_clear_error(single, tmp_path):
    folder = _copy(single, tmp_path / "m")
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelSourceError, match="nested too deeply"):
        dfloat.compress_model(folder, tmp_path / "out")
    (folder / "config.json").write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(ModelSourceError, match="not valid JSON"):
        dfloat.compress_model(folder, tmp_path / "out")


def test_no_weights_names_what_is_there(tmp_path):
    folder = save_random_model(tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "consolidated.safetensors")
    with pytest.raises(ModelSourceError, match=r"no model\.safetensors.*consolidated\.safetensors"):
        dfloat.compress_model(folder, tmp_path / "out")
