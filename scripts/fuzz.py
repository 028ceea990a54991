"""Mutation fuzzer: a damaged unit or file gives a named DFloatError or the exact original weights, never wrong
weights, a write outside the output, another exception or a crash.

Deterministic (fixed seed) and bounded. Each case mutates one thing: bytes or bits of one stored array, its
length, dtype or layout, or one metadata field (numel, member names/shapes/offsets, parameters, code kind, mode),
of small dfloat units, official DFloat11 units and the raw unit; or bytes of a saved file (header and data) read
through `load_compressed_tensors`; or bytes of a shard of a saved model read through `load_compressed`.

Cases run in child processes in batches (so start-up does not eat the budget, and a crash fails its case instead
of ending the run): a child that dies is restarted after the case it died on. Outputs are decoded into the middle
of a guarded buffer whose guard regions must be unchanged afterwards. Each child (with its ``--wrap`` command,
e.g. compute-sanitizer, and whatever that starts) runs in a process group of its own, which is killed whole when
``--time-limit`` runs out or this script is terminated: nothing is left running. A run cut short by the time
limit writes its summary for the cases it finished (``stopped_at_time_limit``).

What each case may end in:
  dfloat units and files (checksummed): a named DFloatError, or output bit-identical to the original;
  official DFloat11 units and units marked checked without being checked (``verify=False``): also wrong output
  (they carry nothing to compare against), but still no other exception, no write outside ``out``, no crash.

    python scripts/fuzz.py                       # the CI budget on the CPU decoder; writes benchmarks/results/fuzz_cpu.json
    python scripts/fuzz.py --cases 20000         # a longer run
    python scripts/fuzz.py --cases 20000 --time-limit 300    # as many of them as 5 minutes allow
    TRITON_INTERPRET=1 python scripts/fuzz.py --backend triton --cases 60
    compute-sanitizer --tool memcheck python scripts/fuzz.py --device cuda --backend cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SEED = 20260901
GUARD = 64
FILL = 0x5A5A
ALLOWED = {  # per case kind: outcomes that are not failures
    "dfloat": {"error", "exact"},
    "file": {"error", "exact"},
    "model": {"error", "exact"},
    "official": {"error", "exact", "undetected"},
    "unchecked": {"error", "exact", "undetected"},
}


# ---- the units under test --------------------------------------------------------------------------------------
def base_units() -> dict[str, tuple[str, object]]:
    """{name: (kind, unit or official arrays)}: small units with many blocks, a multi-member unit, a raw unit."""
    import dfloat
    from dfloat import df11
    from dfloat.testing import weights_like

    many_blocks = dfloat.compress_tensor(
        weights_like(3000, seed=1), allow_raw=False, bytes_per_window=4, windows_per_block=4
    )
    default = dfloat.compress_tensor(weights_like(6000, seed=2), allow_raw=False)
    multi = dfloat.compress_tensors(
        {"q": weights_like((40, 50), seed=3), "k": weights_like((30, 50), seed=4)},
        allow_raw=False,
        bytes_per_window=8,
        windows_per_block=16,
    )
    raw = dfloat.store_raw(torch.arange(500, dtype=torch.int32).reshape(20, 25), name="ids")
    official = df11.to_official_unit(dfloat.compress_tensor(weights_like(5000, seed=5), allow_raw=False))
    return {
        "many_blocks": ("dfloat", many_blocks),
        "default": ("dfloat", default),
        "multi": ("dfloat", multi),
        "raw": ("dfloat", raw),
        "official": ("official", official),
    }


OFFICIAL_MEMBERS = [("w", (5000,))]


def official_unit(arrays):
    from dfloat import df11

    return df11.from_official_unit(arrays, OFFICIAL_MEMBERS)


# ---- mutations -------------------------------------------------------------------------------------------------
def _bytes_of(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().copy()


def _from_bytes(b: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    size = like.element_size()
    b = np.ascontiguousarray(b[: b.size - b.size % size], np.uint8)
    if b.size == 0:
        return torch.empty(0, dtype=like.dtype)
    return torch.from_numpy(b.copy()).view(like.dtype)


def mutate_array(t: torch.Tensor, rng: np.random.Generator) -> tuple[str, torch.Tensor]:
    """One random change to a stored array: its bytes, its length, its dtype or its layout."""
    b = _bytes_of(t)
    op = rng.choice(
        [
            "flip_bit",
            "set_byte",
            "set_bytes",
            "zero_run",
            "truncate",
            "extend",
            "dtype",
            "strided",
            "shape2d",
            "swap_bytes",
        ],
        p=[0.2, 0.15, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.1],
    )
    if b.size == 0 and op not in ("extend", "dtype"):
        op = "extend"
    if op == "flip_bit":
        i = rng.integers(b.size)
        b[i] ^= np.uint8(1 << rng.integers(8))
    elif op == "set_byte":
        i = rng.integers(b.size)
        b[i] = (int(b[i]) + rng.integers(1, 256)) % 256
    elif op == "set_bytes":
        idx = rng.integers(0, b.size, rng.integers(2, 9))
        b[idx] = rng.integers(0, 256, idx.size)
    elif op == "zero_run":
        i = rng.integers(b.size)
        b[i : i + rng.integers(1, 64)] = 0
    elif op == "swap_bytes":
        i, j = rng.integers(0, b.size, 2)
        b[i], b[j] = b[j], b[i]
    elif op == "truncate":
        b = b[: rng.integers(0, b.size)]
    elif op == "extend":
        b = np.concatenate(
            [b, rng.integers(0, 256, rng.integers(1, 3 * t.element_size() + 9)).astype(np.uint8)]
        )
    elif op == "dtype":
        other = torch.int32 if t.dtype != torch.int32 else torch.uint8
        return op, t.to(other)
    elif op == "strided":
        return op, torch.repeat_interleave(t.reshape(-1), 2)[::2] if t.numel() else t
    elif op == "shape2d":
        flat = t.reshape(-1)
        return op, flat.reshape(1, -1) if flat.numel() else flat
    return op, _from_bytes(b, t)


META_FIELDS = (
    "numel",
    "members",
    "bytes_per_window",
    "windows_per_block",
    "max_code_length",
    "code_kind",
    "mode",
    "dtype",
)


def mutate_meta(ct, rng: np.random.Generator):
    """One random change to a unit's metadata fields (through `dataclasses.replace`, a new object)."""

    field = str(rng.choice(META_FIELDS))
    if field == "numel":
        return f"numel{'+-'[int(rng.integers(2))]}", replace(
            ct, numel=max(0, ct.numel + int(rng.choice([-1000, -7, -1, 1, 7, 4096]))), _cache={}
        )
    if field == "members":
        ms = list(ct.members)
        how = (
            rng.choice(["swap_names", "rename", "reshape", "offset", "drop"])
            if len(ms) > 1
            else rng.choice(["rename", "reshape", "offset"])
        )
        if how == "swap_names":
            ms[0], ms[1] = replace(ms[0], name=ms[1].name), replace(ms[1], name=ms[0].name)
        elif how == "rename":
            ms[0] = replace(ms[0], name=ms[0].name + "x")
        elif how == "reshape":
            shape = (ms[0].shape[0] + 1,) + tuple(ms[0].shape[1:]) if ms[0].shape else (2,)
            ms[0] = replace(ms[0], shape=shape)
        elif how == "offset":
            ms[-1] = replace(ms[-1], offset=ms[-1].offset + 1)
        else:
            ms = ms[:-1]
        return f"members_{how}", replace(ct, members=tuple(ms), _cache={})
    if field in ("bytes_per_window", "windows_per_block", "max_code_length"):
        value = (
            int(rng.choice([0, 1, 2, 3, 4, 8, 31, 32, 33, 512]))
            if field != "max_code_length"
            else int(rng.choice([0, 7, 16, 23, 25, 32, 33]))
        )
        return f"{field}={value}", replace(ct, **{field: value}, _cache={})
    if field == "code_kind":
        return "code_kind", replace(
            ct, code_kind="df11-lut" if ct.code_kind == "canonical" else "canonical", _cache={}
        )
    if field == "dtype":
        return "dtype", replace(
            ct, dtype=torch.float16 if ct.dtype == torch.bfloat16 else torch.bfloat16, _cache={}
        )
    return "mode", replace(ct, mode="raw" if ct.is_coded else "huffman", _cache={})


def mutate_unit(ct, rng: np.random.Generator):
    if rng.random() < 0.25:
        return mutate_meta(ct, rng)
    arrays = (
        {"raw": "raw"}
        if not ct.is_coded
        else {
            "encoded_exponent": "encoded_exponent",
            "sign_mantissa": "sign_mantissa",
            "gaps": "gaps",
            "output_positions": "output_positions",
            "code": "code",
        }
    )
    name = str(rng.choice(list(arrays)))
    op, t = mutate_array(getattr(ct, name), rng)
    return f"{name}:{op}", replace(ct, **{name: t}, _cache={})


# ---- running one case ------------------------------------------------------------------------------------------
def decode_guarded(ct, backend: str | None, device: str) -> tuple[str, torch.Tensor | None]:
    """('outside', None) if anything around the output changed; else ('ok', output bits)."""
    import dfloat

    n = max(int(ct.numel), 0) if isinstance(ct.numel, int) else 0
    dtype = ct.dtype if isinstance(ct.dtype, torch.dtype) else torch.bfloat16
    esize = torch.empty((), dtype=dtype).element_size()
    start = GUARD * 8  # bytes of guard on each side, aligned for any dtype
    raw = torch.full((n * esize + 2 * start,), FILL & 0xFF, dtype=torch.uint8, device=device)
    out = raw[start : start + n * esize].view(dtype)  # the output over the middle of the guarded buffer
    dfloat.decompress_tensor(ct, device=device, backend=backend, out=out, check=True)
    if device != "cpu":
        torch.cuda.synchronize()
    if not ((raw[:start] == FILL & 0xFF).all() and (raw[start + n * esize :] == FILL & 0xFF).all()):
        return "outside", None
    return "ok", out.detach().cpu().reshape(-1).view(torch.uint8).clone()


def classify(kind: str, ct_or_err, reference: torch.Tensor, backend, device) -> str:
    from dfloat.errors import DFloatError

    try:
        ct = ct_or_err() if callable(ct_or_err) else ct_or_err
        if (
            kind == "unchecked"
        ):  # as `load_compressed_tensors(verify=False)` gives: structure checked, sums not
            from dfloat.format import mark_trusted
            from dfloat.integrity import check_structure

            check_structure(ct)
            mark_trusted(ct)
        state, got = decode_guarded(ct, backend, device)
    except DFloatError as e:
        return f"error:{type(e).__name__}"
    except Exception as e:  # noqa: BLE001 - any other exception is what the fuzzer looks for
        return f"other:{type(e).__name__}: {str(e)[:160]}"
    if state == "outside":
        return "outside"
    return "exact" if torch.equal(got, reference) else "undetected"


def unit_reference(ct) -> torch.Tensor:
    import dfloat

    return dfloat.decompress_tensor(ct, backend="cpu").detach().reshape(-1).view(torch.uint8).clone()


def file_case(rng, units, tmp: Path, i: int):
    """Save the dfloat units to a file, damage its bytes (header or data) and read it back."""
    import dfloat

    path = tmp / f"case{i}.safetensors"
    dfloat.save_compressed_tensors(
        {k: ct for k, (kind, ct) in units.items() if kind == "dfloat"},
        path,
        extra_tensors={"norm": torch.arange(64, dtype=torch.bfloat16)},
    )
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    where = rng.choice(["header", "data", "truncate"], p=[0.4, 0.5, 0.1])
    if where == "header":
        i0 = int(rng.integers(8, header))
        data[i0] = (data[i0] + int(rng.integers(1, 256))) % 256
    elif where == "data":
        i0 = int(rng.integers(header, len(data)))
        data[i0] ^= 1 << int(rng.integers(8))
    else:
        data = data[: int(rng.integers(0, len(data)))]
    path.write_bytes(bytes(data))
    return where, path


def run_file_case(path: Path, references: dict, backend, device) -> str:
    import dfloat
    from dfloat.errors import DFloatError

    try:
        units, plain = dfloat.load_compressed_tensors(path)
        for name, ct in units.items():
            state, got = decode_guarded(ct, backend, device)
            if state == "outside":
                return "outside"
            if name not in references or not torch.equal(got, references[name]):
                return "undetected"
        if set(units) != set(references) or not torch.equal(
            plain.get("norm", torch.empty(0)), torch.arange(64, dtype=torch.bfloat16)
        ):
            return "undetected"
    except DFloatError as e:
        return f"error:{type(e).__name__}"
    except Exception as e:  # noqa: BLE001
        return f"other:{type(e).__name__}: {str(e)[:160]}"
    finally:
        path.unlink(missing_ok=True)
    return "exact"


def model_fixture(tmp: Path):
    """A tiny Llama compressed once per worker, its reference logits, and the shard's bytes."""
    import dfloat
    from dfloat.testing import save_random_model

    src = save_random_model(tmp / "src", trained_scale=True, hidden_size=64, intermediate_size=128)
    out = tmp / "model"
    dfloat.compress_model(str(src), out)
    shard = sorted(out.glob("dfloat-*.safetensors"))[0]
    ids = torch.arange(1, 9).reshape(1, -1)
    model = dfloat.load_compressed(out, device="cpu")
    with torch.no_grad():
        ref = model(ids).logits
    return out, shard, shard.read_bytes(), ids, ref


def run_model_case(rng, fixture, backend, device) -> tuple[str, str]:
    import dfloat
    from dfloat.errors import DFloatError

    folder, shard, pristine, ids, ref = fixture
    data = bytearray(pristine)
    header = 8 + int.from_bytes(data[:8], "little")
    if rng.random() < 0.3:
        i0, where = int(rng.integers(8, header)), "header"
        data[i0] = (data[i0] + int(rng.integers(1, 256))) % 256
    else:
        i0, where = int(rng.integers(header, len(data))), "data"
        data[i0] ^= 1 << int(rng.integers(8))
    shard.write_bytes(bytes(data))
    try:
        model = dfloat.load_compressed(folder, device=device, backend=backend)
        with torch.no_grad():
            got = model(ids.to(device)).logits.cpu()
        result = "exact" if torch.equal(got, ref) else "undetected"
    except DFloatError as e:
        result = f"error:{type(e).__name__}"
    except Exception as e:  # noqa: BLE001
        result = f"other:{type(e).__name__}: {str(e)[:160]}"
    finally:
        shard.write_bytes(pristine)
    return where, result


# ---- the plan: which case number is what ------------------------------------------------------------------------
def plan(n_cases: int, with_files: bool = True) -> list[str]:
    """Case kinds by index, interleaved so any budget covers every kind."""
    cycle = ["dfloat", "dfloat", "dfloat", "official", "official", "unchecked", "dfloat", "official"]
    if with_files:
        cycle += ["file", "file"]
    kinds = [cycle[i % len(cycle)] for i in range(n_cases)]
    if (
        with_files
    ):  # whole-model loads are slow (transformers): the last 1 in 50 cases, in a child of their own
        n_model = max(1, n_cases // 50)
        kinds[n_cases - n_model :] = ["model"] * n_model
    return kinds


def worker(args) -> None:
    """Run cases [start, stop) and print one JSON line per case (flushed, so a crash loses only its own case)."""
    import tempfile

    torch.manual_seed(0)
    units = base_units()
    references = {
        name: unit_reference(ct if kind == "dfloat" else official_unit(ct))
        for name, (kind, ct) in units.items()
    }
    kinds = plan(args.cases, not args.no_files)
    fixture = None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for i in range(args.start, args.stop):
            rng = np.random.default_rng([args.seed, i])
            kind = kinds[i]
            if kind in ("dfloat", "unchecked"):
                names = [n for n, (k, _) in units.items() if k == "dfloat"]
                name = str(rng.choice(names))
                what, bad = mutate_unit(units[name][1], rng)
                result = classify(kind, bad, references[name], args.backend, args.device)
            elif kind == "official":
                name = "official"
                arrays = dict(units[name][1])
                key = str(rng.choice(sorted(arrays)))
                op, arrays[key] = mutate_array(arrays[key], rng)
                what = f"{key}:{op}"
                result = classify(
                    kind, lambda a=arrays: official_unit(a), references[name], args.backend, args.device
                )
            elif kind == "file":
                name = "file"
                what, path = file_case(rng, units, tmp, i)
                result = run_file_case(
                    path,
                    {n: r for n, r in references.items() if units[n][0] == "dfloat"},
                    args.backend,
                    args.device,
                )
            else:
                name = "model"
                if fixture is None:
                    fixture = model_fixture(tmp)
                what, result = run_model_case(rng, fixture, args.backend, args.device)
            print(
                json.dumps({"i": i, "kind": kind, "unit": name, "mutation": what, "result": result}),
                flush=True,
            )


# A child's own process group, in this process's session: a new session (setsid) would also escape whatever ends a
# command's leftovers by session (a job runner, a GPU lease), should this process be SIGKILLed before it can
# kill the group.
_OWN_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group: the child, its --wrap tool and everything they started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_child(cmd: list[str], timeout: float | None) -> tuple[int, str, str, bool]:
    """(exit status, stdout, stderr, timed out) of one child run in a process group of its own.

    The group is killed when the child is done (anything it left behind), when ``timeout`` passes, and when this
    process is interrupted or terminated (SIGTERM is turned into SystemExit in main).
    """
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, **_OWN_GROUP
    )
    timed_out = False
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            out, err = proc.communicate()
    finally:
        _kill_group(proc)
        if proc.poll() is None:
            proc.wait()
    return proc.returncode, out, err, timed_out


def run_all(args) -> dict:
    """Run every case in child processes; restart after a crash; stop at the time limit."""
    results: dict[int, dict] = {}
    child_failures: list[dict] = []
    start = 0
    t0 = time.time()
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    stopped = False
    kinds = plan(args.cases, not args.no_files)
    while start < args.cases:
        left = deadline - time.monotonic() if deadline is not None else None
        if left is not None and left <= 0:
            stopped = True
            break
        stop = min(args.cases, start + args.batch)
        if kinds[start] != "model" and "model" in kinds[start:stop]:
            stop = kinds.index("model", start)
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--start",
            str(start),
            "--stop",
            str(stop),
            "--cases",
            str(args.cases),
            "--seed",
            str(args.seed),
            "--device",
            args.device,
        ]
        if args.backend:
            cmd += ["--backend", args.backend]
        if args.no_files:
            cmd += ["--no-files"]
        cmd = [*args.wrap.split(), *cmd] if args.wrap else cmd
        returncode, stdout, stderr, timed_out = run_child(cmd, left)
        got = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        for r in got:
            results[r["i"]] = r
        done = max([r["i"] for r in got], default=start - 1) + 1
        if timed_out:  # the time limit: the case that was running is not counted
            stopped = True
            break
        if done < stop:  # the child died on case `done`
            results[done] = {
                "i": done,
                "kind": kinds[done],
                "unit": "?",
                "mutation": "?",
                "result": f"crash: exit {returncode}: {stderr[-300:]}",
            }
            start = done + 1
        else:
            if returncode != 0:  # e.g. compute-sanitizer reporting errors at exit
                child_failures.append(
                    {"cases": [start, stop], "result": f"child exit {returncode}: {stderr[-600:]}"}
                )
            start = stop
    counts: dict[str, dict[str, int]] = {}
    failures = []
    for r in results.values():
        outcome = r["result"].split(":")[0]
        counts.setdefault(r["kind"], {}).setdefault(outcome, 0)
        counts[r["kind"]][outcome] += 1
        if outcome not in ALLOWED[r["kind"]]:
            failures.append(r)
    failures += child_failures
    return {
        "cases": len(results),
        "seconds": round(time.time() - t0, 1),
        "counts": counts,
        "failures": failures[:50],
        "n_failures": len(failures),
        "stopped_at_time_limit": stopped,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=int(os.environ.get("DFLOAT_FUZZ_CASES", 1000)))
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--batch", type=int, default=1000, help="cases per child process")
    p.add_argument("--backend", default="cpu", help="cpu, triton (TRITON_INTERPRET=1 on CPU) or cuda")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-files", action="store_true", help="units only (no file or whole-model cases)")
    p.add_argument(
        "--wrap", default="", help="run each child under this command (e.g. compute-sanitizer ...)"
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds: start no child after this, kill the running one (its whole process group) at it",
    )
    p.add_argument(
        "--json", default=None, help="where to write the summary [benchmarks/results/fuzz_<backend>.json]"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0

    def terminate(signum, frame):  # unwinds through run_child, which kills the running child's process group
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    summary = run_all(args)
    import dfloat

    summary.update(
        command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        seed=args.seed,
        backend=args.backend,
        device=args.device,
        machine=platform.machine(),
        python=platform.python_version(),
        torch=torch.__version__,
        dfloat=dfloat.__version__,
        cpu_count=os.cpu_count(),
    )
    path = Path(args.json or ROOT / "benchmarks" / "results" / f"fuzz_{args.backend}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'kind':<10} " + " ".join(f"{k:>10}" for k in ("cases", "error", "exact", "undetected", "other")))
    for kind, c in sorted(summary["counts"].items()):
        other = sum(v for k, v in c.items() if k not in ("error", "exact", "undetected"))
        print(
            f"{kind:<10} {sum(c.values()):>10} {c.get('error', 0):>10} {c.get('exact', 0):>10} "
            f"{c.get('undetected', 0):>10} {other:>10}"
        )
    cut = f" (stopped at the {args.time_limit:g} s time limit)" if summary["stopped_at_time_limit"] else ""
    print(
        f"{summary['cases']} cases in {summary['seconds']} s{cut}, {summary['n_failures']} failures -> {path}"
    )
    for f in summary["failures"][:10]:
        print("FAIL", json.dumps(f))
    return 1 if summary["n_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
