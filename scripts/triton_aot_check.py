"""Compile the project's Triton decode kernel ahead of time for GPU targets, with no GPU: does it compile?

Loads kernels/triton_kernel.py from this checkout by path (so it runs in a venv with only triton and numpy: no
torch, no dfloat) and calls ``triton.compile(ASTSource(...), target=GPUTarget(...))`` for each target and each
variant (LANES lanes per program, EXTRA subtable levels: the launcher picks both per unit). Used by
tests/kernels/test_triton_aot.py (the installed Triton) and by .ci/run (a second venv with Triton 3.6.0, the version
torch 2.11 ships).

    python scripts/triton_aot_check.py [--targets cuda:80,cuda:90,hip:gfx942] [--variants 256:2,1024:3] [--json f]

Prints one line per compile and exits 1 if any failed. The compiled binaries' sizes (instructions in PTX / AMDGCN)
are printed as a rough size proxy. To record a version matrix, run it once per Triton venv with --json, then

    python scripts/triton_aot_check.py --merge part1.json part2.json ... --json benchmarks/results/triton_aot_matrix.json

which prints the matrix as a Markdown table (Triton version x target) and writes all rows with each part's command.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

KERNEL_SOURCE = Path(__file__).resolve().parents[1] / "kernels" / "triton_kernel.py"
DEFAULT_TARGETS = "cuda:80,cuda:90,hip:gfx942"
DEFAULT_VARIANTS = "256:2,1024:3"
UNROLL = 2  # as in kernels/triton_decode.py


def load_kernel_module():
    spec = importlib.util.spec_from_file_location("dfloat_triton_kernel_aot", KERNEL_SOURCE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_target(text: str):
    from triton.backends.compiler import GPUTarget

    backend, arch = text.split(":", 1)
    if backend == "cuda":
        return GPUTarget("cuda", int(arch), 32)
    if backend == "hip":
        return GPUTarget("hip", arch, 64)
    raise SystemExit(f"unknown target {text!r}: use cuda:<capability> or hip:<gfx arch>")


LLD_STUB = """#!/bin/sh
# stands in for ROCm's ld.lld where none is installed: records that it ran and writes an empty shared object
[ "$1" = "--version" ] && { echo "LLD 0.0.0 (dfloat stub)"; exit 0; }
touch "$0.ran"
while [ $# -gt 0 ]; do [ "$1" = "-o" ] && : > "$2"; shift; done
"""


def lld_stub(folder: str) -> Path | None:
    """Older Triton wheels link the AMD binary with an external ld.lld: where none is found, point Triton at a stub
    so that every compile stage up to AMDGCN assembly still runs (the rows then say the link was not run)."""
    import shutil

    if os.environ.get("TRITON_HIP_LLD_PATH") or shutil.which("ld.lld") or Path("/opt/rocm/llvm/bin/ld.lld").exists():
        return None
    stub = Path(folder) / "ld.lld"
    stub.write_text(LLD_STUB)
    stub.chmod(0o755)
    os.environ["TRITON_HIP_LLD_PATH"] = str(stub)
    return stub


def sass_facts(cubin: bytes) -> dict:
    """Registers, local memory and the size of each loop (SASS instructions between a backward branch and its
    target) of a compiled NVIDIA kernel, from the cuobjdump that Triton's wheel bundles; {} if there is none."""
    import shutil
    import subprocess

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tool = str(tool) if tool.exists() else shutil.which("cuobjdump")
    if not tool:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    loops = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", sass):
        here, target = int(m.group(1), 16), m.group(2)
        if target is not None and int(target, 16) < here:
            loops.append((here - int(target, 16)) // 16 + 1)
    reg = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return {"registers": int(reg.group(1)) if reg else None, "local_bytes": int(local.group(1)) if local else None,
            "stack_bytes": int(stack.group(1)) if stack else None, "loop_instructions": loops}


def compile_once(mod, target, lanes: int, extra: int) -> dict:
    """Compile for one target; {"ok", "seconds", "asm_lines", "error"}."""
    import triton
    from triton.compiler import ASTSource

    fn = triton.jit(mod.decode_kernel)
    constexprs = {"LANES": lanes, "UNROLL": UNROLL, "EXTRA": extra}
    signature = dict(mod.SIGNATURE)
    signature.update({k: "constexpr" for k in mod.CONSTEXPRS})
    num_warps = mod.num_warps(lanes, target.warp_size)
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        k = triton.compile(src, target=target, options={"num_warps": num_warps})
    except Exception as e:  # noqa: BLE001 - report any compiler failure as a failed row
        return {"ok": False, "seconds": time.perf_counter() - t0,
                "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}",
                "traceback": traceback.format_exc()[-2000:]}
    asm = k.asm.get("ptx") or k.asm.get("amdgcn") or ""
    lines = sum(1 for ln in asm.splitlines() if ln.strip() and not ln.strip().startswith(("//", ".", "$", ";")))
    row = {"ok": True, "seconds": time.perf_counter() - t0, "asm_lines": lines}
    if k.asm.get("cubin"):
        row.update(sass_facts(k.asm["cubin"]))
    return row


def merge(parts: list[str], out: str | None) -> int:
    """Combine per-version JSON files into one matrix; print it as Markdown."""
    docs = [json.loads(Path(p).read_text()) for p in parts]
    rows = [r for d in docs for r in d["rows"]]
    versions = sorted({r["triton"] for r in rows}, key=lambda v: tuple(int(x) for x in re.findall(r"\d+", v)))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    print("| Triton | " + " | ".join(targets) + " |")
    print("|---|" + "---|" * len(targets))
    for v in versions:
        cells = []
        for t in targets:
            got = [r for r in rows if r["triton"] == v and r["target"] == t]
            if not got:
                cells.append("-")
            elif not all(r["ok"] for r in got):
                cells.append("FAILS")
            else:
                cells.append("ok (AMDGCN)" if any("note" in r for r in got) else "ok")
        print(f"| {v} | " + " | ".join(cells) + " |")
    if out:
        Path(out).write_text(json.dumps({
            "benchmark": "triton_aot_matrix", "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "parts": [{"command": d["command"], "python": d["python"]} for d in docs],
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}, indent=2) + "\n")
    return 1 if not all(r["ok"] for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default=DEFAULT_TARGETS)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="LANES:EXTRA pairs to compile (the launcher uses LANES 16..1024, EXTRA 0..3)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--merge", nargs="+", help="combine these per-version JSON files (compiles nothing)")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)
    import triton

    mod = load_kernel_module()
    rows = []
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: compile for real every time
        os.environ["TRITON_CACHE_DIR"] = cache
        stub = lld_stub(cache)
        for target_text in args.targets.split(","):
            target = parse_target(target_text.strip())
            for lanes, extra in (map(int, v.split(":")) for v in args.variants.split(",")):
                row = {"triton": triton.__version__, "target": target_text.strip(), "lanes": lanes, "extra": extra,
                       **compile_once(mod, target, lanes, extra)}
                if stub is not None and Path(f"{stub}.ran").exists():
                    Path(f"{stub}.ran").unlink()
                    row["note"] = "compiled to AMDGCN; the final hsaco link needs ld.lld (not installed): not run"
                rows.append(row)
                what = f"{row.get('asm_lines', '?')} asm lines" if row["ok"] else row["error"]
                if row.get("registers") is not None:
                    what += (f", {row['registers']} registers, {row['local_bytes']} B local, SASS loops of "
                             f"{row['loop_instructions']} instructions")
                what += f" ({row['note']})" if "note" in row else ""
                print(f"triton {triton.__version__} {row['target']:<11} LANES={lanes:<5} EXTRA={extra} "
                      f"{'ok' if row['ok'] else 'FAILED':<6} {row['seconds']:5.1f} s  {what}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "python": platform.python_version(),
            "kernel_source": str(KERNEL_SOURCE), "rows": rows}, indent=2) + "\n")
    failed = [r for r in rows if not r["ok"]]
    for r in failed[:1]:
        print(r["traceback"], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
