"""The `dfloat` command, through click's CliRunner and as the installed program in a real subprocess."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from dfloat.cli.main import main
from dfloat.testing import save_random_model


def make_model(folder, dtype=torch.bfloat16, **over):
    return save_random_model(folder, dtype=dtype, **over)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture(scope="module")
def compressed(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-out") / "tiny-dfloat"
    result = CliRunner().invoke(main, ["compress", str(model_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def dfloat_cmd(*args, env=None, timeout=300):
    exe = shutil.which("dfloat")
    assert exe, "the dfloat command is not installed"
    return subprocess.run(
        [exe, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_version_and_help():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and "dfloat, version" in r.output
    r = CliRunner().invoke(main, ["--help"])
    assert all(c in r.output for c in ("compress", "generate", "verify", "inspect", "bench"))


def test_compress_writes_a_folder_and_refuses_a_missing_source(compressed):
    assert (compressed / "dfloat.safetensors.index.json").is_file()
    r = CliRunner().invoke(main, ["compress", str(compressed.parent / "x"), "-o", str(compressed)])
    assert r.exit_code == 1


def test_compress_summary_text(model_dir, tmp_path):
    r = CliRunner().invoke(main, ["compress", str(model_dir), "-o", str(tmp_path / "o"), "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "% of BF16" in r.output and "bits/weight" in r.output and "verified  yes" in r.output


def test_verify_ok_and_against(compressed, model_dir):
    r = CliRunner().invoke(main, ["verify", str(compressed), "--against", str(model_dir)])
    assert r.exit_code == 0 and r.output.startswith("OK")


def test_inspect_table_and_json(compressed):
    r = CliRunner().invoke(main, ["inspect", str(compressed)])
    assert r.exit_code == 0 and "model.layers.0" in r.output and "total:" in r.output
    doc = json.loads(CliRunner().invoke(main, ["inspect", str(compressed), "--json"]).output)
    blocks = [u for u in doc["units"] if u["unit"] == "model.layers.0"]
    assert blocks and blocks[0]["bound_bits_per_weight"] <= blocks[0]["bits_per_weight"] + 0.5
    assert doc["total"]["weights"] == sum(u["weights"] for u in doc["units"])


def test_bench_cpu(compressed):
    r = CliRunner().invoke(main, ["bench", str(compressed), "--json", "--repeats", "1"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["decode"]
    assert rows[0]["device"] == "cpu" and rows[0]["backend"] == "cpu" and rows[0]["G_weights_per_s"] > 0


def test_corrupted_file_is_named_with_exit_1(compressed, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(compressed, bad)
    shard = next(bad.glob("dfloat-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x5A
    shard.write_bytes(bytes(data))
    r = CliRunner().invoke(main, ["verify", str(bad)])
    assert r.exit_code == 1 and "FAILED" in r.output and shard.name in r.output


@pytest.mark.parametrize("case", ["missing", "not_a_model", "hub_offline", "fp32", "exists"])
def test_user_errors_are_one_line(case, model_dir, compressed, tmp_path, monkeypatch):
    args = {
        "missing": ["compress", str(tmp_path / "nope")],
        "not_a_model": ["compress", str(tmp_path)],
        "hub_offline": ["compress", "no-such-owner/no-such-model", "-o", str(tmp_path / "o")],
        "fp32": ["compress", str(make_model(tmp_path / "fp32", torch.float32)), "-o", str(tmp_path / "o")],
        "exists": ["compress", str(model_dir), "-o", str(compressed)],
    }[case]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("dfloat: error: ") and "Traceback" not in r.output
    expect = {
        "missing": "no such folder",
        "not_a_model": "no config.json",
        "hub_offline": "HF_HUB_OFFLINE",
        "fp32": "not BF16",
        "exists": "already exists",
    }[case]
    assert expect in r.output


def test_debug_shows_the_traceback(tmp_path):
    r = CliRunner().invoke(main, ["--debug", "compress", str(tmp_path / "nope")])
    assert r.exit_code != 0 and r.exception is not None


# ---- the installed program, in real processes -------------------------------------------------------------


@pytest.mark.parametrize("sub", ["compress", "generate", "verify", "inspect", "bench"])
def test_installed_command_help(sub):
    r = dfloat_cmd(sub, "--help")
    assert r.returncode == 0 and "Usage: dfloat " + sub in r.stdout


def test_installed_command_runs_verify_inspect_bench(compressed):
    assert dfloat_cmd("verify", compressed).returncode == 0
    assert "total:" in dfloat_cmd("inspect", compressed).stdout
    assert dfloat_cmd("bench", compressed, "--repeats", "1").returncode == 0


@pytest.mark.parametrize("case", ["missing", "not_a_model", "hub_offline", "fp32", "exists", "corrupt"])
def test_installed_command_errors(case, model_dir, compressed, tmp_path):
    if case == "corrupt":
        bad = tmp_path / "bad"
        shutil.copytree(compressed, bad)
        shard = next(bad.glob("dfloat-*.safetensors"))
        shard.write_bytes(shard.read_bytes()[:-300])
        r = dfloat_cmd("verify", bad)
        assert r.returncode == 1 and shard.name in r.stderr and "Traceback" not in r.stderr
        return
    args = {
        "missing": ["compress", tmp_path / "nope"],
        "not_a_model": ["compress", tmp_path],
        "hub_offline": ["compress", "no-such-owner/no-such-model", "-o", tmp_path / "o"],
        "fp32": ["compress", make_model(tmp_path / "fp32", torch.float32), "-o", tmp_path / "o"],
        "exists": ["compress", model_dir, "-o", compressed],
    }[case]
    r = dfloat_cmd(*args, env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and r.stderr.startswith("dfloat: error: ") and "Traceback" not in r.stderr


def test_ctrl_c_during_compress_leaves_nothing_and_a_rerun_works(tmp_path):
    src = make_model(tmp_path / "src", num_hidden_layers=24, hidden_size=256, intermediate_size=768)
    out = tmp_path / "out"
    exe = shutil.which("dfloat")
    proc = subprocess.Popen(
        [exe, "compress", str(src), "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.partial-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("compression finished before the interrupt arrived")
    assert proc.returncode == 130 and "interrupted" in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    assert dfloat_cmd("compress", src, "-o", out).returncode == 0 and (out / "config.json").is_file()


def test_generate_on_the_bundled_model():
    r = CliRunner().invoke(
        main, ["generate", "--prompt", "Once upon a time", "--max-new-tokens", "8", "--seed", "0", "--stats"]
    )
    assert r.exit_code == 0, r.output
    assert r.output.startswith("Once upon a time") and len(r.output.strip()) > len("Once upon a time")
    assert "tok/s" in r.output


def test_installed_generate_on_the_bundled_model():
    r = dfloat_cmd("generate", "--prompt", "Once upon a time", "--max-new-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time") and len(r.stdout.split()) > 4


def test_generate_errors(tmp_path):
    r = dfloat_cmd("generate", tmp_path / "nope", "--prompt", "hi")
    assert r.returncode == 1 and "no such folder" in r.stderr


if sys.platform == "win32":  # pragma: no cover
    pytest.skip("signals differ on Windows", allow_module_level=True)


def test_push_to_hub_without_network_fails_after_the_local_result(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "pushed"
    r = CliRunner().invoke(
        main, ["compress", str(model_dir), "-o", str(out), "--push-to-hub", "me/tiny-dfloat"]
    )
    assert r.exit_code == 1 and "could not push to me/tiny-dfloat" in r.output
    assert f"complete in {out}" in r.output and (out / "dfloat.safetensors.index.json").is_file()


def test_chat_needs_a_chat_template():
    r = CliRunner().invoke(main, ["generate", "--prompt", "hi", "--chat", "--max-new-tokens", "2"])
    assert r.exit_code == 1 and "dfloat: error: this model's tokenizer has no chat template" in r.output


def test_several_prompts_generate_as_one_batch():
    """Repeated -p: every prompt is completed (the same text `dfloat.generate` gives for the batch)."""
    from transformers import AutoTokenizer

    import dfloat
    from dfloat.demo import demo_model_path

    prompts = ["Once upon a time", "Mr. Darcy said"]
    args = [
        "generate",
        "-p",
        prompts[0],
        "-p",
        prompts[1],
        "-n",
        "6",
        "--temperature",
        "0",
        "--device",
        "cpu",
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    model = dfloat.load_compressed(demo_model_path(), device="cpu")
    want = dfloat.generate(model, AutoTokenizer.from_pretrained(demo_model_path()), prompts, max_new_tokens=6)
    expected = "".join(f"--- {i + 1}/2\n{p}{t}\n" for i, (p, t) in enumerate(zip(prompts, want.texts)))
    assert r.stdout == expected


def test_help_describes_every_option():
    for sub, words in (
        ("generate", ["Tokens to generate for each prompt", "add up to this", "several prompts"]),
        ("bench", ["the median is reported", "on a CUDA GPU with MODEL given"]),
    ):
        text = " ".join(CliRunner().invoke(main, [sub, "--help"]).output.split())
        assert all(w in text for w in words), (sub, text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the note is for machines without a GPU")
def test_bench_on_a_cpu_says_it_measures_decoding_only(compressed):
    r = CliRunner().invoke(main, ["bench", str(compressed), "--repeats", "1"])
    assert r.exit_code == 0 and "decoding only" in r.output and "CUDA GPU" in r.output
    doc = json.loads(CliRunner().invoke(main, ["bench", str(compressed), "--json", "--repeats", "1"]).output)
    assert doc["note"].startswith("decoding only") and "generation" not in doc


def test_default_output_folder_is_named_after_the_model(tmp_path, monkeypatch):
    from dfloat.cli.compress import default_out

    monkeypatch.chdir(tmp_path)
    (tmp_path / "llama-bf16").mkdir()
    assert default_out("llama-bf16/").name == "llama-bf16-dfloat"
    monkeypatch.chdir(tmp_path / "llama-bf16")
    assert default_out(".").name == "llama-bf16-dfloat"  # not "-dfloat" inside the source
    assert default_out("meta-llama/Llama-3.1-8B").name == "Llama-3.1-8B-dfloat"


def test_installed_compress_when_the_disk_fills_is_one_line_and_leaves_nothing(tmp_path):
    """A real write failure inside safetensors' writer: the process may write files of at most 512 KB
    (RLIMIT_FSIZE; the shard is several MB, numba's cache files are smaller), so its write fails with EFBIG as
    it would with ENOSPC on a full disk."""
    resource = pytest.importorskip("resource")
    src = make_model(tmp_path / "src", vocab_size=1024, hidden_size=256, intermediate_size=768)

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # report EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 << 10, 512 << 10))

    out = tmp_path / "out"
    r = subprocess.run(
        [shutil.which("dfloat"), "compress", str(src), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_files,
    )
    errors = [line for line in r.stderr.splitlines() if line.startswith("dfloat: error:")]
    assert r.returncode == 1 and len(errors) == 1, r.stderr
    assert "cannot be written: File too large" in errors[0] and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_installed_generate_refuses_a_prompt_that_is_not_utf8():
    r = subprocess.run(
        [shutil.which("dfloat"), "generate", "-p", b"caf\xe9 au lait"], capture_output=True, timeout=300
    )
    err = r.stderr.decode()
    assert r.returncode == 1 and "Traceback" not in err, err
    assert err.startswith(
        "dfloat: error: Invalid value for '--prompt': the prompt is not UTF-8 text (byte 0xe9"
    )
