#!/usr/bin/env bash
# The one-shot GPU check: environment, build, GPU tests, benchmarks, summary, in under 8 minutes.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh      # on the CUDA machine, from anywhere in the repo
#   bash benchmarks/gpu_check.sh --fingerprint         # print the source fingerprint only (to match a run)
#
# Files written to $OUT (default: /tmp/gpu_check_out), eight at most (the device tool returns 8 files):
#   gpu_check.log     everything this script printed (with host_train.py's output, and the build log's tail, all
#                     of it (200 lines) when the build failed)
#   ws_probe.txt      the Gluon kernels' guarded first launches (benchmarks/ws_probe.py: the warp-specialized
#                     attention, then the decode GEMM)
#   gpu_tests.log     pytest -m gpu tests
#   kernel_tests.log  the kernel test files' other tests, now on the CUDA device
#   bench.log         benchmarks/run_all.py (every bench_*.py in its own process)
#   results.csv       the benchmark rows (benchmarks/common.py record())
#   measured.txt      numbers the GPU tests record (bf16 error ratios, log-prob parity; tests/conftest.py)
#   summary.md        the checks and the summary table (also printed last)
# Installs no dependency (the machine has no internet). A failing step is recorded and the script
# goes on; it exits non-zero when the build or any test failed (benchmark errors are only reported).
#
# Order: environment, build (<= 150 s), the cached-launch check (<= 120 s), host_train.py, the warp-specialized
# attention probe (<= 180 s; a hang or a wrong result turns those kernels off for the run), benchmarks (all but
# GPU_CHECK_TEST_RESERVE_S = 100 s of what is left),
# GPU tests (<= 120 s), kernel tests (<= 60 s), summary. The benchmarks come first: they are the numbers the issues
# ask for and each kernel script checks its kernels against its baseline before timing; a test step with < 45 s left
# is reported as skipped. A second run (warm machine: the build and Triton's cache are kept) picks up what the
# first skipped, e.g. GPU_CHECK_SKIP=build GPU_CHECK_BENCH="ppo_step generate". Knobs (environment):
# GPU_CHECK_BUDGET_S (total, default 450), GPU_CHECK_BUILD_S (150), GPU_CHECK_TEST_S (120), GPU_CHECK_KTEST_S (60),
# GPU_CHECK_TEST_RESERVE_S (100),
# GPU_CHECK_SKIP (any of "build fastlaunch host wsprobe gemmprobe tests ktests bench"),
# GPU_CHECK_BENCH (substrings of the benchmarks to run, e.g. "logprob ppo_step"), GPU_CHECK_KTEST_FILES (the kernel
# test files, space-separated, in order), GPU_CHECK_TEST_FILES (where the GPU tests are collected: default "tests"),
# RLHF_ENGINE_CUDA_ARCHS (default 90a: Hopper only, to save build time), PYTHON (default python),
# GPU_CHECK_TEST_WORKERS (4, whole files per worker: the big bf16 tests of one file never overlap) and
# GPU_CHECK_KTEST_WORKERS (8) when pytest-xdist is carried in benchmarks/.vendor/xdist_site (0 or 1: one process).
# Baselines the machine lacks (Liger-Kernel): `bash benchmarks/fetch_baselines.sh` here first, then carry
# benchmarks/.vendor with the run; it is put on PYTHONPATH.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD

fingerprint() {
  # sha1 over the sources (what the device copy holds), comparable with a local checkout's.
  find csrc kernels rlhf_engine benchmarks tests CMakeLists.txt setup.py pyproject.toml -type f ! -path '*/.vendor/*' \
    \( -name '*.py' -o -name '*.cu' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.h' -o -name '*.txt' \
       -o -name '*.toml' -o -name '*.yaml' -o -name '*.sh' \) ! -path '*/__pycache__/*' 2>/dev/null \
    | LC_ALL=C sort | xargs sha1sum | sha1sum | cut -c1-12
}
if [ "${1:-}" = "--fingerprint" ]; then fingerprint; exit 0; fi

OUT=${OUT:-${TMPDIR:-/tmp}/gpu_check_out}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
export OUT
BUDGET=${GPU_CHECK_BUDGET_S:-450}
BUILD_S=${GPU_CHECK_BUILD_S:-150}
TEST_S=${GPU_CHECK_TEST_S:-120}
KTEST_S=${GPU_CHECK_KTEST_S:-60}
TEST_WORKERS=${GPU_CHECK_TEST_WORKERS:-4}
KTEST_WORKERS=${GPU_CHECK_KTEST_WORKERS:-8}
[[ $TEST_WORKERS =~ ^[0-9]+$ ]] || { echo "GPU_CHECK_TEST_WORKERS=$TEST_WORKERS: not a count; 4"; TEST_WORKERS=4; }
[[ $KTEST_WORKERS =~ ^[0-9]+$ ]] || { echo "GPU_CHECK_KTEST_WORKERS=$KTEST_WORKERS: not a count; 8"; KTEST_WORKERS=8; }
TEST_RESERVE=${GPU_CHECK_TEST_RESERVE_S:-100}  # the benchmarks stop starting scripts early enough to leave this
[[ $TEST_RESERVE =~ ^[0-9]+$ ]] || { echo "GPU_CHECK_TEST_RESERVE_S=$TEST_RESERVE: not a count; 100"; TEST_RESERVE=100; }
MIN_TEST_S=45  # a test step with less than this left is skipped (reported as such), not started and cut
SKIP=" ${GPU_CHECK_SKIP:-} "
TEST_FILES=${GPU_CHECK_TEST_FILES:-tests}  # the GPU tests' files (or folder), space-separated
BENCH_ONLY=${GPU_CHECK_BENCH:-}
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
export RLHF_ENGINE_CUDA_ARCHS=${RLHF_ENGINE_CUDA_ARCHS:-90a}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET  # real kernels on the GPU (tests/conftest.py sets it only without CUDA)
# Pure-Python baselines (Liger-Kernel) unpacked by benchmarks/fetch_baselines.sh and carried here.
if [ -d "$ROOT/benchmarks/.vendor" ]; then export PYTHONPATH="$ROOT/benchmarks/.vendor${PYTHONPATH:+:$PYTHONPATH}"; fi
TMPD=$(mktemp -d)
T0=$(date +%s)

# Test files whose non-gpu-marked tests exercise the real kernels when CUDA is present. Those not yet seen passing
# on a GPU first (the twelfth session's fixes: the H200 run of 1f4b6a6 found 17 tests that only the interpreter had
# run), then the rest; the attention tests last: their fp32 tiles are the slowest compiles, and a timeout cuts the
# tail of the list. GPU_CHECK_KTEST_FILES overrides the list (e.g. the files a cut run did not reach). First of all
# test_batch_invariant.py (a few seconds, CPU tensors): its bit-for-bit rows depend on the MKL of the torch wheel
# and on the CPU, so it checks the GPU machine's host as well (with the CPU parity tests of test_generation.py).
# Before it, what has not yet run on a GPU: the fourteenth session's one-node recomputed layer (model/fused_layer.py)
# and the fifteenth's split-K decode GEMMs (kernels/norm_linear.py: its own tests, then the decode paths using them).
KERNEL_TESTS=${GPU_CHECK_KTEST_FILES:-"tests/test_fused_layer_node.py tests/test_checkpointing.py
  tests/test_decode_linear.py tests/test_norm_linear.py tests/test_decode_paths.py
  tests/test_batch_invariant.py tests/test_hf_attention.py
  tests/test_decode_attention.py tests/test_decode_fused_write.py tests/test_generation.py tests/test_model.py
  tests/test_lora.py
  tests/test_fused_inference_ops.py
  tests/test_fused_layer_backward.py tests/test_hf_kernels.py tests/test_attention_tma.py
  tests/test_logprob.py tests/test_fused_linear_logprob.py tests/test_gae_triton.py tests/test_ppo_loss_triton.py
  tests/test_native.py tests/test_native_compile.py tests/test_attention.py"}

elapsed() { echo $(( $(date +%s) - T0 )); }
# cap WANT [RESERVE]: WANT seconds, or what is left of the budget after RESERVE, whichever is less.
cap() {
  local want=$1 left=$(( BUDGET - $(date +%s) + T0 - ${2:-0} ))
  (( left < want )) && want=$left
  (( want < 1 )) && want=1
  echo "$want"
}
left() { echo $(( BUDGET - $(date +%s) + T0 - ${1:-0} )); }
skipped() { [[ "$SKIP" == *" $1 "* ]]; }
step() { echo; echo "== [$(elapsed) s] $*"; }
# The pytest summary line ("3 failed, 40 passed in 12.3s") of a log; counts of -v lines if there is none.
pytest_line() {
  local line
  line=$(grep -E "[0-9]+ (passed|failed|error|errors|skipped|deselected)|no tests ran" "$1" 2>/dev/null | tail -n 1)
  [ -n "$line" ] || line="no summary line; seen: $(grep -c ' PASSED' "$1" 2>/dev/null) passed, \
$(grep -c ' FAILED' "$1" 2>/dev/null) failed, $(grep -c ' ERROR' "$1" 2>/dev/null) errors"
  echo "$line" | sed -e 's/^=* *//' -e 's/ *=*$//'
}
# run_pytest LOG SECONDS ARGS...: verbose (a timeout still shows what ran); SIGINT at the timeout so
# that pytest prints its summary and the failures so far.
run_pytest() {
  local log=$1 secs=$2
  shift 2
  timeout -s INT -k 15 "$secs" "$PY" -m pytest -v -p no:cacheprovider "$@" > "$log" 2>&1
}
# follow_probe MODE LABEL VAR STATUS [CAP_S]: after a ws_probe.py run passed, its --MODE run (<= CAP_S, default 60 s);
# on a failure VAR=1
# turns that form off for the run, and VAR=notrun when the budget is short (its tests skip). Appends to the caller's
# variable named STATUS (WSP, GSP); sets its FAIL.
follow_probe() {
  local c rc
  local -n st=$4
  c=$(cap "${5:-60}" "$TEST_RESERVE")
  if (( c < PROBE_MIN_S )); then
    st="$st; $2 not run (budget): turned off"; export "$3=notrun"
    return
  fi
  timeout -k 5 "$c" "$PY" benchmarks/ws_probe.py "--$1" >> "$OUT/ws_probe.txt" 2>&1
  rc=$?
  if [ "$rc" -ne 0 ]; then
    st="$st; $2 $(probe_note $rc "$c"): turned off"; export "$3=1"; FAIL=1
  fi
}

probe_note() {  # probe_note RC TIMEOUT_S: ws_probe.py's exit codes
  case "$1" in
    1) echo "WRONG (disagrees with the reference: see ws_probe.txt)" ;;
    3) echo "NOT ELIGIBLE on this sm_90 device (no Gluon?)" ;;
    4) echo "CRASHED (an exception, e.g. a compile error: its traceback is in ws_probe.txt)" ;;
    124|137) echo "TIMEOUT after $2 s (a hang, or slow compiles: the last 'launching' line of the probe's file)" ;;
    *) echo "FAILED (exit $1: see ws_probe.txt)" ;;
  esac
}
rc_note() {  # rc_note RC TIMEOUT_S
  case "$1" in
    0) echo "ok" ;;
    5) echo "ok (no tests collected)" ;;
    124|137) echo "TIMEOUT after $2 s" ;;
    *) echo "FAILED (exit $1)" ;;
  esac
}

make_shim() {
  # Without the editable install, rlhf_engine imports from the repo root, and this finder maps the
  # subpackage rlhf_engine.kernels to kernels/ (what setup.py's package_dir does).
  mkdir -p "$TMPD/shim"
  cat > "$TMPD/shim/sitecustomize.py" <<EOF
import importlib.util
import sys

_ROOT = "$ROOT"


class _KernelsFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "rlhf_engine.kernels":
            return None
        return importlib.util.spec_from_file_location(name, _ROOT + "/kernels/__init__.py",
                                                      submodule_search_locations=[_ROOT + "/kernels"])


sys.meta_path.insert(0, _KernelsFinder)
EOF
  export PYTHONPATH="$ROOT:$TMPD/shim${PYTHONPATH:+:$PYTHONPATH}"
}

fallback_build() {
  # What setup.py's CMakeBuild does, without pip/setuptools: the module lands in rlhf_engine/.
  local pybind pyexe
  pybind=$("$PY" -c "import pybind11; print(pybind11.get_cmake_dir())") || return 1
  pyexe=$(command -v "$PY")
  local gen=()
  command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
  cmake -S "$ROOT" -B "$TMPD/cmake-build" ${gen[@]+"${gen[@]}"} -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$ROOT/rlhf_engine" -DPython_EXECUTABLE="$pyexe" \
    -Dpybind11_DIR="$pybind" -DRLHF_ENGINE_CUDA_ARCHS="$RLHF_ENGINE_CUDA_ARCHS" \
    && cmake --build "$TMPD/cmake-build" --parallel "$(nproc)"
}

main() {
  local FAIL=0 BUILD="skipped" TESTS="skipped" KTESTS="skipped" BENCH="skipped" rc t c
  echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M UTC'), budget ${BUDGET} s, OUT=$OUT"

  step "environment"
  nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null
  local COMMIT FP
  COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no .git in this copy)")
  FP=$(fingerprint)
  echo "commit: $COMMIT; source fingerprint: $FP (compare: bash benchmarks/gpu_check.sh --fingerprint)"
  "$PY" - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, "| capability", f"{p.major}.{p.minor}", "| SMs", p.multi_processor_count,
          "| memory", round(p.total_memory / 2**30, 1), "GiB")
for m in ("triton", "transformers", "numpy", "pybind11", "liger_kernel"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(m, "not importable:", type(e).__name__)
sys.exit(0 if torch.cuda.is_available() else 3)
EOF
  local env_rc=$? CUDA="ok"
  if [ "$env_rc" -ne 0 ]; then
    CUDA="NOT AVAILABLE (torch sees no CUDA device): every GPU test and benchmark was skipped"
    echo "WARNING: $CUDA"
    FAIL=1
  fi
  if ! command -v nvcc >/dev/null 2>&1; then
    for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
      if [ -x "$d/nvcc" ]; then export PATH="$d:$PATH"; break; fi
    done
  fi
  if command -v nvcc >/dev/null 2>&1; then
    export CUDACXX=${CUDACXX:-$(command -v nvcc)}
    echo "nvcc: $CUDACXX ($(nvcc --version | grep -o 'release [0-9.]*'))"
  else
    echo "nvcc: not found: the extension will be built without its CUDA ops"
  fi
  echo "cmake: $(cmake --version 2>/dev/null | head -n 1)"
  echo "ninja: $(ninja --version 2>/dev/null || echo none)"

  step "build (pip install -e ., RLHF_ENGINE_CUDA_ARCHS=$RLHF_ENGINE_CUDA_ARCHS)"
  if skipped build; then
    echo "skipped (GPU_CHECK_SKIP)"
  else
    t=$(date +%s); c=$(cap "$BUILD_S")
    timeout -k 5 "$c" "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e . \
      > "$TMPD/build.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
      BUILD="pip install ok ($(( $(date +%s) - t )) s)"
      tail -n 3 "$TMPD/build.log"
    else
      echo "pip install failed: $(rc_note $rc "$c"); the build log (the last 200 lines):"
      tail -n 200 "$TMPD/build.log"
      if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "not retrying the compile (it timed out); Python-only imports through a shim"
      elif grep -qE "CMake Error|ninja: build stopped|error: .*(\.cu|\.cpp|\.h)|nvcc fatal|\.cu\([0-9]+\): error" \
          "$TMPD/build.log"; then
        echo "not retrying: the sources did not compile (the build log above); Python-only imports through a shim"
      else  # e.g. no pip or setuptools in this environment: build as setup.py would, import through a shim
        echo "falling back to a direct CMake build + an import shim"
        echo "===== fallback: direct CMake build ====="
        t=$(date +%s); c=$(cap "$BUILD_S")
        timeout -k 5 "$c" bash -c "$(declare -f fallback_build); ROOT='$ROOT' TMPD='$TMPD' PY='$PY' fallback_build" \
          2>&1 | tail -n 100
        rc=${PIPESTATUS[0]}
      fi
      make_shim
      if [ $rc -eq 0 ]; then
        BUILD="FAILED with pip; fallback CMake build ok ($(( $(date +%s) - t )) s), imports through a shim"
      else
        BUILD="FAILED (the build log is in gpu_check.log): no native extension; Python-only imports through a shim"
      fi
      FAIL=1
    fi
  fi
  local NATIVE
  native_check() {
    "$PY" - 2>&1 <<'EOF'
import rlhf_engine
from rlhf_engine.kernels import native
print(f"rlhf_engine from {rlhf_engine.__path__[0]}; _C built: {native.available()}, "
      f"with CUDA ops: {native.cuda_available()}")
EOF
  }
  NATIVE=$(native_check)
  if ! echo "$NATIVE" | grep -q "^rlhf_engine from"; then  # the package does not import at all
    echo "$NATIVE" | tail -n 5
    echo "rlhf_engine does not import: adding the import shim"
    make_shim
    NATIVE=$(native_check)
  fi
  echo "$NATIVE"
  if ! echo "$NATIVE" | grep -q "with CUDA ops: True"; then
    BUILD="$BUILD; the extension's CUDA ops are NOT available (${NATIVE##*$'\n'})"
    skipped build || FAIL=1
  fi
  echo "build: $BUILD"

  # The cached Triton launch path (kernels/_fastlaunch.py) is new to the GPU: outputs must equal Triton's own path
  # bit for bit. If not (or it crashes), the rest of the run takes Triton's path, and the run says so.
  step "cached Triton launches: benchmarks/fastlaunch_check.py"
  local FASTLAUNCH
  if skipped fastlaunch; then
    FASTLAUNCH="skipped (GPU_CHECK_SKIP): not checked in this run"
  else
    c=$(cap 120)
    timeout -k 5 "$c" "$PY" benchmarks/fastlaunch_check.py
    rc=$?
    if [ $rc -eq 0 ]; then
      FASTLAUNCH="ok (outputs identical to Triton's launch path)"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then  # unknown, not wrong: off for this run, not a failure
      FASTLAUNCH="not checked (TIMEOUT after $c s): the rest of this run used Triton's launch path"
      export RLHF_ENGINE_FAST_LAUNCH=0
    else
      FASTLAUNCH="FAILED ($(rc_note $rc "$c")): the rest of this run used Triton's launch path"
      export RLHF_ENGINE_FAST_LAUNCH=0
      FAIL=1
    fi
  fi
  echo "cached launches: $FASTLAUNCH"

  # This host's Python speed (the PPO training phase is host-bound): benchmarks/host_train.py times the training
  # forward + backward with the launches stubbed, on the CPU, as RESULTS.md quotes it for the CI box (~10 s).
  step "host time of a training forward + backward: benchmarks/host_train.py (CPU, launches stubbed)"
  local HOSTT="skipped (GPU_CHECK_SKIP)"
  if ! skipped host; then
    c=$(cap 45)
    timeout -k 5 "$c" "$PY" benchmarks/host_train.py --rounds 2 --reps 5 > "$TMPD/host_train.txt" 2>&1
    rc=$?
    cat "$TMPD/host_train.txt"
    HOSTT="$(rc_note $rc "$c"): $(grep -m1 'one node' "$TMPD/host_train.txt" | tr -s ' ')"
  fi

  # Parallel test workers (pytest-xdist, carried: benchmarks/fetch_baselines.sh), if this pytest loads it: the
  # kernel tests are mostly Triton compiles (ptxas: one core each), 16 cores here. The probe starts two workers on
  # two quick CPU tests (collect-only would not start any); it runs before the benchmarks, whose host-bound
  # timings its CPU work would disturb, and so does not eat into the tests' reserve.
  local XD="$ROOT/benchmarks/.vendor/xdist_site" XDIST_T=() XDIST_K=() NCPU
  NCPU=$(nproc 2>/dev/null || echo 16)
  if skipped tests && skipped ktests; then
    :
  elif [ -d "$XD" ] && PYTHONPATH="$XD${PYTHONPATH:+:$PYTHONPATH}" timeout 120 "$PY" -m pytest -p no:cacheprovider -q \
      -n 2 -k "mismatched or refuses" tests/test_packing.py > "$TMPD/xdist_probe.log" 2>&1; then
    export PYTHONPATH="$XD${PYTHONPATH:+:$PYTHONPATH}"
    # each worker gets its share of the cores for torch's CPU threads (the fp64 references)
    (( TEST_WORKERS > 1 )) && XDIST_T=(-n "$TEST_WORKERS" --dist loadfile)
    (( KTEST_WORKERS > 1 )) && XDIST_K=(-n "$KTEST_WORKERS" --dist load)
    echo "pytest-xdist: on (gpu tests ${TEST_WORKERS} workers, kernel tests ${KTEST_WORKERS}; ${NCPU} cores)"
  elif [ -d "$XD" ]; then
    echo "pytest-xdist: carried but this pytest does not load it (one process); probe output:"
    tail -n 5 "$TMPD/xdist_probe.log"
  else
    echo "pytest-xdist: not carried (benchmarks/fetch_baselines.sh); tests run in one process"
  fi

  step "Gluon kernels' probes (benchmarks/ws_probe.py): the warp-specialized attention, the decode GEMM"
  # The Gluon kernel's first launch on a GPU: a hang or a wrong result turns its benchmark rows off and makes its
  # tests fail at once (RLHF_ENGINE_ATTN_WS_BROKEN), instead of hanging the run.
  local WSP="skipped (GPU_CHECK_SKIP)" GSP="skipped (GPU_CHECK_SKIP)"
  : > "$OUT/ws_probe.txt"
  # A probe with less than PROBE_MIN_S left is not started: its kernels stay off for the run ("not run (budget)",
  # ..._BROKEN=notrun: their tests skip), which is no failure (a probe cut short by the budget would read as a hang).
  local PROBE_MIN_S=30
  if ! skipped wsprobe; then
    c=$(cap 120 "$TEST_RESERVE")
    if (( c < PROBE_MIN_S )); then
      WSP="not run (budget: ${c} s left): turned off"; export RLHF_ENGINE_ATTN_WS_BROKEN=notrun
    else
      timeout -k 5 "$c" "$PY" benchmarks/ws_probe.py --simple >> "$OUT/ws_probe.txt" 2>&1
      rc=$?
      case $rc in
        0) WSP="simple forward and backward ok"
           follow_probe pipelined "pipelined forward" RLHF_ENGINE_ATTN_WS_PIPELINE_BROKEN WSP
           # the backward's atomic-dQ form: a failure keeps dq_mode="atomic" on the Triton kernels
           follow_probe atomic "atomic-dQ backward" RLHF_ENGINE_ATTN_WS_ATOMIC_BROKEN WSP
           # FA3's ping-pong (opt-in) on the pipelined forward and the backward (the atomic-dQ form only where it
           # passed alone): probed only where the pipelined forward works
           if [ -z "${RLHF_ENGINE_ATTN_WS_PIPELINE_BROKEN:-}" ]; then
             follow_probe pingpong "ping-pong" RLHF_ENGINE_ATTN_WS_PINGPONG_BROKEN WSP 120
           else
             export RLHF_ENGINE_ATTN_WS_PINGPONG_BROKEN=notrun
           fi ;;
        2) WSP="not run (no sm_90 device)" ;;
        *) WSP="$(probe_note $rc "$c"): turned off"; export RLHF_ENGINE_ATTN_WS_BROKEN=1; FAIL=1 ;;
      esac
      tail -n 12 "$OUT/ws_probe.txt"
    fi
  fi
  # The Gluon decode GEMM (kernels/decode_gemm_ws.py), its own skip key (a run that skips the attention's probe
  # may still time the decode path): a failure turns it off (its benchmark rows, its model path) for the run.
  if ! skipped gemmprobe; then
    c=$(cap 60 "$TEST_RESERVE")
    if (( c < PROBE_MIN_S )); then
      GSP="not run (budget: ${c} s left): turned off"; export RLHF_ENGINE_DECODE_GEMM_WS_BROKEN=notrun
    else
      { echo; echo "===== decode GEMM (--gemm) ====="; } >> "$OUT/ws_probe.txt"
      timeout -k 5 "$c" "$PY" benchmarks/ws_probe.py --gemm >> "$OUT/ws_probe.txt" 2>&1
      rc=$?
      case $rc in
        0) GSP="ok"  # the LM head with the sampler in its epilogue: a failure leaves generate on the logits
           follow_probe lm-head "LM head + sampler" RLHF_ENGINE_LM_HEAD_SAMPLE_BROKEN GSP ;;
        2) GSP="not run (no sm_90 device)" ;;
        *) GSP="$(probe_note $rc "$c"): turned off"; export RLHF_ENGINE_DECODE_GEMM_WS_BROKEN=1; FAIL=1 ;;
      esac
      tail -n 8 "$OUT/ws_probe.txt"
    fi
  fi
  echo "probes: warp-specialized attention $WSP; decode GEMM $GSP"

  step "benchmarks: benchmarks/run_all.py"
  if skipped bench; then
    echo "skipped (GPU_CHECK_SKIP)"
  else
    local b
    b=$(left $(( TEST_RESERVE + 15 )))
    if (( b < 30 )); then
      BENCH="skipped (${b} s left in the budget)"
    else
      # shellcheck disable=SC2086 # BENCH_ONLY is a list of words
      RLHF_ENGINE_COMPILE_LOG=1 timeout -k 5 $(( b + 30 )) "$PY" benchmarks/run_all.py --budget "$b" --summary "$TMPD/bench_summary.md" \
        ${BENCH_ONLY:+--only $BENCH_ONLY} > "$OUT/bench.log" 2>&1
      rc=$?
      BENCH="run_all exit $rc ($(rc_note $rc $(( b + 30 )))), budget $b s"
      grep -E "^----- " "$OUT/bench.log" | sed 's/^----- /  /'
    fi
    echo "benchmarks: $BENCH"
  fi


  step "GPU tests: pytest -m gpu $TEST_FILES"
  if skipped tests; then
    echo "skipped (GPU_CHECK_SKIP)"
  else
    c=$(cap "$TEST_S")
    if (( c < MIN_TEST_S )); then
      TESTS="skipped (budget: ${c} s left)"
    else
    # fixed attention tiles (RLHF_ENGINE_AUTOTUNE=0): tests check correctness, and autotuning every head dim
    # and dtype would spend the test budget in ptxas; the benchmarks autotune (and check against SDPA)
    # shellcheck disable=SC2086 # TEST_FILES is a list of words
    RLHF_ENGINE_AUTOTUNE=0 OMP_NUM_THREADS=$(( ${#XDIST_T[@]} ? (NCPU + TEST_WORKERS - 1) / TEST_WORKERS : NCPU )) \
      run_pytest "$OUT/gpu_tests.log" "$c" -m gpu $TEST_FILES --durations=10 ${XDIST_T[@]+"${XDIST_T[@]}"}
    rc=$?
    TESTS="$(rc_note $rc "$c"): $(pytest_line "$OUT/gpu_tests.log")"
    case $rc in 0|5) ;; *) FAIL=1 ;; esac
    grep -E "^(FAILED|ERROR) " "$OUT/gpu_tests.log" | head -n 20
    fi
    echo "gpu tests: $TESTS"
  fi

  step "kernel tests on CUDA (not gpu-marked, not slow)"
  if skipped ktests; then
    echo "skipped (GPU_CHECK_SKIP)"
  else
    local files=() f
    for f in $KERNEL_TESTS; do [ -f "$f" ] && files+=("$f"); done
    c=$(cap "$KTEST_S")
    if (( c < MIN_TEST_S )); then
      KTESTS="skipped (budget: ${c} s left)"
    elif (( ${#files[@]} == 0 )); then
      KTESTS="skipped (no kernel test files)"
    else
      RLHF_ENGINE_AUTOTUNE=0 OMP_NUM_THREADS=$(( ${#XDIST_K[@]} ? (NCPU + KTEST_WORKERS - 1) / KTEST_WORKERS : NCPU )) \
        run_pytest "$OUT/kernel_tests.log" "$c" -m "not gpu and not slow" "${files[@]}" --durations=5 \
        ${XDIST_K[@]+"${XDIST_K[@]}"}
      rc=$?
      KTESTS="$(rc_note $rc "$c"): $(pytest_line "$OUT/kernel_tests.log")"
      case $rc in 0|5) ;; *) FAIL=1 ;; esac
      grep -E "^(FAILED|ERROR) " "$OUT/kernel_tests.log" | head -n 20
    fi
    echo "kernel tests: $KTESTS"
  fi

  {
    echo "# GPU check"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'); commit $COMMIT; source fingerprint $FP; $(elapsed) s in all"
    nvidia-smi -L 2>/dev/null | head -n 1
    echo
    echo "## checks"
    echo "- CUDA: $CUDA"
    echo "- build: $BUILD"
    echo "- cached Triton launches: ${FASTLAUNCH:-not checked}"
    echo "- host_train.py (this host's Python): ${HOSTT:-not run}"
    echo "- Gluon probes: warp-specialized attention: $WSP; decode GEMM: $GSP"
    echo "- GPU tests (pytest -m gpu $TEST_FILES): $TESTS"
    echo "- kernel tests on CUDA (not gpu-marked): $KTESTS"
    echo "- benchmarks: $BENCH"
    grep -hE "^(FAILED|ERROR) " "$OUT/gpu_tests.log" "$OUT/kernel_tests.log" 2>/dev/null | head -n 20 \
      | sed 's/^/  - /'
    echo
    echo "## benchmarks (ratio = baseline ms / our ms, baseline measured in the same run)"
    if [ -s "$TMPD/bench_summary.md" ]; then cat "$TMPD/bench_summary.md"; else echo "(no benchmark summary)"; fi
    if [ -s "$OUT/measured.txt" ]; then
      echo
      echo "## numbers measured by the GPU tests (tests/conftest.py record_value)"
      sed 's/^/- /' "$OUT/measured.txt"
    fi
    if grep -q "^precompile: " "$OUT/bench.log" 2>/dev/null; then
      echo
      echo "## parallel Triton compiles before autotuning (kernels/_launch.py parallel_autotune)"
      grep "^precompile: " "$OUT/bench.log" | sed 's/^/- /'
    fi
    if grep -q "^autotune " "$OUT/bench.log" 2>/dev/null; then
      echo
      echo "## autotune winners (for the *_DEFAULT tiles used without autotuning)"
      grep "^autotune " "$OUT/bench.log" | grep -v " last run: " | sort -u | sed 's/^/- /'
    fi
  } > "$OUT/summary.md"
  echo
  echo "==================== SUMMARY ($(elapsed) s) ===================="
  cat "$OUT/summary.md"
  return $FAIL
}

main 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
rm -rf "$TMPD"
exit "$status"
