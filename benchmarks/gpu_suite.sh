#!/usr/bin/env bash
# One call on a lent GPU machine (torch + CUDA, Triton, nvcc; no internet), under 10 minutes:
#   1. build:   pip install --no-build-isolation --no-deps -e .   (C++/CUDA extension included)
#   2. tests:   pytest tests -k "cuda or gpu"
#   3. bench:   benchmarks/test_bench_training.py, CUDA cases, --benchmark-json
#   4. compare: wbdit compare at the seed configuration (2000 synthetic genes, batch 256)
# then prints one table: per model variant, benchmark medians and the comparison's numbers.
#
# Usage: bash benchmarks/gpu_suite.sh
# Results (logs, bench.json, compare/, table.md) go to $OUT when set, else gpu-results/<UTC time>.
# Each stage has a time limit (seconds, below); a failing stage is reported and the rest still run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RES=${OUT:-gpu-results/$(date -u +%Y%m%dT%H%M%SZ)}
LIMIT_BUILD=150 LIMIT_TESTS=100 LIMIT_BENCH=80 LIMIT_COMPARE=240
mkdir -p "$RES"
unset TRITON_INTERPRET  # real GPU kernels, not the CPU interpreter
: > "$RES/stages.txt"

stage() {  # stage NAME LIMIT CMD...: run under a time limit, log to $RES/NAME.log, record rc and seconds
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$RES/stages.txt"
  tail -n 4 "$RES/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$RES/gpu.txt" 2>&1
echo "GPU: $(cat "$RES/gpu.txt")"
stage build "$LIMIT_BUILD" "$PY" -m pip install --no-build-isolation --no-deps -e .
stage tests "$LIMIT_TESTS" "$PY" -m pytest -q -p no:cacheprovider tests -k "cuda or gpu"
stage bench "$LIMIT_BENCH" "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_bench_training.py \
  --benchmark-only -k cuda --benchmark-json="$RES/bench.json"
EVAL_EVERY=5
"$PY" -c "import wbdit.evaluation" 2>/dev/null || { EVAL_EVERY=0; echo "wbdit.evaluation not importable: compare without quality metrics"; }
stage compare "$LIMIT_COMPARE" "$PY" -m wbdit compare --device cuda --preset seed --data synthetic \
  --n-cells 10000 --n-genes 2000 --epochs 10 --batch-size 256 --eval-every "$EVAL_EVERY" --out "$RES/compare"

"$PY" - "$RES" <<'EOF' | tee "$RES/table.md"
"""One table: benchmark medians (ms) and the comparison's per-epoch numbers, one row per variant."""
import json, sys
from pathlib import Path

res = Path(sys.argv[1])
rows, cols = {}, []
bench = res / "bench.json"
if bench.exists():
    for b in json.loads(bench.read_text())["benchmarks"]:
        p = b["params"]
        what = "train step" if b["name"].startswith("test_train_step") else "ddim10"
        col = f"{what} {p['config']} (ms)"
        cols += [col] if col not in cols else []
        rows.setdefault(p["variant"], {})[col] = f"{1e3 * b['stats']['median']:.2f}"
compare = res / "compare" / "compare.json"
machine = "?"
if compare.exists():
    report = json.loads(compare.read_text())
    machine = f"{report['machine']['device']}, torch {report['machine']['torch']}, {report['date']}"
    for name, m in report["models"].items():
        s = m["summary"]
        row = rows.setdefault(name, {})
        row["compare s/epoch"] = f"{s['epoch_time_s']:.3f}"
        row["cells/s"] = f"{s['cells_per_s']:.0f}"
        row["peak MiB"] = f"{s['peak_mem_bytes'] / 2**20:.0f}"
        for k in ("knn_auc", "mmd"):
            v = (s["eval"] or {}).get(k)
            row[k] = "-" if v is None else f"{v:.3g}"
    cols += ["compare s/epoch", "cells/s", "peak MiB", "knn_auc", "mmd"]
    ratios = ", ".join(f"{k} = {v:.2f}x" for k, v in report["speed_ratios"].items())
print(f"wbdit GPU suite on {machine}")
print("stages: " + "; ".join((res / "stages.txt").read_text().split("\n")).strip("; "))
print("benchmarks: B=256, medians; compare: seed config on 10000 synthetic cells x 2000 genes (wbdit.datasets.synthetic)")
print()
print("| variant | " + " | ".join(cols) + " |")
print("|---|" + "---:|" * len(cols))
for name, row in rows.items():
    print(f"| {name} | " + " | ".join(row.get(c, "-") for c in cols) + " |")
if compare.exists():
    print(f"\nper-epoch speed ratio (DiT / WB-DiT): {ratios}")
EOF
