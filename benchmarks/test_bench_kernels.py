"""MSSA and ISTA: the fused path vs the eager reference (vs torch SDPA with q = k = v for MSSA).

``pytest benchmarks/test_bench_kernels.py --benchmark-only``. One group per (op, pass, device,
shape), so each table holds the implementations side by side:

- CUDA (bf16): the seed shape (B=256, N=200, 8 heads x 96; ISTA on B*N rows of 768) and a
  larger one (B=64, N=1000, 16 heads x 64; ISTA 64000 x 1024). "fused" is the Triton kernel;
  every timed call ends with ``torch.cuda.synchronize()``.
- CPU (fp32): "fused" is what ``wbdit.ops`` runs with fused=True on CPU (cpu-sdpa,
  cpu-1gemm). Skipped under TRITON_INTERPRET=1, where fused=True means the interpreter: a
  correctness tool, not a fast path. ISTA on CPU runs at the seed configuration with batch 16
  ((16 x 200) x 768), as the CPU training step does.
- ISTA also times the two-GEMM form ``(x - x D^T) D`` (the previous fast path) and, on CUDA,
  the one-GEMM torch op (cuBLAS addmm + epilogue, "cublas-1gemm") that the Triton kernels must beat.

``extra_info`` carries the op's compulsory bytes (the kernels' cost model, the same for every
implementation of an op), the GEMM FLOPs the implementation performs (for ISTA they differ:
CRATE's form takes three GEMMs per row, the two-GEMM form two, the one-GEMM paths one plus
2 H^3 for B) and the implementation that ran, so each time can be read against the roofline:
TFLOP/s = flops / mean / 1e12.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from wbdit import fastpaths, ops
from wbdit.kernels import ista as kista
from wbdit.kernels import mssa as kmssa

HAS_CUDA = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (device, shape name, dims, dtype)
MSSA_CASES = [
    pytest.param("cpu", "small", (8, 200, 8, 96), torch.float32, id="cpu-small"),
    pytest.param("cuda", "seed", (256, 200, 8, 96), torch.bfloat16, id="cuda-seed"),
    pytest.param("cuda", "large", (64, 1000, 16, 64), torch.bfloat16, id="cuda-large"),
]
ISTA_CASES = [
    pytest.param("cpu", "seed-B16", (16 * 200, 768), torch.float32, id="cpu-seed-B16"),
    pytest.param("cuda", "seed", (256 * 200, 768), torch.bfloat16, id="cuda-seed"),
    pytest.param("cuda", "large", (64 * 1000, 1024), torch.bfloat16, id="cuda-large"),
]
ETA, LMBDA = 0.1, 0.1


def _sdpa(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """MSSA through torch's fused attention with q = k = v (flash backend for bf16 on CUDA)."""
    B, N, C = w.shape
    wh = w.view(B, N, num_heads, C // num_heads).transpose(1, 2)
    return F.scaled_dot_product_attention(wh, wh, wh).transpose(1, 2).reshape(B, N, C)


MSSA_IMPLS = {
    "reference": lambda w, h: ops.mssa(w, h, fused=False),
    "fused": lambda w, h: ops.mssa(w, h, fused=True),
    "sdpa": _sdpa,
}


def _ista_two_gemm(x: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """The previous fast path, for comparison: x D - x D^T D = (x - x D^T) D, two GEMMs."""
    x2 = x.reshape(-1, x.shape[-1])
    return F.relu(torch.addmm(x2, x2 - x2 @ D.t(), D, alpha=ETA) - ETA * LMBDA).view_as(x)


ISTA_IMPLS = {
    "reference": lambda x, D: ops.ista(x, D, ETA, LMBDA, fused=False),
    "two-gemm": _ista_two_gemm,
    "fused": lambda x, D: ops.ista(x, D, ETA, LMBDA, fused=True),
    "cublas-1gemm": lambda x, D: fastpaths.ista_one_gemm(x, D, ETA, LMBDA),
}
ISTA_GEMMS = {"reference": 3, "two-gemm": 2}  # GEMMs per row forward (twice that backward); else 1


def _ista_flops(impl: str, M: int, H: int, backward: bool) -> int:
    """GEMM FLOPs ``impl`` performs; the one-GEMM paths add 2 H^3 for B (and 2 H^3 for dD)."""
    if impl in ISTA_GEMMS:
        return ISTA_GEMMS[impl] * (3 if backward else 1) * 2 * M * H * H
    return kista.flops_and_bytes(kista.IstaShape(M, H, torch.float32), backward)[0]


def _skip_unavailable(device: str, impl: str) -> None:
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a GPU")
    if device == "cpu" and impl == "fused" and INTERPRETING:
        pytest.skip("TRITON_INTERPRET=1 makes fused=True run the interpreter")
    if device == "cpu" and impl == "sdpa":
        pytest.skip("on CPU the fused path is SDPA")
    if device == "cpu" and impl == "cublas-1gemm":
        pytest.skip("on CPU the fused path is this op (cpu-1gemm)")


def _timed(fn, device: str):
    """``fn`` followed by a device synchronize, so the time is the kernels', not the launch's."""

    def run():
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return result

    run()  # compile (Triton JIT, autotuned torch kernels) outside the timing
    return run


def _record(benchmark, group: str, op: str, impl: str, flops: int, nbytes: int) -> None:
    """Group, cost model and the implementation that ran (``wbdit.ops.report()`` for ops calls)."""
    benchmark.group = group
    ran = {"sdpa": "torch sdpa", "two-gemm": "two-gemm torch", "cublas-1gemm": "cublas-1gemm"}.get(impl)
    ran = ran or ops.report()[op]
    benchmark.extra_info.update({"flops": flops, "bytes": nbytes, "impl": ran})


@pytest.mark.parametrize("impl", list(MSSA_IMPLS))
@pytest.mark.parametrize("device,name,dims,dtype", MSSA_CASES)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_mssa(benchmark, impl, device, name, dims, dtype, backward):
    _skip_unavailable(device, impl)
    B, N, heads, d = dims
    g = torch.Generator().manual_seed(0)
    w = torch.randn(B, N, heads * d, generator=g).to(device, dtype).requires_grad_(backward)
    grad = torch.randn(B, N, heads * d, generator=g).to(device, dtype)
    fn = MSSA_IMPLS[impl]
    if backward:
        run = _timed(lambda: torch.autograd.grad(fn(w, heads), w, grad)[0], device)
    else:
        run = _timed(lambda: fn(w, heads), device)
    flops, nbytes = kmssa.flops_and_bytes(kmssa.MssaShape(B, N, heads, d, dtype), backward)
    _record(benchmark, f"mssa {'fwd+bwd' if backward else 'fwd'} {device} {name}", "mssa", impl, flops, nbytes)
    with torch.set_grad_enabled(backward):
        result = benchmark(run)
    assert result.shape == w.shape


@pytest.mark.parametrize("impl", list(ISTA_IMPLS))
@pytest.mark.parametrize("device,name,dims,dtype", ISTA_CASES)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_ista(benchmark, impl, device, name, dims, dtype, backward):
    _skip_unavailable(device, impl)
    M, H = dims
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, H, generator=g).to(device, dtype).requires_grad_(backward)
    D = (torch.randn(H, H, generator=g) / H**0.5).to(device, dtype).requires_grad_(backward)
    grad = torch.randn(M, H, generator=g).to(device, dtype)
    fn = ISTA_IMPLS[impl]
    if backward:
        run = _timed(lambda: torch.autograd.grad(fn(x, D), (x, D), grad)[0], device)
    else:
        run = _timed(lambda: fn(x, D), device)
    nbytes = kista.flops_and_bytes(kista.IstaShape(M, H, dtype), backward)[1]
    flops = _ista_flops(impl, M, H, backward)
    _record(benchmark, f"ista {'fwd+bwd' if backward else 'fwd'} {device} {name}", "ista", impl, flops, nbytes)
    with torch.set_grad_enabled(backward):
        result = benchmark(run)
    assert result.shape == x.shape
