"""benchmarks/gpu_check.sh end to end without a GPU (GPU_CHECK_DRY_RUN=1: benchmarks/gpu_check_dry.py stands in for
python and compute-sanitizer, so every step's real command lines are checked and nothing runs on a GPU):

- every step is reached and reported, the summary JSON and the one archive are all that is left under $OUT;
- a failing step is FAILED, a skipped one SKIPPED (named in SKIP_STEPS, out of budget, or its tool missing), and
  the exit status says so;
- a step that hangs, ignoring SIGTERM with a child that holds its output open, ends as TIMEOUT and leaves nothing
  running.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils timeout"
)


def default_steps() -> list[str]:
    text = SCRIPT.read_text()
    listed = re.search(r'STEPS="\$\{STEPS:-([^}]*)\}"', text).group(1).split()
    names = [s.split(":")[0] for s in listed]
    defined = re.findall(r"^step_(\w+)\(\)", text, re.M)
    assert sorted(names) == sorted(defined), "a step is defined but not run, or run but not defined"
    return names


def run_check(tmp_path, timeout=600, **env) -> tuple[subprocess.CompletedProcess, dict, Path]:
    out = tmp_path / "out"
    full = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(tmp_path), **env}
    res = subprocess.run(
        ["bash", str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        env=full,
        stdin=subprocess.DEVNULL,
    )
    summary_path = out / "gpu_check_summary.json"
    assert summary_path.is_file(), res.stdout[-3000:] + res.stderr[-3000:]
    return res, json.loads(summary_path.read_text()), out


def statuses(summary: dict) -> dict[str, str]:
    return {s["step"]: s["status"] for s in summary["steps"]}


@pytest.mark.slow
def test_dry_run_reaches_every_step_and_reports_failed_and_skipped(tmp_path):
    res, summary, out = run_check(
        tmp_path, GPU_CHECK_DRY_RUN="1", GPU_CHECK_DRY_FAIL="gemv", SKIP_STEPS="demo_stats"
    )
    names = default_steps()
    assert [s["step"] for s in summary["steps"]] == names  # every step, in the script's order
    want = {n: "ok" for n in names} | {"gemv": "FAILED", "demo_stats": "SKIPPED"}
    assert statuses(summary) == want, res.stdout[-4000:]
    assert res.returncode == 1 and summary["dry_run"]
    assert "SKIP_STEPS" in next(s["result"] for s in summary["steps"] if s["step"] == "demo_stats")
    assert all(s["result"] for s in summary["steps"]), summary["steps"]
    assert "command not found" not in res.stdout + res.stderr  # e.g. a leftover call of an undefined function
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "gpu_check_summary.json"]
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names_in = {Path(m.name).name for m in tar.getmembers()}
        gemv_log = tar.extractfile("gpu_check/gemv.log").read().decode()
    assert {"gpu_check_summary.json", "env.log", "tests.log", "gemv.log", "sanitize_case.py"} <= names_in
    # the GEMV benchmark still runs after its tests failed: both commands reached the (failing) stand-in
    assert gemv_log.count("dry run: step gemv fails") == 2, gemv_log
    for line in ("install", "tests", "gemv", "sass_proxy"):  # the summary table is the console's last word
        assert re.search(rf"^{line}\s+(ok|FAILED)", res.stdout, re.M)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def _gone(pid: int) -> bool:
    """Whether ``pid`` has ended, waiting up to 5 s for it."""
    for _ in range(50):
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _start_check(tmp_path, **env) -> subprocess.Popen:
    """gpu_check.sh started in the background, output discarded (for tests that stop it midway)."""
    base = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_DRY_RUN"}  # a dry run only where asked
    full = {**base, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env}
    return subprocess.Popen(
        ["bash", str(SCRIPT)],
        cwd=tmp_path,
        env=full,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_a_hanging_step_times_out_and_leaves_nothing_running(tmp_path):
    pids = tmp_path / "pids"
    t0 = time.monotonic()
    res, summary, _ = run_check(
        tmp_path,
        timeout=120,
        GPU_CHECK_DRY_RUN="1",
        GPU_CHECK_DRY_HANG="env",
        GPU_CHECK_DRY_PIDS=str(pids),
        STEPS="env:4 install:30",
        MIN_STEP_S="1",
        KILL_AFTER_S="2",
    )
    assert time.monotonic() - t0 < 60
    assert statuses(summary) == {"env": "TIMEOUT", "install": "ok"}, res.stdout[-3000:]
    assert "timed out after 4 s" in summary["steps"][0]["result"] and res.returncode == 1
    listed = [int(p) for p in pids.read_text().split()]
    assert len(listed) == 2
    for pid in listed:
        assert _gone(pid), f"process {pid} outlived its step"


def test_out_of_budget_steps_are_skipped_visibly(tmp_path):
    res, summary, out = run_check(tmp_path, GPU_CHECK_DRY_RUN="1", BUDGET_S="25", STEPS="env:60 tests:60")
    assert statuses(summary) == {"env": "SKIPPED", "tests": "SKIPPED"} and res.returncode == 2
    assert all("budget" in s["result"] for s in summary["steps"])
    assert (out / "gpu_check.tar.gz").is_file()


@pytest.mark.skipif(shutil.which("compute-sanitizer") is not None, reason="compute-sanitizer is installed")
def test_a_missing_sanitizer_is_skipped_not_passed(tmp_path):
    res, summary, _ = run_check(tmp_path, STEPS="memcheck:60 racecheck:60 fuzz:60")
    assert statuses(summary) == {"memcheck": "SKIPPED", "racecheck": "SKIPPED", "fuzz": "SKIPPED"}
    assert all("compute-sanitizer not found" in s["result"] for s in summary["steps"]) and res.returncode == 2


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_the_vllm_step_is_skipped_without_vllm(tmp_path):
    res, summary, _ = run_check(tmp_path, STEPS="vllm:60")
    assert statuses(summary) == {"vllm": "SKIPPED"} and res.returncode == 2
    assert summary["steps"][0]["result"] == "vLLM not installed"


def test_gpu_tests_that_all_skip_are_skipped_not_passed(tmp_path):
    # No dry run: the real pytest steps on a machine without a GPU skip every test they select; that is no pass
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU tests run")
    res, summary, _ = run_check(tmp_path, STEPS="tests:150 memory:60")
    assert statuses(summary) == {"tests": "SKIPPED", "memory": "SKIPPED"}, res.stdout[-3000:]
    assert (
        all(s["result"].startswith("every test skipped: ") for s in summary["steps"]) and res.returncode == 2
    )


def test_without_python_set_it_runs_python3(tmp_path):
    # The GPU image's torch is under `python3`; a `python` there may be missing or another interpreter. Here
    # `python` is a stand-in that fails loudly: the check must not use it.
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "python").write_text('#!/usr/bin/env bash\necho "wrong interpreter: python" >&2\nexit 97\n')
    (tools / "python").chmod(0o755)
    (tools / "python3").write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" "$@"\n')
    (tools / "python3").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env.update(
        PATH=f"{tools}{os.pathsep}{env['PATH']}",
        OUT=str(tmp_path / "out"),
        GPU_CHECK_DRY_RUN="1",
        STEPS="install:30",
    )
    res = subprocess.run(
        ["bash", str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    summary = json.loads((tmp_path / "out" / "gpu_check_summary.json").read_text())
    assert statuses(summary) == {"install": "ok"}, res.stdout[-3000:] + res.stderr[-3000:]
    assert "wrong interpreter" not in res.stdout + res.stderr


FAKE_SANITIZER = """#!/usr/bin/env bash
# compute-sanitizer that never finishes and ignores SIGTERM; scripts/fuzz.py runs it in a process group of its own
echo $$ >>"$FAKE_SANITIZER_PIDS"
trap '' TERM
exec sleep 600
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_stopping_the_check_in_the_fuzz_step_stops_the_sanitizer(tmp_path):
    # The real fuzz step (no dry run) under a stand-in compute-sanitizer: scripts/fuzz.py runs each child in a
    # process group of its own, out of the step's reach; stopping the check must give fuzz.py the SIGTERM on which
    # it kills that group (a bare SIGKILL of the step left the sanitizer running on the GPU).
    tools, pids = tmp_path / "tools", tmp_path / "sanitizer_pids"
    tools.mkdir()
    fake = tools / "compute-sanitizer"
    fake.write_text(FAKE_SANITIZER)
    fake.chmod(0o755)
    proc = _start_check(
        tmp_path,
        PATH=f"{tools}{os.pathsep}{os.environ['PATH']}",
        FAKE_SANITIZER_PIDS=str(pids),
        STEPS="fuzz:120",
        MIN_STEP_S="1",
    )
    listed: list[int] = []
    try:
        for _ in range(600):
            if pids.is_file() and pids.read_text().split():
                break
            time.sleep(0.1)
        listed = [int(p) for p in pids.read_text().split()]
        proc.terminate()
        proc.wait(timeout=30)
        for pid in listed:
            assert _gone(pid), f"compute-sanitizer {pid} outlived the check"
    finally:
        proc.kill()
        for pid in listed:  # a failed run must not leave the stand-in behind
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_stopping_the_check_stops_the_running_step(tmp_path):
    # the device tool's own time limit sends SIGTERM to the script: the running step goes with it
    pids = tmp_path / "pids"
    proc = _start_check(
        tmp_path,
        GPU_CHECK_DRY_RUN="1",
        GPU_CHECK_DRY_HANG="env",
        GPU_CHECK_DRY_PIDS=str(pids),
        STEPS="env:120",
        MIN_STEP_S="1",
    )
    try:
        for _ in range(600):
            if pids.is_file() and len(pids.read_text().split()) == 2:
                break
            time.sleep(0.1)
        proc.terminate()
        proc.wait(timeout=30)
    finally:
        proc.kill()
    for pid in [int(p) for p in pids.read_text().split()]:
        assert _gone(pid), f"process {pid} outlived the check"
