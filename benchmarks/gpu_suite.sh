#!/usr/bin/env bash
# The GPU suite: one call on a lent H200 (torch 2.11 + cu130, Triton 3.6, nvcc 13.0, no internet)
# of at most 10 minutes that builds, checks and measures every claim, most valuable first:
#   env          the machine and software versions
#   setup        wheels the suite needs beyond the machine's packages (from .wheels/, --no-index, into
#                an overlay on PYTHONPATH), then `pip install --no-build-isolation --no-deps -e .`
#                (the C++/CUDA extension)
#   correctness  every CUDA path vs the float64 reference, fp32 + bf16, fwd + bwd, seed + awkward shapes
#   memcheck     compute-sanitizer memcheck over one small fused WB-DiT forward + backward
#   ops          per-op speed at the seed shape vs the best alternative, tile sweep -> winners file
#   train        whole training step, seed config, bf16: WB-DiT fused / reference, DiT; eager + compile
#   sample       sampling throughput, cells/s: the defaults (DPM-Solver++(2M) 7 steps, interval guidance) vs DDIM-50 + CFG
#   tests        pytest of the GPU test files on the GPU
# then the results table ($OUT/summary.md). Each stage appends its results to $OUT/results.jsonl
# as it gets them, so a stage that fails or times out loses nothing of the earlier ones; the
# winners land in $OUT/tuning.json (copy it to wbdit/tuning.json to make them the default).
#
#   bash benchmarks/gpu_suite.sh          on the GPU machine; through the device tool:
#                                         run(command="bash benchmarks/gpu_suite.sh", carry=[".wheels"], timeout_s=600)
#   bash benchmarks/gpu_suite.sh --twin   on a CPU machine: rebuilds the GPU machine's software in a venv
#                                         (torch==2.11.0 from PyPI, cu13 + triton 3.6.0), downloads .wheels/,
#                                         builds the extension for sm_90, compiles every Triton configuration
#                                         ahead of time with Triton 3.6 (and the dev venv's Triton beside it),
#                                         runs the interpreter tests under Triton 3.6, collects the GPU tests
#                                         and benchmarks, and runs every GPU stage up to where it needs a GPU;
#                                         writes its results into benchmarks/RESULTS.md. Non-zero if any fails.
# Results go to $OUT when set (the device tool's folder), else gpu-results/<mode>-<UTC time>/.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
case "${1:-}" in
"") MODE=gpu ;;
--twin) MODE=twin ;;
*) sed -n '2,/^set /p' "$0" | sed '$d'; exit 2 ;; # the usage: this file's opening comment
esac
# The GPU run installs into the machine's Python: never on a machine without a GPU (the twin is for that).
if [ "$MODE" = gpu ] && ! nvidia-smi -L >/dev/null 2>&1; then
  echo "no GPU here (nvidia-smi finds none): on a CPU machine run bash benchmarks/gpu_suite.sh --twin" >&2
  exit 2
fi
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RES=${OUT:-$ROOT/gpu-results/$MODE-$STAMP}
mkdir -p "$RES"
export RESULTS=$RES/results.jsonl TUNING_OUT=$RES/tuning.json
LOG=$RES/suite.log
: >"$RESULTS"
: >"$LOG"
FAILED=0

# GPU stage limits in seconds, most valuable first; they must add up to at most 540 (9 minutes),
# leaving a minute of the device tool's 10 for the summary and the transfers.
# setup is mostly the extension's build: two compilation units in parallel, the .cu for one arch.
GPU_STAGES=(env:20 setup:120 correctness:65 memcheck:40 ops:100 train:135 sample:30 tests:25)
GPU_TESTS="tests/test_mssa.py tests/test_ista.py tests/test_extension.py tests/test_fused_model.py tests/test_tuning.py
  tests/test_model.py"
BENCH_FILES="benchmarks/test_bench_kernels.py benchmarks/test_bench_training.py benchmarks/test_bench_extension.py"
export WHEELS=.wheels # git-ignored; travels to the GPU machine with carry=[".wheels"]

stage() { # stage NAME LIMIT CMD...: run under a time limit (CMD may be a function of this script);
  # output to the log; record rc and seconds
  local name=$1 limit=$2 t0=$SECONDS rc tmp
  shift 2
  tmp=$(mktemp)
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  if declare -F "$1" >/dev/null; then # timeout runs programs: hand the functions to a new bash
    STAGE=$name timeout -k 5 "$limit" bash -c "$(declare -f); $(printf '%q ' "$@")" >"$tmp" 2>&1
  else
    STAGE=$name timeout -k 5 "$limit" "$@" >"$tmp" 2>&1
  fi
  rc=$?
  cat "$tmp" >>"$LOG"
  tail -n 3 "$tmp"
  LAST_STAGE_LOG=$(cat "$tmp")
  rm -f "$tmp"
  # A failed stage keeps its last line of output beside its status (often the error itself).
  python3 -c 'import json, sys; n, l, s, rc, last = sys.argv[1:]; print(json.dumps({"stage": n, "kind": "stage",
    "name": n, "limit": int(l), "seconds": int(s), "rc": int(rc), "last": last}))' \
    "$name" "$limit" $((SECONDS - t0)) "$rc" "$([ "$rc" = 0 ] || grep -v '^\s*$' <<<"$LAST_STAGE_LOG" | tail -n 1)" \
    >>"$RESULTS"
  echo "-- $name rc=$rc $((SECONDS - t0))s" | tee -a "$LOG"
  [ "$rc" = 0 ] || FAILED=1
  return "$rc"
}

note() { # note STAGE KIND FIELD VALUE [FIELD VALUE...]: one JSON row written by the shell (strings only)
  python3 -c 'import json, sys; print(json.dumps({"stage": sys.argv[1], "kind": sys.argv[2], sys.argv[3]: sys.argv[4], **dict(zip(sys.argv[5::2], sys.argv[6::2]))}))' \
    "$@" >>"$RESULTS"
}

limit_of() { # limit_of NAME: the GPU stage's limit
  local s
  for s in "${GPU_STAGES[@]}"; do [ "${s%%:*}" = "$1" ] && echo "${s#*:}"; done
}

check_limits() {
  local s total=0
  for s in "${GPU_STAGES[@]}"; do total=$((total + ${s#*:})); done
  echo "GPU stage limits add up to ${total}s (at most 540)"
  [ "$total" -le 540 ]
}

install_wheels() { # install_wheels TARGET [DIR...]: wheels.txt's packages from the wheel folders only
  # (no index), into TARGET, an overlay that goes on PYTHONPATH
  local target=$1 reqs d links=()
  shift
  reqs=$(grep -v '^\s*#' benchmarks/gpu/wheels.txt | grep -v '^\s*$' || true)
  if [ -z "$reqs" ]; then
    echo "benchmarks/gpu/wheels.txt lists nothing: the suite needs no package beyond the machine's"
    return 0
  fi
  for d in "$WHEELS" "$@"; do links+=(--find-links "$d"); done
  rm -rf "$target"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$target" "${links[@]}" \
    -r benchmarks/gpu/wheels.txt || return 1
  echo "$(wc -l <<<"$reqs") packages from $WHEELS into $target"
}

gpu_setup() {
  install_wheels "$SITE" || return 1
  MAX_JOBS=$(nproc) "$PY" -m pip install --no-build-isolation --no-deps -e .
}

memcheck() {
  if ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    "$PY" benchmarks/gpu/memcheck_model.py # records the skip
    return 0
  fi
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found"; return 1; }
  # --error-exitcode: an error found fails the stage even if the program itself succeeds. Without
  # torch's caching allocator every tensor is its own allocation, so an access past a tensor's end
  # is outside any allocation, where memcheck sees it (inside a cached block it would not).
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
    "$PY" benchmarks/gpu/memcheck_model.py
}

gpu_stages() { # gpu_stages PREFIX DRY: the GPU suite's stages (DRY=1: the twin's run, no setup, no tests)
  local prefix=$1 dry=$2 summary
  stage "${prefix}env" "$(limit_of env)" "$PY" benchmarks/gpu/env.py
  if [ "$dry" = 0 ]; then
    stage "${prefix}setup" "$(limit_of setup)" gpu_setup
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  fi
  stage "${prefix}correctness" "$(limit_of correctness)" "$PY" benchmarks/gpu/correctness.py
  stage "${prefix}memcheck" "$(limit_of memcheck)" memcheck
  summary=$(grep -m1 "ERROR SUMMARY" <<<"$LAST_STAGE_LOG" || true)
  [ -n "$summary" ] && note "${prefix}memcheck" memcheck summary "$summary"
  stage "${prefix}ops" "$(limit_of ops)" "$PY" benchmarks/gpu/ops_speed.py
  # Later stages launch with the winners just measured (wbdit.ops.report()["tuning"] says so).
  [ -s "$TUNING_OUT" ] && export WBDIT_TUNING=$TUNING_OUT
  stage "${prefix}train" "$(limit_of train)" "$PY" benchmarks/gpu/train_step.py
  stage "${prefix}sample" "$(limit_of sample)" "$PY" benchmarks/gpu/sampling.py
  if [ "$dry" = 0 ]; then
    stage "${prefix}tests" "$(limit_of tests)" "$PY" -m pytest -q -p no:cacheprovider $GPU_TESTS
    summary=$(tail -n 1 <<<"$LAST_STAGE_LOG")
    note "${prefix}tests" pytest summary "$summary" what "GPU tests on the GPU"
  fi
}

# ---------------------------------------------------------------------------- the GPU machine
if [ "$MODE" = gpu ]; then
  export PY=${PYTHON:-python3} SITE=/tmp/wbdit-site
  unset TRITON_INTERPRET # real GPU kernels, not the CPU interpreter
  check_limits || exit 1
  gpu_stages "" 0
  "$PY" benchmarks/gpu/report.py "$RESULTS" >"$RES/summary.md"
  cat "$RES/summary.md"
  echo "results: $RES (results.jsonl, summary.md, suite.log, tuning.json); failed stages: $FAILED"
  exit "$FAILED"
fi

# ---------------------------------------------------------------------------- the CPU twin
TWIN=${WBDIT_TWIN:-/tmp/wbdit-twin}
VENV=$TWIN/venv
SRC=$TWIN/src
DEV_PY=${DEV_PYTHON:-$ROOT/.venv/bin/python} # the dev machines' torch + Triton, for the table beside
COMPARE=()
export PY VENV SRC TWIN TWIN_REQS ABSENT NUMPY_INTERP
# The GPU machine's packages that the suite's code and wheels.txt's packages use, as the device
# tool's KINDS.md lists them there (versions: the newest on PyPI, torch pinned), and what building
# needs there too (ninja, setuptools, wheel).
TWIN_REQS="torch==2.11.0 scipy pandas h5py scikit-learn matplotlib tqdm pytest pytest-benchmark numba pyyaml ninja
  setuptools>=64 wheel"
ABSENT="anndata scanpy ot umap"
NUMPY_INTERP=2.3.5
T0=$SECONDS
check_limits || exit 1
export WBDIT_GIT
WBDIT_GIT="$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo +dirty)"

twin_venv() {
  # Kept between runs (torch is several GB): an existing venv only gets what is missing.
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || return 1
  "$VENV/bin/pip" install -q $TWIN_REQS || return 1
  "$VENV/bin/python" - "$ABSENT" <<'EOF'
import importlib.util, sys
import torch, triton
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
assert torch.__version__.startswith("2.11.0") and torch.version.cuda.startswith("13."), "not the cu13 torch 2.11.0"
assert triton.__version__ == "3.6.0", f"torch 2.11.0 brought triton {triton.__version__}, expected 3.6.0"
present = [m for m in sys.argv[1].split() if importlib.util.find_spec(m)]
assert not present, f"absent on the GPU machine but importable here: {present}"
EOF
}

twin_wheels() { # wheels.txt for the GPU's Python 3.12 into .wheels (carried), for the twin's own
  # Python beside it (binary wheels differ; not carried); then install them as the GPU run does
  local reqs plat py
  reqs=$(grep -v '^\s*#' benchmarks/gpu/wheels.txt | grep -v '^\s*$' || true)
  plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  py=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  rm -rf "$WHEELS" "$TWIN/wheels-twin" && mkdir -p "$WHEELS" "$TWIN/wheels-twin"
  if [ -n "$reqs" ]; then
    "$VENV/bin/pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat \
      -d "$WHEELS" -r benchmarks/gpu/wheels.txt || return 1
    "$VENV/bin/pip" download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp $plat \
      -d "$TWIN/wheels-twin" -r benchmarks/gpu/wheels.txt || return 1
  fi
  install_wheels "$TWIN/site" "$TWIN/wheels-twin"
}

twin_snapshot() { # the working tree as the device tool sends it: tracked + untracked-not-ignored, + .wheels
  rm -rf "$SRC" && mkdir -p "$SRC"
  { git ls-files -co --exclude-standard | while IFS= read -r f; do [ -f "$f" ] && echo "$f"; done
    find "$WHEELS" -type f; } | tar -cf - -T - | tar -xf - -C "$SRC"
  echo "$(find "$SRC" -type f | wc -l) files, $(du -sh "$SRC" | cut -f1)"
}

twin_build() { # the extension against torch 2.11 for the GPU's sm_90, with nvcc here
  cd "$SRC" || return 1
  TORCH_CUDA_ARCH_LIST=9.0 WBDIT_CUDA=1 MAX_JOBS=2 "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e . \
    || return 1
  "$VENV/bin/python" - <<'EOF'
import glob, os, subprocess, triton
from wbdit import extension
assert extension.has_cuda(), "wbdit._C has no CUDA kernels"
so = glob.glob("wbdit/_C*.so")[0]
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
elf = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True, check=True).stdout
archs = sorted({line.split(".")[-2] for line in elf.split() if line.endswith(".cubin")})
print(f"{so}: {os.path.getsize(so) / 2**20:.1f} MiB, cubins for {archs}")
assert archs == ["sm_90"], archs
EOF
}

twin_interpreter() { # the kernel tests through Triton 3.6's interpreter
  # Triton 3.6's interpreter turns 1-element arrays into loop bounds with int(), which numpy >= 2.4
  # refuses ("only 0-dimensional arrays can be converted"; Triton 3.8 squeezes first). The GPU
  # machine never interprets, so only this stage runs with an older numpy, from an overlay.
  [ -d "$TWIN/numpy-interp" ] || "$VENV/bin/pip" install -q --no-deps --target "$TWIN/numpy-interp" \
    "numpy==$NUMPY_INTERP" || return 1
  TRITON_INTERPRET=1 PYTHONPATH=$TWIN/numpy-interp:$PYTHONPATH "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_mssa.py tests/test_ista.py tests/test_fused_model.py tests/test_tuning.py
}

aot_ok() { # aot_ok JSON: every row within its spill bound and shared memory, tensor cores where a GEMM is
  "$VENV/bin/python" - "$1" <<'EOF'
import json, sys
from wbdit.kernels import aot
rows = [aot.Resources(**r) for r in json.load(open(sys.argv[1]))]
bad = [f"{r.kernel} {r.arch} {r.dtype} {r.constexprs} w{r.num_warps} s{r.num_stages}" for r in rows
       if r.spill_stores > aot.spill_bound(r) or r.shared_bytes > r.smem_limit
       or (r.kernel not in aot.NO_GEMM and not (r.mma or r.wgmma))]
print(f"{len(rows)} compiled configurations, {len(bad)} out of bounds")
assert not bad, bad
EOF
}

stage twin-venv 900 twin_venv || { echo "no twin venv: nothing else can run"; exit 1; }
export PY=$VENV/bin/python
note twin-venv twin what "Twin venv" value "$("$PY" -c 'import platform, torch, triton, numpy, scipy, pandas, sklearn, numba, h5py, matplotlib, pytest; print(f"Python {platform.python_version()} (the GPU machine: 3.12), torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, numpy {numpy.__version__}, scipy {scipy.__version__}, pandas {pandas.__version__}, scikit-learn {sklearn.__version__}, numba {numba.__version__}, h5py {h5py.__version__}, matplotlib {matplotlib.__version__}, pytest {pytest.__version__}; as on the GPU machine, the venv has no anndata, scanpy, POT or umap-learn (anndata comes from the wheel folder)")')"
stage twin-wheels 300 twin_wheels
export PYTHONPATH=$TWIN/site${PYTHONPATH:+:$PYTHONPATH}
note twin-wheels twin what "Wheel folder .wheels/ (carried to the GPU machine)" value "$(find "$WHEELS" -name '*.whl' |
  wc -l) wheels for Python 3.12, $(du -sk "$WHEELS" | awk '{printf "%.1f MiB", $1 / 1024}'): $(cd "$WHEELS" && ls | tr '\n' ' ')"
stage twin-snapshot 120 twin_snapshot
stage twin-build 900 twin_build
cd "$SRC" || exit 1
stage twin-aot-3.6 900 "$PY" -m wbdit.kernels.aot --workers 2 --json "$RES/aot-triton-3.6.json" &&
  stage twin-aot-3.6-bounds 60 aot_ok "$RES/aot-triton-3.6.json"
if [ -x "$DEV_PY" ]; then
  # From the repo, where the dev venv's editable install points.
  stage twin-aot-dev 900 env -C "$ROOT" "$DEV_PY" -m wbdit.kernels.aot --workers 2 --json "$RES/aot-triton-dev.json"
  [ -s "$RES/aot-triton-dev.json" ] && COMPARE=(--compare "$RES/aot-triton-dev.json")
else
  note twin-aot-dev skip what "the dev venv's Triton table" why "no dev python at $DEV_PY"
fi
[ -s "$RES/aot-triton-3.6.json" ] && stage twin-aot-table 60 "$PY" -m wbdit.kernels.aot --rows "$RES/aot-triton-3.6.json" \
  "${COMPARE[@]}" --results "$ROOT/benchmarks/RESULTS.md"
stage twin-interpreter 900 twin_interpreter
note twin-interpreter pytest what "Interpreter tests under Triton 3.6 (numpy $NUMPY_INTERP for this stage only)" \
  summary "$(tail -n 1 <<<"$LAST_STAGE_LOG")"
stage twin-collect 300 "$PY" -m pytest -q -p no:cacheprovider --collect-only $GPU_TESTS $BENCH_FILES
note twin-collect pytest what "pytest --collect-only of the GPU tests and benchmarks" \
  summary "$(tail -n 1 <<<"$LAST_STAGE_LOG")"
gpu_stages gpu- 1
note twin twin what "GPU stage limits" value "${GPU_STAGES[*]} (seconds; $(check_limits | grep -o '[0-9]\+s' | head -1) of at most 540)"
note twin twin what "Twin total" value "$((SECONDS - T0)) s wall on $(nproc) cores, load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
cd "$ROOT" || exit 1
"$PY" benchmarks/gpu/report.py "$RESULTS" --section benchmarks/RESULTS.md --intro "$(date -u '+%Y-%m-%d %H:%M UTC'), \
git $WBDIT_GIT, on this CPU machine ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), \
$(nproc) cores shared with other jobs, no GPU). The suite's own output: $RES." >/dev/null
echo "twin done in $((SECONDS - T0))s; results: $RES; benchmarks/RESULTS.md updated; failed stages: $FAILED"
exit "$FAILED"
