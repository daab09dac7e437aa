"""What every stage of ``benchmarks/gpu_suite.sh`` shares: the results file, skips, timing.

Each stage appends one JSON object per result to ``$RESULTS`` (``results.jsonl`` under the
suite's output folder) the moment it has it, so a stage that later fails or runs out of time
keeps what it measured. ``benchmarks/gpu/report.py`` turns the file into tables.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable

import torch

RESULTS_ENV = "RESULTS"
STAGE_ENV = "STAGE"
HAS_CUDA = torch.cuda.is_available()

# The seed configuration's per-op shape (DESIGN.md): batch 256, 2000 genes / patch 10 = 200
# tokens, hidden 768 = 8 heads of 96; bf16 as the trainer runs it on CUDA.
SEED_B, SEED_N, SEED_HEADS, SEED_D = 256, 200, 8, 96
SEED_H = SEED_HEADS * SEED_D
SEED_GENES, SEED_PATCH = 2000, 10


def record(kind: str, **fields) -> dict:
    """Append ``{"stage", "kind", **fields}`` to the results file (or only print, without one)."""
    row = {
        "stage": os.environ.get(STAGE_ENV, os.path.basename(sys.argv[0]).removesuffix(".py")),
        "kind": kind,
        **fields,
    }
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
    print(json.dumps(row, default=str), flush=True)
    return row


def skip(what: str, why: str = "no CUDA device") -> None:
    """Say (and record) that ``what`` did not run."""
    record("skip", what=what, why=why)


def shape_name(*dims: int) -> str:
    return "x".join(map(str, dims))


def bench_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of ``fn`` on the GPU: ``triton.testing.do_bench`` (CUDA events, the
    L2 flushed between calls, warm-up first so JIT compiles and handle creation stay out)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def cuda_time_ms(fn: Callable[[], object], iters: int) -> list[float]:
    """Per-call milliseconds of ``iters`` back-to-back calls, each between two CUDA events."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; inf when actual has NaN or inf."""
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


class Timer:
    """Wall-clock seconds of a block: ``with Timer() as t: ...; t.s``."""

    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.s = time.perf_counter() - self.t0
