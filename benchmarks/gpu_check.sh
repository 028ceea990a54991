#!/usr/bin/env bash
# The GPU check: every GPU test and figure of this checkout in ONE device call of at most 10 minutes.
#
#   bash benchmarks/gpu_check.sh                          # results under $OUT (default: tmp/gpu_check)
#   BUDGET_S=540 SKIP_STEPS="e2e fuzz" bash benchmarks/gpu_check.sh
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh      # no GPU (CI): every step reached, nothing run on a GPU
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh   # the interpreter (default: python3, else python)
#
# What it leaves under $OUT is two files (the device tool brings back at most 8): gpu_check_summary.json (each
# step's status, seconds, limit and one-line result, and the rows of every JSON the steps wrote) and
# gpu_check.tar.gz (every log and JSON). The console ends with the summary table.
#
# Steps, most valuable first (a short budget drops the last ones): install (offline editable install when needed),
# env (the GPU; each kernel's registers and blocks per SM from the driver), tests (GPU tests of the decoders, the
# runtime, generation and the prepared launch), decode (ours and the official DFloat11 kernel on the same weights),
# launch_cost (host time per decode), e2e (BF16 / dfloat x eager / CUDA graphs, batch 1, Llama-3.2-1B shapes),
# gemv (fused decode-GEMV tests, then fused vs cuBLAS), memcheck and racecheck (compute-sanitizer on a small
# decode), fuzz (damaged units through both decoders under memcheck), memory (big embeddings used piecewise),
# integrity (checksum costs), demo_stats (`dfloat generate --stats`), sass_proxy (nvcc; no GPU needed), vllm
# (only where vLLM is installed: a tiny Llama served from its BF16 and dfloat folders, compiled and eager).
#
# Each step runs in a process group of its own under a time limit: its cap, or what is left of BUDGET_S (default
# 540 s, less RESERVE_S = 20 s for the summary and the archive) when that is less; with under MIN_STEP_S (30) left
# it is SKIPPED, as is a step named in SKIP_STEPS, whose tool is missing, or whose pytest run skipped every test.
# At its limit a step's commands get SIGTERM and, KILL_AFTER_S (10) later, SIGKILL; when the step ends, anything it
# left running is killed with its process group. Status per step: ok, FAILED, TIMEOUT or SKIPPED (with the
# reason). Exit status: 0 every step ok; 1 a step FAILED or hit TIMEOUT; 2 none failed but some were SKIPPED.
#
# Offline: installs nothing from outside. The official kernel comes from an installed dfloat11 or a wheel in .whl/
# (pip download --no-deps dfloat11==0.5.0 -d .whl); without one the decode step says it left it out.
#
# Adding a step: write `step_<name> LIMIT` (run commands as `limited "$1" CMD...`, log under "$WORK", set the
# summary's line with `note <name> "..."`, return the exit status, or `note` then `return $SKIP` when a tool is
# missing) and add "<name>:<cap seconds>" to STEPS below.
set -u
set -m  # job control: each step runs in a process group of its own, so it can be killed whole
cd "$(dirname "$0")/.."
REPO="$(pwd)"
STEPS="${STEPS:-install:60 env:60 tests:150 decode:120 launch_cost:40 e2e:120 gemv:90 memcheck:60 racecheck:45
  fuzz:90 memory:60 integrity:40 demo_stats:60 sass_proxy:40 vllm:120}"
BUDGET_S="${BUDGET_S:-540}"
RESERVE_S="${RESERVE_S:-20}"
MIN_STEP_S="${MIN_STEP_S:-30}"
KILL_AFTER_S="${KILL_AFTER_S:-10}"
SKIP=99  # a step's return status for "skipped" (after `note` says why)
OUT="${OUT:-tmp/gpu_check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$OUT/gpu_check"
rm -rf "$WORK" "$OUT/gpu_check.tar.gz" "$OUT/gpu_check_summary.json"
mkdir -p "$WORK/.steps"
: >"$WORK/.steps/order.tsv"
export DFLOAT_RESULTS_DIR="$WORK"  # every benchmark's JSON lands here (benchmarks/common.py)
# python3: the GPU image holds torch under python3 (a `python` there may be missing, or another interpreter)
REAL_PY="${PYTHON:-$(command -v python3 || command -v python)}"
[ -n "$REAL_PY" ] || { echo "gpu_check.sh: no python3 or python on PATH (or set PYTHON)" >&2; exit 1; }
if [ -n "${GPU_CHECK_DRY_RUN:-}" ]; then
  PY=("$REAL_PY" "$REPO/benchmarks/gpu_check_dry.py" python)
  SANITIZER=("$REAL_PY" "$REPO/benchmarks/gpu_check_dry.py" sanitizer)
  echo "== dry run: commands are checked, nothing runs on a GPU"
else
  PY=("$REAL_PY")
  SANITIZER=()
  found="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
  [ -n "$found" ] && SANITIZER=("$found")
fi
t0=$(date +%s)

# ---- helpers ---------------------------------------------------------------------------------------------------

# limited SECONDS CMD...: CMD with a time limit (SIGTERM, then SIGKILL KILL_AFTER_S later). --foreground keeps it
# in the step's process group, which run_step kills whole.
limited() {
  local secs=$1
  shift
  timeout --foreground -k "$KILL_AFTER_S" "$secs" "$@"
}

# note NAME TEXT: the step's one-line result in the summary (when TEXT is empty: the last line of its log)
note() {
  local text=$2
  [ -n "$text" ] || text="$(grep -v '^\s*$' "$WORK/$1.log" 2>/dev/null | tail -1)"
  [ -n "$text" ] && printf '%s\n' "$text" | head -1 | cut -c1-150 >"$WORK/.steps/$1.result"
  return 0
}

# pytest_result NAME RC: a pytest step's result line and status from its log ($WORK/NAME.log); a run that skipped
# every test it selected (no GPU seen, CuPy missing, ...) is SKIPPED, not ok
pytest_result() {
  local log="$WORK/$1.log" last
  last="$(grep -E "^=* ?[0-9]+ (passed|failed|skipped|deselected|errors?)\b|no tests ran|collected" "$log" | tail -1)"
  note "$1" "$last"
  if (( $2 == 0 )) && [[ "$last" == *skipped* && "$last" != *passed* ]]; then
    note "$1" "every test skipped: ${last//=/} ($(grep -m1 '^SKIPPED' "$log" | cut -c1-90))"
    return $SKIP
  fi
  return "$2"
}

budget_left() { echo $(( BUDGET_S - RESERVE_S - ($(date +%s) - t0) )); }

record() {  # record NAME STATUS SECONDS LIMIT
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$WORK/.steps/order.tsv"
}

# run_step NAME CAP: step_NAME in its own process group, limited to CAP seconds or what the budget has left
run_step() {
  local name=$1 cap=$2 limit start rc pid watchdog status
  if [[ " ${SKIP_STEPS:-} " == *" $name "* ]]; then
    echo "== $name: SKIPPED (SKIP_STEPS)"; note "$name" "skipped: named in SKIP_STEPS"; record "$name" SKIPPED 0 0
    return
  fi
  limit=$(budget_left)
  (( limit > cap )) && limit=$cap
  if (( limit < MIN_STEP_S )); then
    echo "== $name: SKIPPED ($limit s of the budget left)"
    note "$name" "skipped: $limit s of the ${BUDGET_S} s budget left"; record "$name" SKIPPED 0 0
    return
  fi
  echo "== $name (at most $limit s)"
  start=$(date +%s)
  ( export GPU_CHECK_STEP="$name"; "step_$name" "$limit" ) &
  pid=$!
  CURRENT=$pid
  ( sleep $(( limit + 5 )); touch "$WORK/.steps/$name.timeout"; kill -TERM -- "-$pid" 2>/dev/null
    sleep "$KILL_AFTER_S"; kill -KILL -- "-$pid" 2>/dev/null ) >/dev/null 2>&1 &
  watchdog=$!
  WATCHDOG=$watchdog
  wait "$pid"
  rc=$?
  kill -KILL -- "-$watchdog" 2>/dev/null
  wait "$watchdog" 2>/dev/null
  if kill -KILL -- "-$pid" 2>/dev/null; then echo "   ($name left processes running: killed)"; fi
  CURRENT= WATCHDOG=
  if (( rc == 0 )); then status=ok
  elif (( rc == SKIP )); then status=SKIPPED
  elif [ -e "$WORK/.steps/$name.timeout" ] || (( rc == 124 || rc == 137 )); then status=TIMEOUT
  else status=FAILED
  fi
  [ -s "$WORK/.steps/$name.result" ] || note "$name" "exit status $rc"
  [ "$status" = TIMEOUT ] && note "$name" "timed out after $limit s: $(cat "$WORK/.steps/$name.result" 2>/dev/null)"
  record "$name" "$status" $(( $(date +%s) - start )) "$limit"
}

# stop_running: stopped early, the running step goes too. SIGTERM first: scripts/fuzz.py runs compute-sanitizer in
# a process group of its own, out of the step's reach, and kills that group on SIGTERM (a bare SIGKILL would leave
# it running on the GPU); then, STOP_GRACE_S later, SIGKILL for whatever ignored it.
stop_running() {
  local i
  [ -n "$WATCHDOG" ] && kill -KILL -- "-$WATCHDOG" 2>/dev/null
  [ -n "$CURRENT" ] && kill -TERM -- "-$CURRENT" 2>/dev/null || return 0
  for (( i = 0; i < ${STOP_GRACE_S:-3} * 10; i++ )); do
    kill -0 -- "-$CURRENT" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL -- "-$CURRENT" 2>/dev/null
  return 0
}
CURRENT= WATCHDOG=
trap stop_running EXIT
trap 'exit 143' TERM INT

# ---- the steps -------------------------------------------------------------------------------------------------

step_install() {
  # kernels/, runtime/, ... map to dfloat.kernels, ... (pyproject package-dir), so PYTHONPATH=. is not enough: an
  # editable install (offline, no dependencies) provides the mapping, also when another copy of dfloat is installed
  if "${PY[@]}" -c "import os, sys, dfloat.kernels.cuda_decode as m
sys.exit(0 if os.path.realpath(m.__file__).startswith(os.path.realpath('.') + os.sep) else 1)" >/dev/null 2>&1; then
    note install "dfloat from $REPO"
    return 0
  fi
  echo "installing this checkout (editable, offline, no dependencies)"
  limited "$1" "${PY[@]}" -m pip install --no-deps --no-build-isolation --no-index -e . >"$WORK/pip_install.log" 2>&1 \
    || { note install "editable install failed: see pip_install.log"; return 1; }
  note install "installed $REPO (editable, offline)"
}

step_env() {
  limited "$1" "${PY[@]}" benchmarks/gpu_env.py 2>&1 | tee "$WORK/env.log"
  local rc=${PIPESTATUS[0]}
  note env "$(grep -E '^gpu ' "$WORK/env.log" | head -1)"
  return "$rc"
}

step_tests() {
  limited "$1" "${PY[@]}" -m pytest -q -p no:cacheprovider -rs --durations=8 -m gpu \
    tests/kernels/test_gpu_decoders.py tests/kernels/test_triton_gpu.py tests/kernels/test_cuda_launch_gpu.py \
    tests/runtime/test_gpu_runtime.py tests/runtime/test_gpu_generate.py tests/runtime/test_transformers_integration.py \
    tests/kernels/test_registry.py tests/runtime/test_checkpoints.py tests/runtime/test_generate.py \
    tests/runtime/test_placement.py tests/runtime/test_diffusion.py \
    2>&1 | tee "$WORK/tests.log"
  pytest_result tests "${PIPESTATUS[0]}"
}

step_decode() {
  limited "$1" "${PY[@]}" benchmarks/gpu_decode.py --out "$WORK" 2>&1 | tee "$WORK/decode.log"
  local rc=${PIPESTATUS[0]}
  note decode "$(grep -E "^anchor:" "$WORK/decode.log" | head -1)"
  return "$rc"
}

step_launch_cost() {
  # host CPU per decompress_tensor(..., out=) call: 2000 back-to-back decodes of a tiny unit
  limited "$1" "${PY[@]}" benchmarks/launch_cost.py --device cuda 2>&1 | tail -12 | tee "$WORK/launch_cost.log"
  local rc=${PIPESTATUS[0]}
  note launch_cost "$(grep -E "decompress_tensor" "$WORK/launch_cost.log" | tail -1)"
  return "$rc"
}

step_e2e() {
  # BF16 vs dfloat, transformers' eager generate vs the CUDA-graph fast path, batch 1, Llama-3.2-1B shapes
  limited "$1" "${PY[@]}" benchmarks/e2e.py --device cuda --models llama-3.2-1b --batches 1 --new-tokens 16 \
    --repeats 2 --prefill 512 --out "$WORK" --tmp "${TMPDIR:-/tmp}" 2>&1 | grep -v "it/s" | tee "$WORK/e2e.log"
  local rc=${PIPESTATUS[0]}
  note e2e "$(grep -E "^llama" "$WORK/e2e.log" | tail -1)"
  return "$rc"
}

step_gemv() {
  # the fused decode-GEMV's GPU tests, then fused vs cuBLAS BF16 on one Llama-3.1-8B layer (timed even when a
  # test failed: its figures, and its own fused == twin check, say more than a skip; the step fails either way)
  limited "$1" bash -c 'rc=0; "$@" -m pytest -q -p no:cacheprovider -rs -m gpu tests/kernels/test_gpu_gemv.py \
    || rc=1; "$@" benchmarks/gpu_gemv.py --repeats 20 || rc=1; exit $rc' gemv "${PY[@]}" 2>&1 | tee "$WORK/gemv.log"
  local rc=${PIPESTATUS[0]}
  note gemv "$(grep -E "passed|failed|error" "$WORK/gemv.log" | head -1)"
  return "$rc"
}

write_sanitize_case() {
  cat >"$WORK/sanitize_case.py" <<'PYEOF'
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
  if [ ${#SANITIZER[@]} -eq 0 ]; then note memcheck "compute-sanitizer not found"; return $SKIP; fi
  write_sanitize_case
  limited "$1" "${SANITIZER[@]}" --tool memcheck --error-exitcode 9 "${PY[@]}" "$WORK/sanitize_case.py" cuda triton \
    2>&1 | tail -25 | tee "$WORK/memcheck.log"
  local rc=${PIPESTATUS[0]}
  note memcheck "$(grep -E "ERROR SUMMARY|sanitize case" "$WORK/memcheck.log" | tail -1)"
  return "$rc"
}

step_racecheck() {
  if [ ${#SANITIZER[@]} -eq 0 ]; then note racecheck "compute-sanitizer not found"; return $SKIP; fi
  write_sanitize_case
  limited "$1" "${SANITIZER[@]}" --tool racecheck --error-exitcode 9 "${PY[@]}" "$WORK/sanitize_case.py" cuda \
    2>&1 | tail -25 | tee "$WORK/racecheck.log"
  local rc=${PIPESTATUS[0]}
  note racecheck "$(grep -E "RACECHECK SUMMARY|ERROR SUMMARY|sanitize case" "$WORK/racecheck.log" | tail -1)"
  return "$rc"
}

step_fuzz() {
  # damaged units through the CUDA and Triton decoders under memcheck: a named error or the exact output, never
  # an out-of-bounds access. fuzz.py stops itself at --time-limit and kills each child's process group.
  if [ ${#SANITIZER[@]} -eq 0 ]; then note fuzz "compute-sanitizer not found"; return $SKIP; fi
  local rc=0 b half=$(( $1 / 2 ))
  local inner=$(( half > 25 ? half - 10 : half * 3 / 4 ))
  for b in cuda triton; do
    limited "$half" "${PY[@]}" scripts/fuzz.py --device cuda --backend "$b" --cases 100 --batch 100 --no-files \
      --time-limit "$inner" --wrap "${SANITIZER[*]} --tool memcheck --error-exitcode 9" --json "$WORK/fuzz_$b.json" \
      2>&1 | tail -12 | tee -a "$WORK/fuzz.log"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  done
  note fuzz "$(grep -E "cases|arguments accepted" "$WORK/fuzz.log" | tail -1)"
  return "$rc"
}

step_memory() {
  # big embedding / lm_head used piecewise, exact and as planned
  limited "$1" "${PY[@]}" -m pytest -q -p no:cacheprovider -rs -m gpu tests/runtime/test_gpu_chunked.py 2>&1 \
    | tee "$WORK/memory.log"
  pytest_result memory "${PIPESTATUS[0]}"
}

step_integrity() {
  # the cost of checksums on load and on a unit's first decode, and the hot-path lookup, on the GPU
  limited "$1" "${PY[@]}" benchmarks/integrity.py --device cuda 2>&1 | tail -12 | tee "$WORK/integrity.log"
  local rc=${PIPESTATUS[0]}
  note integrity "$(tail -1 "$WORK/integrity.log")"
  return "$rc"
}

step_demo_stats() {
  # `dfloat generate --stats` on the bundled demo: the fast path, then --no-graphs
  local rc=0 flag
  for flag in "" --no-graphs; do
    limited "$(( $1 / 2 ))" "${PY[@]}" -m dfloat.cli.main generate -p "It is a truth" -n 60 --temperature 0 --stats \
      $flag 2>&1 | tail -8 | tee -a "$WORK/demo_stats.log"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  done
  note demo_stats "$(grep -E "^tokens|arguments accepted" "$WORK/demo_stats.log" | tr -s ' ' | paste -sd';')"
  return "$rc"
}

step_sass_proxy() {
  # needs nvcc, not the GPU: SASS instructions per weight of the decoder and the fused GEMV
  if [ -z "${GPU_CHECK_DRY_RUN:-}" ] && ! command -v nvcc >/dev/null && ! ls /usr/local/cuda*/bin/nvcc >/dev/null 2>&1
  then note sass_proxy "nvcc not found"; return $SKIP; fi
  limited "$1" bash -c 'out=$1; shift; rc=0; "$@" benchmarks/sass_proxy.py --out "$out" || rc=1
    "$@" benchmarks/gemv_sass_proxy.py --out "$out" || rc=1; exit $rc' sass "$WORK" "${PY[@]}" 2>&1 \
    | tee "$WORK/sass_proxy.log"
  local rc=${PIPESTATUS[0]}
  note sass_proxy "$(awk '/^new:dfloat_decode_w32_t256/ {print "decoder w32_t256: " $NF " instructions per weight"}
    /^dfloat_gemv<8, 1, 0>/ {print "fused GEMV batch 1: " $11 " instructions per weight"}' "$WORK/sass_proxy.log" \
    | paste -sd';')"
  return "$rc"
}

step_vllm() {
  # vLLM is not on the GPU image today: the step runs only where it is installed
  if [ -z "${GPU_CHECK_DRY_RUN:-}" ] && ! "${PY[@]}" -c "import vllm" >/dev/null 2>&1
  then note vllm "vLLM not installed"; return $SKIP; fi
  limited "$1" "${PY[@]}" benchmarks/vllm_check.py --shape tiny --tp 1 --modes compiled eager --out "$WORK" 2>&1 \
    | tail -20 | tee "$WORK/vllm.log"
  local rc=${PIPESTATUS[0]}
  note vllm "$(tail -1 "$WORK/vllm.log")"
  return "$rc"
}

# ---- the run ---------------------------------------------------------------------------------------------------

for step in $STEPS; do
  run_step "${step%%:*}" "${step##*:}"
done

echo
echo "== summary ($(( $(date +%s) - t0 )) s of a ${BUDGET_S} s budget)"
"$REAL_PY" - "$WORK" "$OUT" "$BUDGET_S" "$(( $(date +%s) - t0 ))" "${GPU_CHECK_DRY_RUN:-}" <<'PYEOF'
import glob, json, os, sys
work, out, budget, elapsed, dry = sys.argv[1:]
steps = []
for line in open(f"{work}/.steps/order.tsv"):
    name, status, secs, limit = line.rstrip("\n").split("\t")
    res = f"{work}/.steps/{name}.result"
    result = open(res).read().strip() if os.path.exists(res) else ""
    steps.append({"step": name, "status": status, "seconds": int(secs), "limit_s": int(limit), "result": result})
results = {}
for path in sorted(glob.glob(f"{work}/*.json")):
    try:
        doc = json.load(open(path))
    except (OSError, ValueError) as e:
        results[os.path.basename(path)] = {"error": f"{type(e).__name__}: {e}"}
        continue
    keep = {k: doc[k] for k in ("machine", "gpu", "anchor", "copy_bandwidth_bytes_per_s", "exponents_from")
            if isinstance(doc, dict) and k in doc}
    results[os.path.basename(path)] = {**keep, "rows": doc.get("rows") if isinstance(doc, dict) else doc}
summary = {"budget_s": int(budget), "elapsed_s": int(elapsed), "dry_run": bool(dry), "steps": steps,
           "results": results}
for path in (f"{work}/gpu_check_summary.json", f"{out}/gpu_check_summary.json"):
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
print(f"{'step':<12} {'status':<8} {'seconds':>7} {'limit':>5}  result")
for s in steps:
    print(f"{s['step']:<12} {s['status']:<8} {s['seconds']:>7} {s['limit_s']:>5}  {s['result'][:100]}")
for name, doc in results.items():  # the decode benchmark's rows: G weights/s and our time / the official kernel's
    if not name.startswith("gpu_decode_") or not isinstance(doc.get("rows"), list):
        continue
    for r in doc["rows"]:
        ok = "error" not in r and r.get("output_exact")
        what = r.get("error", "")[:60] or (f"{r['gweights_per_s']:.1f} G weights/s ({r['seconds'] * 1e6:.1f} us)"
                                           + (f", ours/official {r['ours_over_official']:.2f}"
                                              if "ours_over_official" in r else "")
                                           + ("" if r.get("output_exact") else ", NOT EXACT"))
        print(f"{'decode ' + r['backend']:<21} {'ok' if ok else 'FAILED':<8}  {r['case'][:44]}: {what}")
statuses = {s["status"] for s in steps}
sys.exit(1 if statuses & {"FAILED", "TIMEOUT"} else 2 if "SKIPPED" in statuses else 0)
PYEOF
status=$?
tar -czf "$OUT/gpu_check.tar.gz" -C "$OUT" gpu_check && rm -rf "$WORK"
echo "wrote $OUT/gpu_check_summary.json and $OUT/gpu_check.tar.gz (every log and JSON)"
exit $status
