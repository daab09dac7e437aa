"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90a, on a machine without a GPU.

For every launch the dispatch heuristics can choose (``forward_specs`` / ``backward_specs`` of
:mod:`wbdit.kernels.mssa` and :mod:`wbdit.kernels.ista`) this compiles the kernel with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, runs the wheel's
``ptxas -v`` on the PTX for registers and spills, reads shared memory from the compiled
metadata, and looks for tensor-core instructions in the PTX (``mma.sync`` on sm_80,
``wgmma.mma_async`` or ``mma.sync`` on sm_90a).

``python -m wbdit.kernels.aot`` prints the resource table in Markdown; ``--json PATH`` also
writes the rows, ``--results benchmarks/RESULTS.md`` rewrites that file's section
"Triton kernel resources (AOT, no GPU)". Run it without ``TRITON_INTERPRET=1``: interpreted
kernels cannot be compiled.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import ista, mssa
from .common import KernelSpec, interpreting

ARCHS = (80, 90)
# Largest shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin):
# A100 163 KiB, H100 227 KiB (the SM has 164 / 228 KiB; 1 KiB is reserved per block).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
GPU_NAME = {80: "sm_80", 90: "sm_90a"}
# Kernels without a GEMM (so no tensor-core instructions are expected).
NO_GEMM = {"mssa_bwd_delta"}
RESULTS_HEADING = "## Triton kernel resources (AOT, no GPU)"

# Shapes the AOT check covers: the seed configuration (B=256, N=200, 8 heads of 96; ISTA on
# B*N rows of 768), the larger benchmark shape, and the shapes of tests/test_mssa.py and
# tests/test_ista.py. The heuristics read only the dtype and (MSSA) the padded head dim, so these
# test shapes, one per head dim, reach every configuration the tests run.
SEED_MSSA = (256, 200, 8, 96)
LARGE_MSSA = (64, 1000, 16, 64)
SEED_ISTA = (256 * 200, 768)
LARGE_ISTA = (64 * 1000, 1024)
TEST_MSSA = [(2, 1, 2, 32), (3, 7, 2, 64), (1, 200, 2, 96), (1, 257, 1, 128)]
TEST_ISTA = [(1, 32), (14, 96), (600, 48), (257, 128), (1028, 32)]
DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class Resources:
    """What one compiled kernel uses on one architecture."""

    kernel: str
    arch: str
    dtype: str
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    smem_limit: int
    mma: bool
    wgmma: bool


def all_specs() -> list[tuple[str, KernelSpec]]:
    """(dtype name, spec) for every distinct configuration (kernel, dtype, constexprs, warps, stages)
    over the covered shapes and dtypes. Shapes are visited seed first, so a configuration is
    compiled with the integer divisibility hints of the first shape that chose it."""
    seen: dict[tuple, tuple[str, KernelSpec]] = {}
    for dtype in DTYPES:
        specs = []
        for B, N, H, d in [SEED_MSSA, LARGE_MSSA, *TEST_MSSA]:
            shape = mssa.MssaShape(B, N, H, d, dtype)
            specs += mssa.forward_specs(shape) + mssa.backward_specs(shape)
        for M, H in [SEED_ISTA, LARGE_ISTA, *TEST_ISTA]:
            shape = ista.IstaShape(M, H, dtype)
            specs += ista.forward_specs(shape) + ista.backward_specs(shape)
        for spec in specs:
            key = (spec.name, dtype, tuple(sorted(spec.constexprs.items())), spec.num_warps, spec.num_stages)
            seen.setdefault(key, (str(dtype).replace("torch.", ""), spec))
    return list(seen.values())


def _source(spec: KernelSpec) -> ASTSource:
    """ASTSource for ``spec``. Pointers carry the 16-byte alignment hint the JIT infers for
    torch allocations; an integer typed ``"i32:16"`` is known divisible by 16, as the JIT would
    specialize it for that shape."""
    fn = spec.kernel
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in spec.constexprs:
            signature[name] = "constexpr"
            constexprs[name] = spec.constexprs[name]
            continue
        ty, _, hint = spec.arg_types[name].partition(":")
        signature[name] = ty
        if ty.startswith("*") or hint == "16":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from the wheel's ``ptxas -v``."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-v", f"--gpu-name={GPU_NAME[arch]}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas output:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_spec(dtype: str, spec: KernelSpec, arch: int) -> Resources:
    """Compile ``spec`` for ``arch`` (80 or 90) and measure what it uses."""
    if interpreting():
        raise RuntimeError("AOT compilation needs real Triton kernels: unset TRITON_INTERPRET")
    compiled = triton.compile(_source(spec), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    ptx = compiled.asm["ptx"]
    regs, spill_st, spill_ld = _ptxas_usage(ptx, arch)
    return Resources(spec.name, GPU_NAME[arch], dtype, dict(spec.constexprs), spec.num_warps, spec.num_stages,
                     regs, spill_st, spill_ld, compiled.metadata.shared, SMEM_LIMIT[arch], "mma.sync" in ptx,
                     "wgmma.mma_async" in ptx)


def spill_bound(r: Resources) -> int:
    """Spill bytes (stores) allowed for ``r``: none, except the fp32 MSSA backward at head dims
    above 64 (BLOCK_D = 128). tf32x3 splits every operand into high and low tf32 parts, so W_I,
    dO_I, W_J, dO_J at 128 columns plus the dW_I accumulator outgrow 255 registers even at 16 x 16
    score tiles; ptxas spills up to 400 B per thread on sm_90a. fp32 is the exact path for tests
    and fp32 training; 16-bit (the training path) is spill-free everywhere."""
    if r.kernel == "mssa_bwd" and r.dtype == "float32" and r.constexprs.get("BLOCK_D") == 128:
        return 512
    return 0


def _compile_job(job: tuple[int, int]) -> Resources:
    """Worker: (spec index, arch). Specs are rebuilt in the worker: JIT functions do not pickle."""
    index, arch = job
    dtype, spec = all_specs()[index]
    return compile_spec(dtype, spec, arch)


def compile_all(workers: int | None = None) -> list[Resources]:
    """Compile every covered launch for every architecture, in parallel processes."""
    jobs = [(i, arch) for i in range(len(all_specs())) for arch in ARCHS]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(_compile_job, jobs))


def markdown_table(rows: list[Resources]) -> str:
    """The resource table, one row per kernel, configuration and architecture."""
    head = ("| kernel | arch | dtype | tiles | warps | stages | regs | spill st/ld (B) | smem (B) | tensor cores |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        tiles = " ".join(f"{k.replace('BLOCK_', 'B')}={v}" for k, v in r.constexprs.items() if k.startswith("BLOCK_"))
        tc = "wgmma" if r.wgmma else "mma" if r.mma else "none"
        lines.append(f"| {r.kernel} | {r.arch} | {r.dtype} | {tiles} | {r.num_warps} | {r.num_stages} | "
                     f"{r.registers} | {r.spill_stores}/{r.spill_loads} | {r.shared_bytes} | {tc} |")
    return head + "\n".join(lines) + "\n"


def results_section(rows: list[Resources]) -> str:
    """The RESULTS.md section: how the table was made, then the table."""
    return (f"{RESULTS_HEADING}\n\n"
            f"`python -m wbdit.kernels.aot --results benchmarks/RESULTS.md` (Triton {triton.__version__}, "
            "the wheel's ptxas; no GPU needed). Every configuration the dispatch heuristics choose for the seed "
            "shape (MSSA B=256, N=200, 8 heads x 96; ISTA 51200 x 768), the larger benchmark shape and the test "
            "shapes. fp32 runs tf32x3 tensor-core products, 16-bit runs native ones; smem limits per block: "
            f"sm_80 {SMEM_LIMIT[80]} B, sm_90a {SMEM_LIMIT[90]} B. Spills: none, except the documented bound "
            "of `spill_bound` (fp32 MSSA backward at head dim > 64).\n\n" + markdown_table(rows))


def update_results(path: str, rows: list[Resources]) -> None:
    """Replace (or append) this section of the Markdown file at ``path``, leaving the rest alone."""
    text = "# Results\n"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    section = results_section(rows)
    start = text.find(RESULTS_HEADING)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(RESULTS_HEADING))
        text = text[:start] + section + ("" if end < 0 else text[end:])
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--results", help="rewrite this Markdown file's resource section")
    parser.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: all cores)")
    args = parser.parse_args(argv)
    rows = compile_all(args.workers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    if args.results:
        update_results(args.results, rows)
    sys.stdout.write(markdown_table(rows))


if __name__ == "__main__":
    main()
