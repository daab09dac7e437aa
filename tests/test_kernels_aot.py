"""Every Triton kernel compiles for sm_80 and sm_90a without a GPU, within the hardware's budget.

For each configuration the dispatch heuristics choose (seed, benchmark and test shapes; fp32
and bf16; forward and backward), ``python -m wbdit.kernels.aot`` compiles the kernel ahead of
time and runs the wheel's ``ptxas -v``. It runs in a subprocess without TRITON_INTERPRET: the
interpreter (which the other tests use on CPU) replaces kernels by Python functions that
cannot be compiled. Each configuration must compile, stay within its spill bound (zero unless
documented in ``aot.spill_bound``), fit the architecture's shared memory, and multiply on
tensor cores (mma on sm_80; wgmma or mma on sm_90a).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from wbdit.kernels import aot

CONFIGS = [(dtype, spec.name, spec.constexprs, spec.num_warps, spec.num_stages) for dtype, spec, _ in aot.all_specs()]


def _key(dtype, kernel, constexprs, warps, stages, arch):
    return (kernel, dtype, json.dumps(constexprs, sort_keys=True), warps, stages, arch)


@pytest.fixture(scope="module")
def resources(tmp_path_factory):
    """Rows of the resource table, keyed by configuration and architecture."""
    out = tmp_path_factory.mktemp("aot") / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "wbdit.kernels.aot", "--json", str(out)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stdout)  # the table, shown with pytest -s
    rows = [aot.Resources(**r) for r in json.loads(out.read_text())]
    return {_key(r.dtype, r.kernel, r.constexprs, r.num_warps, r.num_stages, r.arch): r for r in rows}


def test_covers_seed_shape_in_both_dtypes():
    names = {(dtype, name) for dtype, name, *_ in CONFIGS}
    for dtype in ("float32", "bfloat16"):
        for kernel in ("mssa_fwd", "mssa_bwd_delta", "mssa_bwd", "ista_fwd", "ista_bwd_dx", "ista_bwd_dB"):
            assert (dtype, kernel) in names


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize(
    "dtype,kernel,constexprs,warps,stages",
    CONFIGS,
    ids=[f"{n}-{d}-" + "-".join(f"{v}" for k, v in c.items() if k.startswith("BLOCK_")) for d, n, c, *_ in CONFIGS],
)
def test_kernel_fits_the_gpu(resources, arch, dtype, kernel, constexprs, warps, stages):
    r = resources[_key(dtype, kernel, constexprs, warps, stages, arch)]
    assert 0 < r.registers <= 255
    assert r.spill_stores <= aot.spill_bound(r), f"{r.spill_stores} B of register spills"
    assert r.shared_bytes <= r.smem_limit
    if kernel not in aot.NO_GEMM:
        assert r.mma if arch == "sm_80" else (r.wgmma or r.mma), "GEMMs do not use tensor cores"
