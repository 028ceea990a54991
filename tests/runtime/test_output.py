"""Nothing that was on disk is lost (runtime/output.py): a folder that appears at OUT during a run, or a
concurrent run into the same OUT, is never replaced without overwrite; OUT may not be, hold or sit inside the
source; killed runs' work folders are cleaned up, live ones are not; Ctrl-C while verifying stops the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import dfloat
from dfloat.errors import ModelSourceError, OutputExistsError
from dfloat.runtime import output
from dfloat.testing import save_random_model


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("out-src") / "src")


@pytest.fixture(params=["renameat2", "plain rename"])
def rename_kind(request, monkeypatch):
    """Every test runs with Linux's renameat2 and with the fallback for systems without it."""
    if request.param == "plain rename":
        monkeypatch.setattr(output, "_renameat2", lambda src, dst, flags: False)
    elif not output._renameat2.__module__ or sys.platform != "linux":
        pytest.skip("renameat2 is Linux-only")
    return request.param


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def appear_at(out, at_unit=1):
    """A progress callback that creates a folder holding a file at ``out`` while the run is writing."""

    def progress(unit, done, total, weights):
        if done == at_unit:
            out.mkdir()
            (out / "mine.txt").write_text("precious")

    return progress


@pytest.mark.parametrize("phase", ["compress", "verify"])
def test_a_folder_created_at_out_during_the_run_is_kept(src, tmp_path, rename_kind, phase):
    out = tmp_path / "out"
    hook = {"progress" if phase == "compress" else "verify_progress": appear_at(out)}
    with pytest.raises(OutputExistsError, match="appeared while this run was writing"):
        dfloat.compress_model(src, out, **hook)
    assert (
        sorted(p.name for p in out.iterdir()) == ["mine.txt"] and (out / "mine.txt").read_text() == "precious"
    )
    assert leftovers(tmp_path) == []


def test_a_file_or_an_empty_folder_created_at_out_is_refused_too(src, tmp_path, rename_kind):
    out = tmp_path / "out"

    def a_file(unit, done, total, weights):
        if done == 1:
            out.write_text("precious")

    with pytest.raises(OutputExistsError):
        dfloat.compress_model(src, out, progress=a_file)
    assert out.read_text() == "precious"
    out.unlink()
    if rename_kind == "renameat2":  # a plain rename(2) replaces an empty folder: nothing is lost either way
        with pytest.raises(OutputExistsError):
            dfloat.compress_model(src, out, progress=lambda u, d, t, w: d == 1 and out.mkdir())
        assert out.is_dir() and not any(out.iterdir())
    assert leftovers(tmp_path) == []


def test_overwrite_swaps_the_new_folder_in(src, tmp_path, rename_kind):
    out = tmp_path / "out"
    dfloat.compress_model(src, out, overwrite=True, progress=appear_at(out))
    assert (out / "config.json").is_file() and not (out / "mine.txt").exists()
    out.rename(tmp_path / "first")
    out.mkdir()
    (out / "old.txt").write_text("old")
    dfloat.compress_model(src, out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "old.txt").exists()
    assert leftovers(tmp_path) == []


def test_a_concurrent_run_into_the_same_out_is_never_deleted(src, tmp_path, rename_kind):
    """Run B starts and finishes while run A is writing: B's result stays, A fails at its rename; B's start
    (cleaning stale work folders) leaves A's live work folder alone."""
    out = tmp_path / "out"
    seen = {}

    def run_b(unit, done, total, weights):
        if done == 1:
            seen["a"] = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
            dfloat.compress_model(src, out, unit="matrix")
            seen["after b"] = [p for p in seen["a"] if p.exists()]

    with pytest.raises(OutputExistsError, match="appeared"):
        dfloat.compress_model(src, out, progress=run_b)
    assert len(seen["a"]) == 1 and seen["after b"] == seen["a"]
    assert dfloat.load_compressed(out, device="cpu").config.dfloat["units"] > 3  # B's result (matrix units)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("relation", ["is", "holds", "inside"])
def test_out_that_is_holds_or_sits_inside_the_source_is_refused(src, tmp_path, relation):
    out = {"is": src, "holds": src.parent, "inside": src / "compressed"}[relation]
    says = {"is": "is", "holds": "holds", "inside": "is inside"}[relation]
    before = sorted(p.name for p in src.iterdir())
    for overwrite in (False, True):
        with pytest.raises(ModelSourceError, match=f"output folder {says}"):
            dfloat.compress_model(src, out, overwrite=overwrite)
    assert sorted(p.name for p in src.iterdir()) == before
    compressed = tmp_path / "c"
    dfloat.compress_model(src, compressed)
    target = {"is": compressed, "holds": tmp_path, "inside": compressed / "bf16"}[relation]
    with pytest.raises(ModelSourceError, match=f"output folder {says}"):
        dfloat.decompress_model(compressed, target, overwrite=True)
    assert (compressed / "config.json").is_file()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_work_folders_are_cleaned_and_live_ones_kept(src, tmp_path):
    out = tmp_path / "out"
    prefix, host = output.partial_prefix(out), output._host_tag()
    old = time.time() - output.STALE_AFTER_S - 60
    folders = {
        "dead run": tmp_path / f"{prefix}{host}-{_dead_pid()}-abc",
        "live run": tmp_path / f"{prefix}{host}-{os.getpid()}-abc",
        "live run, other host, fresh": tmp_path / f"{prefix}0badbeef-{os.getpid()}-abc",
        "other host, old": tmp_path / f"{prefix}0badbeef-{os.getpid()}-def",
        "older dfloat, old": tmp_path / f"{prefix}k2j4h1",
        "older dfloat, fresh": tmp_path / f"{prefix}x9a8b7",
        "another output's": tmp_path / f".other.partial-{host}-{_dead_pid()}-abc",
    }
    for name, folder in folders.items():
        folder.mkdir()
        (folder / "part.safetensors").write_text(name)
        if "old" in name.split(", ")[-1]:
            os.utime(folder / "part.safetensors", (old, old))
            os.utime(folder, (old, old))
    dfloat.compress_model(src, out)
    assert (out / "config.json").is_file()
    kept = {name for name, folder in folders.items() if folder.exists()}
    assert kept == {"live run", "live run, other host, fresh", "older dfloat, fresh", "another output's"}


def test_ctrl_c_while_verifying_stops_and_leaves_nothing(src, tmp_path, monkeypatch):
    """The CLI defers Ctrl-C to the next unit boundary, in the verify phase as in the coding phase."""
    import dfloat.codec
    from dfloat.cli.main import main

    real = dfloat.codec.decompress_tensor
    calls = []

    def decode_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # lands in the CLI's handler, as a real Ctrl-C would
        return real(*args, **kwargs)

    monkeypatch.setattr(dfloat.codec, "decompress_tensor", decode_then_ctrl_c)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compress", str(src), "-o", str(out)])
    assert r.exit_code == 130, r.output
    assert "interrupted" in r.output and len(calls) == 2  # stopped right after the unit being checked
    assert not out.exists() and leftovers(tmp_path) == []


def test_keyboard_interrupt_from_verify_progress_leaves_nothing(src, tmp_path):
    def stop(unit, done, total, weights):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dfloat.compress_model(src, tmp_path / "out", verify_progress=stop)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("file", ["dfloat.safetensors.index.json", "config.json", "README.md"])
def test_disk_full_outside_a_shard_names_the_output(src, tmp_path, monkeypatch, file):
    """The index, config and model card are written with Path.write_text, whose OSError on a full disk names no
    file ("[Errno 28] No space left on device"): the error names the output, and nothing is left behind."""
    import errno
    from pathlib import Path

    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == file:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "out"
    with pytest.raises(dfloat.OutputWriteError, match=f"^{out}: cannot be written: No space left on device$"):
        dfloat.compress_model(src, out)
    assert not out.exists() and leftovers(tmp_path) == []


def test_overwrite_race_keeps_both_and_says_where(src, tmp_path, monkeypatch):
    """Without renameat2, --overwrite moves the old folder aside first; a folder created at OUT right then is
    kept, the old one too, and the message names where the old one is (this run's work folder is deleted)."""
    monkeypatch.setattr(output, "_renameat2", lambda src, dst, flags: False)
    out = tmp_path / "out"
    dfloat.compress_model(src, out)
    real = os.rename

    def rename_then_race(a, b):
        real(a, b)
        if a == out:  # the old folder just went aside: another program creates OUT
            out.mkdir()
            (out / "mine.txt").write_text("precious")

    monkeypatch.setattr(output.os, "rename", rename_then_race)
    with pytest.raises(OutputExistsError, match="both are kept") as e:
        dfloat.compress_model(src, out, overwrite=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
    assert len(aside) == 1 and str(aside[0]) in str(e.value) and (aside[0] / "config.json").is_file()
    assert (out / "mine.txt").read_text() == "precious"
    assert [p for p in leftovers(tmp_path) if ".partial-" in p] == []
