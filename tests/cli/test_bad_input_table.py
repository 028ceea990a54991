"""Every subcommand over a table of bad inputs: exactly one `dfloat: error:` line naming the problem, exit 1, and
never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import dfloat
from dfloat.cli.main import main
from dfloat.testing import save_random_model, save_tiny_bert


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A compressed tiny Llama and damaged copies of it, an encoder-only model, a folder that is no model."""

    root = tmp_path_factory.mktemp("bad-cli")
    src = save_random_model(root / "src")
    good = root / "good"
    dfloat.compress_model(src, good)
    f = {"src": src, "good": good, "missing": root / "nope", "empty": root / "empty"}
    f["empty"].mkdir()

    def copy(name, edit):
        shutil.copytree(good, root / name)
        edit(root / name)
        f[name] = root / name

    copy(
        "no_weight_map",
        lambda d: (d / "dfloat.safetensors.index.json").write_text(json.dumps({"metadata": {}})),
    )

    def fewer_layers(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["num_hidden_layers"] -= 1
        (d / "config.json").write_text(json.dumps(cfg))

    copy("fewer_layers", fewer_layers)

    def damage(d):
        shard = next(d.glob("dfloat-*.safetensors"))
        data = bytearray(shard.read_bytes())
        data[-100] ^= 0x10
        shard.write_bytes(bytes(data))

    copy("damaged", damage)
    nested = "[" * 100_000 + "]" * 100_000
    copy("nested_index", lambda d: (d / "dfloat.safetensors.index.json").write_text(nested))

    def escaping(d):
        index = json.loads((d / "dfloat.safetensors.index.json").read_text())
        shard = next(iter(index["weight_map"].values()))
        shutil.copy(
            d / shard, root / "elsewhere.safetensors"
        )  # a valid shard: only the path check refuses it
        index["weight_map"] = {k: "../elsewhere.safetensors" for k in index["weight_map"]}
        (d / "dfloat.safetensors.index.json").write_text(json.dumps(index))

    copy("escaping_index", escaping)

    def disagree(d):
        index = json.loads((d / "dfloat.safetensors.index.json").read_text())
        index["weight_map"].popitem()
        (d / "dfloat.index.json").write_text(json.dumps(index))

    copy("disagree", disagree)
    shutil.copytree(src, root / "src_escaping")  # a BF16 source whose index points outside its folder
    (root / "src_escaping" / "model.safetensors").rename(root / "src_escaping.safetensors")
    from safetensors import safe_open

    with safe_open(str(root / "src_escaping.safetensors"), framework="pt") as sf:
        tensors = {k: "../src_escaping.safetensors" for k in sf.keys()}
    (root / "src_escaping" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": tensors}))
    f["src_escaping"] = root / "src_escaping"
    shutil.copytree(src, root / "nested_config")
    (root / "nested_config" / "config.json").write_text(nested)
    f["nested_config"] = root / "nested_config"
    save_tiny_bert(root / "bert-src")
    dfloat.compress_model(root / "bert-src", root / "bert")
    f["bert"] = root / "bert"
    return f


P = ["-p", "hi", "--device", "cpu"]
TABLE = [
    # (arguments, with {folder} placeholders; what the error line must say)
    (["bogus-command"], "No such command"),
    (["compress", "{missing}"], "no such folder"),
    (["compress", "{empty}"], "no config.json"),
    (["compress", "{src}", "--workers", "0"], "'--workers'"),
    (["generate", "{good}", "-p", "hi", "--device", "gpu7"], "'gpu7' is not a device"),
    (["generate", "{good}", "-p", "hi", "--device", "cuda:0"], "no usable CUDA GPU"),
    (["generate", "{good}", "-p", "  ", "--device", "cpu"], "the prompt is empty"),
    (["generate", "{good}", *P, "--temperature", "-1"], "'--temperature'"),
    (["generate", "{good}", *P, "--top-p", "2"], "'--top-p'"),
    (["generate", "{good}", *P, "--temperature", "nan"], "'--temperature': nan is not a finite number"),
    (["generate", "{good}", *P, "--temperature", "inf"], "'--temperature': inf is not a finite number"),
    (["generate", "{good}", *P, "--top-p", "nan"], "'--top-p': nan is not a finite number"),
    (["generate", "{good}", *P, "-n", "0"], "'--max-new-tokens'"),
    (["generate", "{good}", *P], "no usable tokenizer"),
    (["generate", "{no_weight_map}", *P], "weight_map"),
    (["generate", "{fewer_layers}", *P], "the config does not match the tensors"),
    (["generate", "{damaged}", *P], "checksum"),
    (["generate", "{bert}", *P], "cannot generate text"),
    (["generate", "{missing}", *P], "nope"),
    (["verify", "{good}", "--backend", "bogus"], "'--backend'"),
    (["verify", "{missing}"], "not a dfloat checkpoint"),
    (["verify", "{no_weight_map}"], "weight_map"),
    (["inspect", "{missing}"], "nope"),
    (["inspect", "{no_weight_map}"], "weight_map"),
    (["bench", "{good}", "--repeats", "0"], "'--repeats'"),
    (["bench", "{damaged}"], "checksum"),
    (["bench", "{no_weight_map}"], "weight_map"),
    (["bench", "{missing}"], "not a dfloat checkpoint"),
    (["compress", "{nested_config}"], "nested too deeply"),
    (["compress", "{src}", "-o", "{src}/compressed"], "is inside the source folder"),
    (["compress", "{src}", "-o", "{src}", "--overwrite"], "output folder is the source folder"),
    (["decompress", "{good}", "-o", "{good}", "--overwrite"], "output folder is the source folder"),
    (["verify", "{nested_index}"], "nested too deeply"),
    (["generate", "{nested_index}", *P], "nested too deeply"),
    (["inspect", "{nested_index}"], "nested too deeply"),
    (["verify", "{escaping_index}"], "refusing to read files outside"),
    (["verify", "{good}", "--against", "{src_escaping}"], "refusing to read files outside"),
    (["compress", "{src_escaping}"], "refusing to read files outside"),
    (["generate", "{escaping_index}", *P], "refusing to read files outside"),
    (["inspect", "{escaping_index}"], "refusing to read files outside"),
    (["bench", "{escaping_index}"], "refusing to read files outside"),
    (["decompress", "{escaping_index}", "-o", "{missing}"], "refusing to read files outside"),
    (["verify", "{disagree}"], "list different shards or tensors"),
    (["generate", "{disagree}", *P], "list different shards or tensors"),
    (["generate", "{good}", "-p", "caf\udce9", "--device", "cpu"], "not UTF-8 text (byte 0xe9"),
    (["generate", "{good}", "-p", "hi", "-p", " ", "--device", "cpu"], "prompt 2 is empty"),
    (["verify", "{good}", "--backend", "cuda"], "'--backend': 'cuda' cannot decode on this machine"),
]


@pytest.mark.parametrize("args, says", TABLE, ids=[" ".join(a)[:60] for a, _ in TABLE])
def test_bad_input_is_one_error_line_and_exit_1(folders, args, says):
    if ("cuda:0" in args or "--backend" in args and "cuda" in args) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = [a.format(**{k: str(v) for k, v in folders.items()}) for a in args]
    r = CliRunner().invoke(main, argv)
    errors = [line for line in r.stderr.splitlines() if line.startswith("dfloat: error:")]
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    assert len(errors) == 1, r.stderr
    assert says in errors[0], errors[0]
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit | None), r.exception


def test_overwriting_a_file_leaves_nothing_behind(folders, tmp_path):
    target = tmp_path / "out"
    target.write_text("in the way")
    r = CliRunner().invoke(main, ["compress", str(folders["src"]), "-o", str(target), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert (target / "dfloat.safetensors.index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_compressed_files_follow_the_umask(folders):
    import os
    import stat

    from dfloat.storage import default_mode

    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folders["good"].iterdir() if p.is_file()}
    assert set(modes.values()) == {default_mode()}, (modes, oct(default_mode()), os.getpid())


@pytest.mark.parametrize("command", ["compress", "decompress"])
def test_disk_full_while_writing_a_shard_is_one_line_and_leaves_nothing(
    folders, tmp_path, monkeypatch, command
):
    """safetensors reports a full disk as SafetensorError (not OSError): the message safetensors gives for
    ENOSPC, raised from its writer."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    source = folders["src"] if command == "compress" else folders["good"]
    r = CliRunner().invoke(main, [command, str(source), "-o", str(tmp_path / "out")])
    errors = [line for line in r.stderr.splitlines() if line.startswith("dfloat: error:")]
    assert r.exit_code == 1 and len(errors) == 1, r.output
    assert "cannot be written: No space left on device (os error 28)" in errors[0], errors[0]
    assert "Traceback" not in r.output and list(tmp_path.iterdir()) == []


def test_ctrl_c_during_the_imports_is_one_line_and_exit_130():
    """The installed command's entry point (_dfloat_cli) catches Ctrl-C while torch and transformers import;
    a finder that raises KeyboardInterrupt when torch is imported stands in for the key press."""
    import subprocess
    import sys

    code = """
import sys
class CtrlC:
    def find_spec(self, name, path, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, CtrlC())
import _dfloat_cli
sys.argv = ["dfloat", "inspect", "x"]
sys.exit(_dfloat_cli.main())
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 130 and run.stderr == "dfloat: interrupted\n", run.stderr
