"""What dfloat's start-up hook (dfloat-autoload.pth) costs a program that imports transformers.

python benchmarks/autoload_cost.py [--repeats 9] [--statement "from transformers import AutoTokenizer"] [--name N]

Runs the statement in fresh interpreters of this environment, alternately with the hook on and off
(``DFLOAT_NO_AUTOLOAD=1``; which of the two goes first alternates too), and reports per side the median wall and
CPU time of the statement (timed inside the child, so interpreter start-up is excluded; on a shared machine the
CPU time is the steadier figure), the modules it imported and the peak RSS of the child; and the hook's own
code's time (profiler self time of _dfloat_autoload's functions) and the Python calls it adds, which do not
drown in a shared machine's noise. The target is < 50 ms and no large import on top of transformers' own
(issue 19). Prints a table, writes benchmarks/results/autoload_cost.json (or N.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_result  # noqa: E402

CHILD = """
import json, resource, sys, time
t0, c0 = time.perf_counter(), time.process_time()
{statement}
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({{"seconds": seconds, "cpu_seconds": cpu, "modules": sorted(sys.modules),
                  "rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


# Under the profiler: the self time of every function in _dfloat_autoload (the hook's own code, apart from the
# finders and module bodies it calls, which the import runs anyway), and the number of Python function calls
# (deterministic: what the hook adds to the work, whatever the machine's load).
PROFILED = """
import cProfile, json, pstats
profile = cProfile.Profile()
profile.enable()
{statement}
profile.disable()
stats = pstats.Stats(profile)
own = sum(v[2] for k, v in stats.stats.items() if k[0].endswith("_dfloat_autoload.py"))
print(json.dumps({{"self_seconds": own, "calls": stats.total_calls}}))
"""


def run(statement: str, hook: bool, code: str = CHILD) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DFLOAT_NO_AUTOLOAD"}
    if not hook:
        env["DFLOAT_NO_AUTOLOAD"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", code.format(statement=statement)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),  # not the repository root, whose kernels/ folder would shadow the `kernels` package
        check=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--statement", default="from transformers import AutoTokenizer")
    parser.add_argument("--name", default="autoload_cost", help="JSON file name under benchmarks/results/")
    args = parser.parse_args()
    runs = {True: [], False: []}
    run(args.statement, True)  # warm the file cache and bytecode
    for i in range(args.repeats):  # interleaved, the order alternating, so drifting load affects both sides
        for hook in (False, True) if i % 2 else (True, False):
            runs[hook].append(run(args.statement, hook))
    profiled = {
        hook: [run(args.statement, hook, PROFILED) for _ in range(5 if hook else 1)] for hook in (True, False)
    }
    self_ms = statistics.median(1000 * r["self_seconds"] for r in profiled[True])
    extra_calls = profiled[True][0]["calls"] - profiled[False][0]["calls"]
    base = set(runs[False][0]["modules"])
    rows = []
    for hook in (False, True):
        modules = set(runs[hook][0]["modules"])
        rows.append(
            {
                "hook": "on" if hook else "off (DFLOAT_NO_AUTOLOAD=1)",
                "median_ms": round(1000 * statistics.median(r["seconds"] for r in runs[hook]), 1),
                "median_cpu_ms": round(1000 * statistics.median(r["cpu_seconds"] for r in runs[hook]), 1),
                "modules": len(modules),
                "extra_modules": len(modules - base),
                "median_peak_rss_MiB": round(statistics.median(r["rss_MiB"] for r in runs[hook]), 1),
                "wall_ms": [round(1000 * r["seconds"], 1) for r in runs[hook]],
                "cpu_ms": [round(1000 * r["cpu_seconds"], 1) for r in runs[hook]],
            }
        )
    extra = sorted(set(runs[True][0]["modules"]) - base)
    cost_ms = round(rows[1]["median_ms"] - rows[0]["median_ms"], 1)
    cost_cpu_ms = round(rows[1]["median_cpu_ms"] - rows[0]["median_cpu_ms"], 1)
    print_table(
        rows, ["hook", "median_ms", "median_cpu_ms", "modules", "extra_modules", "median_peak_rss_MiB"]
    )
    print(
        f"\nhook cost: {cost_ms} ms wall, {cost_cpu_ms} ms CPU (median differences); its own code "
        f"{self_ms:.1f} ms (profiler self time, median of 5) and {extra_calls:+,} Python calls of "
        f"{profiled[False][0]['calls']:,}; extra modules: {extra[:10] or 'none'}"
    )
    write_result(
        args.name,
        rows,
        statement=args.statement,
        repeats=args.repeats,
        hook_cost_ms=cost_ms,
        hook_cost_cpu_ms=cost_cpu_ms,
        hook_self_ms=round(self_ms, 2),
        hook_extra_calls=extra_calls,
        calls_without_hook=profiled[False][0]["calls"],
        extra_modules=extra,
        target="< 50 ms and no large import (issue 19)",
    )


if __name__ == "__main__":
    main()
