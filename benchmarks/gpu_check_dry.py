"""Stand-in for python and compute-sanitizer in ``GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh`` (CI has no GPU):
every step of the check is reached and its command lines are checked, nothing runs on a GPU.

    gpu_check_dry.py python ARGS...      what ``python ARGS...`` would do, dry:
        SCRIPT.py ...            the script's own argparse reads the arguments (a bad one exits 2, as for real),
                                 then it stops; a script without argparse (a generated case) is only compiled
        -m pytest ...            collects the tests (--collect-only): the files exist, import, and select
        -m dfloat.cli.main ...   the CLI parses its command line (click), then stops
        -m OTHER ...             printed, not run (pip)
        -c CODE / - (stdin)      run for real (the install probe)
    gpu_check_dry.py sanitizer [--tool T] [--error-exitcode N] CMD...    runs CMD (itself a dry python)

Faults on request, to test the check's reporting and clean-up: when the step in GPU_CHECK_STEP is named in
GPU_CHECK_DRY_FAIL it exits 1; in GPU_CHECK_DRY_HANG it hangs ignoring SIGTERM, with a child that ignores it too
and keeps the step's output pipe open (their pids go to the file GPU_CHECK_DRY_PIDS when set).
"""

from __future__ import annotations

import argparse
import os
import py_compile
import runpy
import signal
import subprocess
import sys
import time


class _Parsed(Exception):
    """Raised after a successful argparse parse: the dry run stops there."""


def _stop_after_parsing() -> None:
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)  # a bad argument exits 2 here, as in a real run
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_then_stop


def _fault() -> None:
    step = os.environ.get("GPU_CHECK_STEP", "")
    if step and step in os.environ.get("GPU_CHECK_DRY_FAIL", "").split():
        print(f"dry run: step {step} fails, as GPU_CHECK_DRY_FAIL asks")
        sys.exit(1)
    if step and step in os.environ.get("GPU_CHECK_DRY_HANG", "").split():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)",
            ]
        )
        if os.environ.get("GPU_CHECK_DRY_PIDS"):
            with open(os.environ["GPU_CHECK_DRY_PIDS"], "a") as f:
                f.write(f"{os.getpid()} {child.pid}\n")
        print(f"dry run: step {step} hangs, as GPU_CHECK_DRY_HANG asks", flush=True)
        time.sleep(3600)


def dry_python(args: list[str]) -> int:
    if args[:2] == ["-m", "pytest"]:
        return subprocess.run([sys.executable, "-m", "pytest", *args[2:], "--collect-only", "-q"]).returncode
    if args[:2] == ["-m", "dfloat.cli.main"] and len(args) > 2:  # -m dfloat.cli.main COMMAND ARGS...
        import click

        from dfloat.cli.main import main

        name, *rest = args[2:]
        parent = click.Context(main, info_name="dfloat")
        command = main.get_command(parent, name)
        if command is None:
            print(f"dry run: dfloat has no command {name!r}")
            return 2
        try:
            command.make_context(name, rest, parent=parent)
        except click.ClickException as e:
            print(f"dry run: dfloat {name}: {e.format_message()}")
            return 2
        print(f"dry run: dfloat {name}: arguments accepted")
        return 0
    if args[:1] == ["-m"]:
        print("dry run: not running python", " ".join(args))
        return 0
    if args[:1] in (["-c"], ["-"]) or not args:
        return subprocess.run([sys.executable, *args]).returncode
    script, *rest = args
    with open(script) as f:
        uses_argparse = "argparse" in f.read()
    if not uses_argparse:
        py_compile.compile(script, doraise=True)
        print(f"dry run: {script} compiles")
        return 0
    _stop_after_parsing()
    sys.argv = [script, *rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except _Parsed:
        print(f"dry run: {script}: arguments accepted")
        return 0
    print(f"dry run: {script} never parsed its arguments")
    return 1


def dry_sanitizer(args: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="compute-sanitizer (dry run)")
    ap.add_argument("--tool", default="memcheck")
    ap.add_argument("--error-exitcode", type=int, default=0)
    opts, cmd = ap.parse_known_args(args)
    if not cmd:
        ap.error("no command to run")
    return subprocess.run(cmd).returncode


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("python", "sanitizer"):
        sys.exit("usage: gpu_check_dry.py python ARGS... | sanitizer [OPTIONS] CMD...")
    _fault()
    mode, args = sys.argv[1], sys.argv[2:]
    return dry_python(args) if mode == "python" else dry_sanitizer(args)


if __name__ == "__main__":
    sys.exit(main())
