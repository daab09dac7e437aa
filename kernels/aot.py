"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90a, on a machine without a GPU.

For every launch the dispatch heuristics can choose (``forward_specs`` / ``backward_specs`` of
:mod:`wbdit.kernels.mssa` and :mod:`wbdit.kernels.ista`) this compiles the kernel with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, runs the wheel's
``ptxas -v`` on the PTX for registers and spills, reads shared memory from the compiled
metadata, and looks for tensor-core instructions in the PTX (``mma.sync`` on sm_80,
``wgmma.mma_async`` or ``mma.sync`` on sm_90a).

Besides the heuristics' choices it compiles the measured winners of the winners file
(:mod:`wbdit.tuning`, per architecture) and every alternative the GPU suite's tile sweep times
(``tuning.SWEEP``), so a sweep on a lent GPU only times configurations known to compile and fit.

``python -m wbdit.kernels.aot`` prints the resource table in Markdown; ``--json PATH`` also
writes the rows (``--rows PATH`` reads them back instead of compiling), ``--compare OTHER.json``
puts the rows another Triton version wrote beside these, ``--results benchmarks/RESULTS.md``
rewrites that file's section
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
from typing import Any, NamedTuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from wbdit import tuning

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
    roles: str  # why it is compiled: "heuristic", "winner sm_90", "sweep" (comma-separated)
    triton: str
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


class Config(NamedTuple):
    """One configuration to compile: the dtype name, the launch, and why it is in the table."""

    dtype: str
    spec: KernelSpec
    roles: tuple[str, ...]


def _dispatch_specs(dtype: torch.dtype) -> list[KernelSpec]:
    """Every launch the dispatch makes for the covered shapes in ``dtype``, seed shape first."""
    specs = []
    for B, N, H, d in [SEED_MSSA, LARGE_MSSA, *TEST_MSSA]:
        shape = mssa.MssaShape(B, N, H, d, dtype)
        specs += mssa.forward_specs(shape) + mssa.backward_specs(shape)
    for M, H in [SEED_ISTA, LARGE_ISTA, *TEST_ISTA]:
        shape = ista.IstaShape(M, H, dtype)
        specs += ista.forward_specs(shape) + ista.backward_specs(shape)
    return specs


def _sweep_specs() -> list[tuple[torch.dtype, KernelSpec]]:
    """The seed-shape launches of every ``tuning.SWEEP`` alternative, in the key's dtype."""
    out = []
    for kernel, keys in tuning.SWEEP.items():
        for key, configs in keys.items():
            dtype = getattr(torch, key.split("/")[0])
            for config in configs:
                with tuning.forced({kernel: config}):
                    mssa_shape = mssa.MssaShape(*SEED_MSSA, dtype)
                    ista_shape = ista.IstaShape(*SEED_ISTA, dtype)
                    specs = (
                        mssa.forward_specs(mssa_shape)
                        + mssa.backward_specs(mssa_shape)
                        + ista.forward_specs(ista_shape)
                        + ista.backward_specs(ista_shape)
                    )
                out += [(dtype, s) for s in specs if s.name == kernel]
    return out


def all_specs() -> list[Config]:
    """Every distinct configuration (kernel, dtype, constexprs, warps, stages): the heuristics'
    choices over the covered shapes and dtypes (no GPU: no winners apply), the winners the
    winners file holds for each architecture, and the sweep's alternatives. Heuristic shapes are
    visited seed first, so a configuration is compiled with the integer divisibility hints of the
    first shape that chose it."""
    found: list[tuple[str, torch.dtype, KernelSpec]] = []
    for dtype in DTYPES:
        with tuning.for_arch(None):  # the heuristics, even on a machine with a GPU
            found += [("heuristic", dtype, s) for s in _dispatch_specs(dtype)]
    for arch in tuning.load():
        for dtype in DTYPES:
            with tuning.for_arch(arch):
                found += [(f"winner {arch}", dtype, s) for s in _dispatch_specs(dtype)]
    found += [("sweep", dtype, s) for dtype, s in _sweep_specs()]

    seen: dict[tuple, Config] = {}
    for role, dtype, spec in found:
        key = (spec.name, dtype, tuple(sorted(spec.constexprs.items())), spec.num_warps, spec.num_stages)
        name = str(dtype).replace("torch.", "")
        prev = seen.get(key)
        if prev is None:
            seen[key] = Config(name, spec, (role,))
        elif role not in prev.roles and not (role.startswith("winner") and "heuristic" in prev.roles):
            # A winner equal to the heuristic is no news; a sweep alternative that won is.
            seen[key] = prev._replace(roles=prev.roles + (role,))
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
        log = subprocess.run(
            [ptxas, "-v", f"--gpu-name={GPU_NAME[arch]}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas output:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_spec(config: Config, arch: int) -> Resources:
    """Compile ``config`` for ``arch`` (80 or 90) and measure what it uses."""
    dtype, spec, roles = config
    if interpreting():
        raise RuntimeError("AOT compilation needs real Triton kernels: unset TRITON_INTERPRET")
    compiled = triton.compile(
        _source(spec),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    ptx = compiled.asm["ptx"]
    regs, spill_st, spill_ld = _ptxas_usage(ptx, arch)
    return Resources(
        spec.name,
        GPU_NAME[arch],
        dtype,
        ",".join(roles),
        triton.__version__,
        dict(spec.constexprs),
        spec.num_warps,
        spec.num_stages,
        regs,
        spill_st,
        spill_ld,
        compiled.metadata.shared,
        SMEM_LIMIT[arch],
        "mma.sync" in ptx,
        "wgmma.mma_async" in ptx,
    )


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
    return compile_spec(all_specs()[index], arch)


def compile_all(workers: int | None = None) -> list[Resources]:
    """Compile every covered launch for every architecture, in parallel processes."""
    jobs = [(i, arch) for i in range(len(all_specs())) for arch in ARCHS]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(_compile_job, jobs))


def _row_key(r: Resources) -> tuple:
    return r.kernel, r.arch, r.dtype, json.dumps(r.constexprs, sort_keys=True), r.num_warps, r.num_stages


def _tensor_cores(r: Resources) -> str:
    return "wgmma" if r.wgmma else "mma" if r.mma else "none"


def _tiles(r: Resources) -> str:
    return " ".join(f"{k.replace('BLOCK_', 'B')}={v}" for k, v in r.constexprs.items() if k.startswith("BLOCK_"))


def _label(r: Resources) -> str:
    return f"{r.kernel} {r.dtype} {r.arch} {_tiles(r)} w{r.num_warps} s{r.num_stages}"


def _resources(r: Resources) -> tuple[str, str, str, str]:
    return str(r.registers), f"{r.spill_stores}/{r.spill_loads}", str(r.shared_bytes), _tensor_cores(r)


def markdown_table(rows: list[Resources], other: list[Resources] | None = None) -> str:
    """The resource table, one row per kernel, configuration and architecture. With ``other``
    (the same configurations compiled by another Triton version), each resource cell reads
    "this / other" where the two differ."""
    by_key = {_row_key(r): r for r in other or []}
    versions = f" ({rows[0].triton} / {other[0].triton} where they differ)" if rows and other else ""
    head = (
        "| kernel | arch | dtype | tiles | warps | stages | why | regs | spill st/ld (B) | smem (B) "
        "| tensor cores |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        cells = _resources(r)
        if other is not None:
            o = by_key.get(_row_key(r))
            theirs = _resources(o) if o else ("-",) * 4
            cells = tuple(a if a == b else f"{a} / {b}" for a, b in zip(cells, theirs))
        config = f"| {r.kernel} | {r.arch} | {r.dtype} | {_tiles(r)} | {r.num_warps} | {r.num_stages} | {r.roles} | "
        lines.append(config + " | ".join(cells) + " |")
    return (f"Resources{versions}:\n\n" if versions else "") + head + "\n".join(lines) + "\n"


def differences(rows: list[Resources], other: list[Resources]) -> list[str]:
    """What changes between two Triton versions' tables, one line per kind of resource."""
    by_key = {_row_key(r): r for r in other}
    pairs = [(r, by_key[_row_key(r)]) for r in rows if _row_key(r) in by_key]
    a, b = (rows[0].triton, other[0].triton) if pairs else ("?", "?")
    out = [f"{len(pairs)} of {len(rows)} configurations compiled by both Triton {a} and {b}."]
    deltas = sorted(r.registers - o.registers for r, o in pairs)
    changed = [d for d in deltas if d]
    if changed:
        out.append(
            f"Registers differ in {len(changed)} ({a} minus {b}: from {changed[0]:+d} to {changed[-1]:+d}, "
            f"median {changed[len(changed) // 2]:+d}); equal in {len(deltas) - len(changed)}."
        )
    else:
        out.append("Registers: equal everywhere.")
    for what, get in (
        ("Spills (stores/loads B)", lambda r: f"{r.spill_stores}/{r.spill_loads}"),
        ("Shared memory (B)", lambda r: str(r.shared_bytes)),
        ("Tensor cores", _tensor_cores),
    ):
        diff = [f"{_label(r)}: {get(r)} vs {get(o)}" for r, o in pairs if get(r) != get(o)]
        out.append(f"{what}: " + ("; ".join(diff) if diff else "equal everywhere") + ".")
    return out


def results_section(rows: list[Resources], other: list[Resources] | None = None) -> str:
    """The RESULTS.md section: how the table was made, the differences to ``other``, the table."""
    versions = f"Triton {rows[0].triton}" + (f" and Triton {other[0].triton}" if other else "")
    text = (
        f"{RESULTS_HEADING}\n\n"
        f"`python -m wbdit.kernels.aot` ({versions}, each wheel's own ptxas; no GPU needed; "
        "`bash benchmarks/gpu_suite.sh --twin` makes both). Every configuration the dispatch heuristics choose for "
        "the seed shape (MSSA B=256, N=200, 8 heads x 96; ISTA 51200 x 768), the larger benchmark shape and the "
        "test shapes (why = heuristic), the measured winners of `wbdit/tuning.json` (why = winner sm_XX) and the "
        "alternatives the GPU suite's tile sweep times (why = sweep, `wbdit.tuning.SWEEP`). fp32 runs tf32x3 "
        f"tensor-core products, 16-bit runs native ones; smem limits per block: sm_80 {SMEM_LIMIT[80]} B, "
        f"sm_90a {SMEM_LIMIT[90]} B. Spills: none, except the documented bound of `spill_bound` (fp32 MSSA "
        "backward at head dim > 64).\n\n"
    )
    if other:
        text += "".join(f"- {line}\n" for line in differences(rows, other)) + "\n"
    return text + markdown_table(rows, other)


def update_results(path: str, rows: list[Resources], other: list[Resources] | None = None) -> None:
    """Replace (or append) this section of the Markdown file at ``path``, leaving the rest alone."""
    text = "# Results\n"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    section = results_section(rows, other)
    start = text.find(RESULTS_HEADING)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(RESULTS_HEADING))
        text = text[:start] + section + ("" if end < 0 else text[end:])
    with open(path, "w") as f:
        f.write(text)


def _read_rows(path: str) -> list[Resources]:
    with open(path) as f:
        return [Resources(**r) for r in json.load(f)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--rows", help="take the rows from this --json file instead of compiling")
    parser.add_argument("--compare", help="rows another Triton version wrote with --json, shown beside these")
    parser.add_argument("--results", help="rewrite this Markdown file's resource section")
    parser.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: all cores)")
    args = parser.parse_args(argv)
    rows = _read_rows(args.rows) if args.rows else compile_all(args.workers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    other = _read_rows(args.compare) if args.compare else None
    if args.results:
        update_results(args.results, rows, other)
    if other:
        sys.stdout.write("".join(f"{line}\n" for line in differences(rows, other)))
    sys.stdout.write(markdown_table(rows, other))


if __name__ == "__main__":
    main()
