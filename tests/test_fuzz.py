"""The mutation fuzzer (scripts/fuzz.py) in CI: every damaged dfloat unit or file gives a named DFloatError or the
exact weights; official units and unchecked ones never raise anything else, write outside out, or crash.

A fixed seed and a bounded number of cases (about a minute on 2 cores); ``DFLOAT_FUZZ_CASES=20000`` runs longer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FUZZ = ROOT / "scripts" / "fuzz.py"


def run_fuzzer(tmp_path, *args, env=None) -> dict:
    out = tmp_path / "fuzz.json"
    res = subprocess.run(
        [sys.executable, str(FUZZ), "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert out.is_file(), res.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert res.returncode == 0 and summary["n_failures"] == 0, res.stdout[-4000:] + res.stderr[-2000:]
    return summary


def test_fuzzer_cpu_decoder_files_and_models(tmp_path):
    summary = run_fuzzer(tmp_path)
    counts = summary["counts"]
    assert summary["cases"] == int(os.environ.get("DFLOAT_FUZZ_CASES", 1000))
    assert set(counts) == {"dfloat", "official", "unchecked", "file", "model"}
    for kind in ("dfloat", "file", "model"):  # checksummed: an error or the exact weights, nothing else
        assert set(counts[kind]) <= {"error", "exact"}, counts[kind]
        assert counts[kind].get("error", 0) > 0
    for kind in ("official", "unchecked"):  # nothing to check against: no other exception, no OOB, no crash
        assert set(counts[kind]) <= {"error", "exact", "undetected"}, counts[kind]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_fuzzer_triton_decoder_under_the_interpreter(tmp_path):
    summary = run_fuzzer(
        tmp_path, "--backend", "triton", "--cases", "16", "--no-files", env={"TRITON_INTERPRET": "1"}
    )
    assert summary["cases"] == 16 and "official" in summary["counts"]


HANGING_WRAP = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # like a tool that outlives a polite stop
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
open(sys.argv[1], "w").write(f"{os.getpid()} {child.pid}")
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie waiting for its reaper has stopped


def _assert_all_gone(pids: Path) -> None:
    """Every process whose pid the stand-in wrote to ``pids`` has ended (waiting up to 5 s for each)."""
    for pid in map(int, pids.read_text().split()):
        for _ in range(50):
            if not _alive(pid):
                break
            time.sleep(0.1)
        assert not _alive(pid), f"process {pid} outlived the fuzzer"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_time_limit_kills_the_wrapped_child_and_all_it_started(tmp_path):
    # compute-sanitizer under `timeout` used to keep running after fuzz.py was gone: the wrapped child, its tool
    # and the tool's own children now share a process group that is killed whole at the time limit
    wrap, pids, out = tmp_path / "hang.py", tmp_path / "pids", tmp_path / "fuzz.json"
    wrap.write_text(HANGING_WRAP)
    t0 = time.monotonic()
    res = subprocess.run(
        [
            sys.executable,
            str(FUZZ),
            "--cases",
            "5",
            "--no-files",
            "--time-limit",
            "6",
            "--json",
            str(out),
            "--wrap",
            f"{sys.executable} {wrap} {pids}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert time.monotonic() - t0 < 60, "the time limit did not stop the run"
    summary = json.loads(out.read_text())
    assert summary["stopped_at_time_limit"] and summary["cases"] == 0 and res.returncode == 0, res.stderr[
        -2000:
    ]
    assert "time limit" in res.stdout
    _assert_all_gone(pids)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_terminating_the_fuzzer_kills_its_running_child(tmp_path):
    wrap, pids = tmp_path / "hang.py", tmp_path / "pids"
    wrap.write_text(HANGING_WRAP)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(FUZZ),
            "--cases",
            "5",
            "--no-files",
            "--json",
            str(tmp_path / "f.json"),
            "--wrap",
            f"{sys.executable} {wrap} {pids}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        for _ in range(300):
            if pids.is_file() and len(pids.read_text().split()) == 2:
                break
            time.sleep(0.1)
        proc.terminate()  # what `timeout` sends first
        proc.wait(timeout=60)
    finally:
        proc.kill()
    _assert_all_gone(pids)


@pytest.mark.skipif(not hasattr(os, "getsid"), reason="POSIX sessions")
def test_a_child_has_its_own_group_in_the_callers_session():
    # Its own process group: killed whole without killing the fuzzer. The caller's session, not a new one: whatever
    # ends a command's leftovers by session (a terminal closing, a job runner, a GPU lease) still reaches a
    # compute-sanitizer that a SIGKILLed fuzzer could not clean up.
    spec = importlib.util.spec_from_file_location("dfloat_fuzz_script", FUZZ)
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    code, out, err, timed_out = fuzz.run_child(
        [sys.executable, "-c", "import os; print(os.getpid(), os.getpgid(0), os.getsid(0))"], 60
    )
    assert code == 0 and not timed_out, err
    pid, group, session = map(int, out.split())
    assert group == pid != os.getpgid(0)
    assert session == os.getsid(0)
