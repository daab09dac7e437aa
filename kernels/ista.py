r"""The ISTA sparse-coding step of CRATE as fused Triton GEMM kernels.

Equals ``wbdit.reference.ista``: x (M, H) rows (leading dims flattened), dictionary D (H, H),
runtime scalars eta and lambda,

    out = relu(x + eta (x D - x D^T D) - eta lambda) = relu(x + eta r D - eta lambda),
    r   = x - x D^T                               (two GEMMs instead of CRATE's three)

Forward, two kernels:
    1. r   = x - x D^T                          GEMM with the residual in its epilogue
    2. out = relu(x + eta r D - eta lambda)     GEMM with step, residual and threshold fused
  r is kept for the backward (it is written anyway between the two GEMMs).

Backward. With z = x + eta r D - eta lambda and g = dout * [z > 0] = dout * [out > 0]
(the ReLU mask is recomputed from out, never stored):
    dL/dr = eta g D^T                  = eta s,  s := g D^T
    dx    = g + dL/dr - (dL/dr) D      = g + eta (s - s D)
    dD    = eta r^T g - (dL/dr)^T x    = eta (r^T g - s^T x)
  (D enters twice: through r D, giving eta r^T g, and through r = x - x D^T, whose
  derivative is d(x D^T)/dD = (dL/d(x D^T))^T x = -(eta s)^T x.) Three kernels:
    3. s  = g D^T                       g formed on the fly from dout and out
    4. dx = g + eta (s - s D)           GEMM with the epilogue
    5. dD = eta (r^T g - s^T x)         two GEMMs reducing over the M rows into one accumulator,
                                        split over M into fp32 partial sums when the (H, H) grid
                                        alone is too small to fill the GPU (summed in a fixed order)

Cost, M rows, width H: forward 2 GEMMs = 4 M H^2 FLOPs, backward 4 GEMMs = 8 M H^2 FLOPs.
Compulsory traffic in elements (each kernel reads its operands once and writes its result):
forward 5 M H + 2 H^2 (x, D -> r; r, D, x -> out), backward 12 M H + 3 H^2
(dout, out, D -> s; s, D, dout, out -> dx; r, s, x, dout, out -> dD).

Precision: fp32 accumulation; fp32 inputs use tf32x3 tensor-core products (about fp32
accuracy); r and s are stored in the input dtype, as the reference stores x D^T.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    TRITON_DTYPE,
    KernelSpec,
    autocast_inputs,
    check_device,
    dot_precision,
    int_arg,
    interpreter_upcast,
    on_device,
)


@triton.jit
def _rows_times_d(
    a_ptr, gate_ptr, d_ptr, offs_m, offs_n, M, H,
    TRANSPOSE_D: tl.constexpr, GATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """fp32 (BLOCK_M, BLOCK_N) tile of A op(D): op(D) = D^T if TRANSPOSE_D else D, A = a (M, H),
    or a * [gate > 0] if GATED (the ReLU mask of the backward, gate = out)."""
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < H
    rows = offs_m.to(tl.int64)[:, None] * H
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < H
        a_mask = m_ok[:, None] & k_ok[None, :]
        a = tl.load(a_ptr + rows + ks[None, :], mask=a_mask, other=0.0)
        if GATED:
            gate = tl.load(gate_ptr + rows + ks[None, :], mask=a_mask, other=0.0)
            a = tl.where(gate > 0, a, 0.0).to(a.dtype)
        if TRANSPOSE_D:  # op(D)[k, n] = D[n, k]
            b = tl.load(d_ptr + offs_n[None, :] * H + ks[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        else:
            b = tl.load(d_ptr + ks[:, None] * H + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _tile_ids(M, H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row and column offsets of this program's output tile. Column blocks vary fastest, so the
    programs running together share one row block of A (read from DRAM once, then from L2)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(H, BLOCK_N)
    offs_m = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n


@triton.jit
def _tile_ptrs(offs_m, offs_n, M, H):
    """Offsets into a row-major (M, H) tensor for the tile, and its in-bounds mask."""
    ptrs = offs_m.to(tl.int64)[:, None] * H + offs_n[None, :]
    return ptrs, (offs_m < M)[:, None] & (offs_n < H)[None, :]


@triton.jit
def _ista_residual_kernel(
    x_ptr, d_ptr, r_ptr, M, H,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """r = x - x D^T (forward kernel 1)."""
    offs_m, offs_n = _tile_ids(M, H, BLOCK_M, BLOCK_N)
    acc = _rows_times_d(x_ptr, x_ptr, d_ptr, offs_m, offs_n, M, H, True, False,
                        BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    ptrs, mask = _tile_ptrs(offs_m, offs_n, M, H)
    x = tl.load(x_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(r_ptr + ptrs, (x - acc).to(r_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ista_step_kernel(
    x_ptr, r_ptr, d_ptr, out_ptr, M, H, eta, threshold,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out = relu(x + eta r D - threshold), threshold = eta lambda (forward kernel 2)."""
    offs_m, offs_n = _tile_ids(M, H, BLOCK_M, BLOCK_N)
    acc = _rows_times_d(r_ptr, r_ptr, d_ptr, offs_m, offs_n, M, H, False, False,
                        BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    ptrs, mask = _tile_ptrs(offs_m, offs_n, M, H)
    x = tl.load(x_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    out = tl.maximum(x + eta * acc - threshold, 0.0)
    tl.store(out_ptr + ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ista_bwd_s_kernel(
    dout_ptr, out_ptr, d_ptr, s_ptr, M, H,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """s = g D^T with g = dout [out > 0] (backward kernel 3)."""
    offs_m, offs_n = _tile_ids(M, H, BLOCK_M, BLOCK_N)
    acc = _rows_times_d(dout_ptr, out_ptr, d_ptr, offs_m, offs_n, M, H, True, True,
                        BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    ptrs, mask = _tile_ptrs(offs_m, offs_n, M, H)
    tl.store(s_ptr + ptrs, acc.to(s_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ista_bwd_dx_kernel(
    dout_ptr, out_ptr, s_ptr, d_ptr, dx_ptr, M, H, eta,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dx = g + eta (s - s D) (backward kernel 4)."""
    offs_m, offs_n = _tile_ids(M, H, BLOCK_M, BLOCK_N)
    acc = _rows_times_d(s_ptr, s_ptr, d_ptr, offs_m, offs_n, M, H, False, False,
                        BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    ptrs, mask = _tile_ptrs(offs_m, offs_n, M, H)
    out = tl.load(out_ptr + ptrs, mask=mask, other=0.0)
    g = tl.where(out > 0, tl.load(dout_ptr + ptrs, mask=mask, other=0.0).to(tl.float32), 0.0)
    s = tl.load(s_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + ptrs, (g + eta * (s - acc)).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ista_bwd_dd_kernel(
    r_ptr, s_ptr, x_ptr, dout_ptr, out_ptr, dd_ptr, M, H, rows_per_split, eta,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dD[split] = eta (r^T g - s^T x) over rows [split * rows_per_split, +rows_per_split)
    (backward kernel 5). Tile (BLOCK_N rows of dD) x (BLOCK_K columns), BLOCK_M rows of x per step."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(H, BLOCK_N)
    num_k = tl.cdiv(H, BLOCK_K)
    split = pid // (num_n * num_k)
    tile_id = pid % (num_n * num_k)
    offs_n = (tile_id // num_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = (tile_id % num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < H
    k_ok = offs_k < H
    m_begin = split * rows_per_split
    m_end = tl.minimum(M, m_begin + rows_per_split)

    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        rows = ms.to(tl.int64)[:, None] * H
        m_ok = (ms < m_end)[:, None]
        r = tl.load(r_ptr + rows + offs_n[None, :], mask=m_ok & n_ok[None, :], other=0.0)
        s = tl.load(s_ptr + rows + offs_n[None, :], mask=m_ok & n_ok[None, :], other=0.0)
        k_mask = m_ok & k_ok[None, :]
        x = tl.load(x_ptr + rows + offs_k[None, :], mask=k_mask, other=0.0)
        out = tl.load(out_ptr + rows + offs_k[None, :], mask=k_mask, other=0.0)
        g = tl.where(out > 0, tl.load(dout_ptr + rows + offs_k[None, :], mask=k_mask, other=0.0), 0.0).to(x.dtype)
        acc = tl.dot(tl.trans(r), g, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(tl.trans(-s), x, acc, input_precision=DOT_PRECISION)

    ptrs = split.to(tl.int64) * H * H + offs_n[:, None] * H + offs_k[None, :]
    tl.store(dd_ptr + ptrs, (eta * acc).to(dd_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


# ------------------------------------------------------------------ configuration

# Enough programs for the dD reduction to fill a large GPU (132 SMs on an H100) a few times over.
_DD_TARGET_PROGRAMS = 512
_DD_MIN_ROWS_PER_SPLIT = 512


class IstaShape(NamedTuple):
    """Problem size of one ISTA call: x has ``rows`` (M) rows of ``width`` (H), D is (H, H)."""

    rows: int
    width: int
    dtype: torch.dtype


def _gemm_constexprs(shape: IstaShape) -> tuple[dict, int]:
    """Tile of the four (M, H) x (H, H) GEMM kernels, and their warp count (3 stages).

    16-bit: 128 x 128 output tiles, K steps of 64, 8 warps (96 KiB of shared memory on sm_90a).
    fp32 (tf32x3: high and low tf32 parts, twice the operand registers): 64 x 64, K steps of 16,
    4 warps. Only the dtype enters: masks handle any M and H.
    """
    if shape.dtype != torch.float32:
        return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "DOT_PRECISION": dot_precision(shape.dtype)}, 8
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "DOT_PRECISION": dot_precision(shape.dtype)}, 4


def dd_splits(shape: IstaShape, block_n: int, block_k: int) -> int:
    """Number of row splits of the dD reduction: enough programs to fill the GPU, each split
    at least ``_DD_MIN_ROWS_PER_SPLIT`` rows so the fp32 partial sums stay small."""
    tiles = triton.cdiv(shape.width, block_n) * triton.cdiv(shape.width, block_k)
    return max(1, min(triton.cdiv(_DD_TARGET_PROGRAMS, tiles), shape.rows // _DD_MIN_ROWS_PER_SPLIT))


def forward_specs(shape: IstaShape) -> list[KernelSpec]:
    """The two forward launches (residual, step) for ``shape``."""
    t = f"*{TRITON_DTYPE[shape.dtype]}"
    mh = {"M": int_arg(shape.rows), "H": int_arg(shape.width)}
    consts, warps = _gemm_constexprs(shape)
    return [
        KernelSpec("ista_residual", _ista_residual_kernel,
                   {"x_ptr": t, "d_ptr": t, "r_ptr": t, **mh}, consts, warps, 3),
        KernelSpec("ista_step", _ista_step_kernel,
                   {"x_ptr": t, "r_ptr": t, "d_ptr": t, "out_ptr": t, **mh,
                    "eta": "fp32", "threshold": "fp32"}, consts, warps, 3),
    ]


def backward_specs(shape: IstaShape) -> list[KernelSpec]:
    """The three backward launches (s, dx, dD) for ``shape``.

    dD tiles are (128, 128) in 16-bit / (64, 64) in fp32 output elements with 16-row reduction
    steps (the largest spill-free on sm_80): five operand tiles are read per step, so the output
    tile is what sets the reuse.
    """
    t = f"*{TRITON_DTYPE[shape.dtype]}"
    mh = {"M": int_arg(shape.rows), "H": int_arg(shape.width)}
    consts, warps = _gemm_constexprs(shape)
    wide = shape.dtype != torch.float32
    dd_tile = 128 if wide else 64
    dd_consts = {"BLOCK_M": 16, "BLOCK_N": dd_tile, "BLOCK_K": dd_tile, "DOT_PRECISION": dot_precision(shape.dtype)}
    splits = dd_splits(shape, dd_consts["BLOCK_N"], dd_consts["BLOCK_K"])
    dd_type = t if splits == 1 else "*fp32"
    return [
        KernelSpec("ista_bwd_s", _ista_bwd_s_kernel,
                   {"dout_ptr": t, "out_ptr": t, "d_ptr": t, "s_ptr": t, **mh}, consts, warps, 3),
        KernelSpec("ista_bwd_dx", _ista_bwd_dx_kernel,
                   {"dout_ptr": t, "out_ptr": t, "s_ptr": t, "d_ptr": t, "dx_ptr": t, **mh,
                    "eta": "fp32"}, consts, warps, 3),
        KernelSpec("ista_bwd_dD", _ista_bwd_dd_kernel,
                   {"r_ptr": t, "s_ptr": t, "x_ptr": t, "dout_ptr": t, "out_ptr": t, "dd_ptr": dd_type,
                    **mh, "rows_per_split": "i32:16", "eta": "fp32"},
                   dd_consts, 8 if wide else 4, 2),
    ]


def flops_and_bytes(shape: IstaShape, backward: bool) -> tuple[int, int]:
    """GEMM FLOPs and compulsory bytes (module docstring) of the forward, or forward + backward."""
    M, H, dtype = shape
    el = torch.empty((), dtype=dtype).element_size()
    flops, elements = 4 * M * H * H, 5 * M * H + 2 * H * H
    if backward:
        flops += 8 * M * H * H
        elements += 12 * M * H + 3 * H * H
    return flops, elements * el


# ------------------------------------------------------------------ launchers


def _gemm_grid(spec: KernelSpec, shape: IstaShape) -> tuple[int]:
    c = spec.constexprs
    return (triton.cdiv(shape.rows, c["BLOCK_M"]) * triton.cdiv(shape.width, c["BLOCK_N"]),)


def forward_into(x: Tensor, D: Tensor, eta: float, lmbda: float, r: Tensor, out: Tensor) -> None:
    """Write r = x - x D^T and out = relu(x + eta r D - eta lmbda); x, r, out (M, H), D (H, H),
    all contiguous and of one dtype. Every element of r and out is written."""
    shape = IstaShape(x.shape[0], x.shape[1], x.dtype)
    residual, step = forward_specs(shape)
    residual.launch(_gemm_grid(residual, shape), x, D, r, shape.rows, shape.width)
    step.launch(_gemm_grid(step, shape), x, r, D, out, shape.rows, shape.width, eta, eta * lmbda)


def backward_into(dout: Tensor, x: Tensor, D: Tensor, r: Tensor, out: Tensor, eta: float,
                  dx: Tensor, dD: Tensor) -> None:
    """Write dx (M, H) and dD (H, H) given dout and the forward's x, D, r, out (contiguous)."""
    shape = IstaShape(x.shape[0], x.shape[1], x.dtype)
    s_spec, dx_spec, dd_spec = backward_specs(shape)
    M, H = shape.rows, shape.width
    s = torch.empty_like(x)
    s_spec.launch(_gemm_grid(s_spec, shape), dout, out, D, s, M, H)
    dx_spec.launch(_gemm_grid(dx_spec, shape), dout, out, s, D, dx, M, H, eta)

    c = dd_spec.constexprs
    tiles = triton.cdiv(H, c["BLOCK_N"]) * triton.cdiv(H, c["BLOCK_K"])
    splits = dd_splits(shape, c["BLOCK_N"], c["BLOCK_K"])
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), c["BLOCK_M"]) * c["BLOCK_M"]
    partial = dD if splits == 1 else torch.empty((splits, H, H), device=x.device, dtype=torch.float32)
    dd_spec.launch((tiles * splits,), r, s, x, dout, out, partial, M, H, rows_per_split, eta)
    if splits > 1:
        dD.copy_(partial.sum(0))


# ------------------------------------------------------------------ torch.library ops


@torch.library.custom_op("wbdit::ista_triton_fwd", mutates_args=())
def ista_fwd(x: Tensor, D: Tensor, eta: float, lmbda: float) -> tuple[Tensor, Tensor]:
    """Fused ISTA forward on x (..., H): (out like x, r = x - x D^T like x)."""
    check_device(x, D)
    if D.dtype != x.dtype:
        raise TypeError(f"ISTA needs x and D of one dtype, got {x.dtype} and {D.dtype}")
    x2, Dc = interpreter_upcast(x.reshape(-1, x.shape[-1]).contiguous(), D.contiguous())
    r = torch.empty_like(x2)
    out = torch.empty_like(x2)
    with on_device(x):
        forward_into(x2, Dc, eta, lmbda, r, out)
    return out.to(x.dtype).view_as(x), r.to(x.dtype).view_as(x)


@ista_fwd.register_fake
def _ista_fwd_fake(x: Tensor, D: Tensor, eta: float, lmbda: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("wbdit::ista_triton_bwd", mutates_args=())
def ista_bwd(dout: Tensor, x: Tensor, D: Tensor, r: Tensor, out: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """Fused ISTA backward: (dx like x, dD like D) from dout and the forward's x, D, r, out."""
    check_device(dout, x, D, r, out)
    H = x.shape[-1]
    dout2, x2, Dc, r2, out2 = interpreter_upcast(
        *(t.reshape(-1, H).contiguous() for t in (dout, x, D, r, out)))
    dx = torch.empty_like(x2)
    dD = torch.empty_like(Dc)
    with on_device(x):
        backward_into(dout2, x2, Dc, r2, out2, eta, dx, dD)
    return dx.to(x.dtype).view_as(x), dD.to(D.dtype)


@ista_bwd.register_fake
def _ista_bwd_fake(dout: Tensor, x: Tensor, D: Tensor, r: Tensor, out: Tensor, eta: float):
    return torch.empty_like(x), torch.empty_like(D)


def _ista_setup_context(ctx, inputs, output) -> None:
    x, D, eta, _ = inputs
    out, r = output
    ctx.save_for_backward(x, D, r, out)
    ctx.eta = eta
    ctx.mark_non_differentiable(r)


def _ista_backward(ctx, dout: Tensor, dr: Tensor):
    x, D, r, out = ctx.saved_tensors
    dx, dD = ista_bwd(dout, x, D, r, out, ctx.eta)
    return dx, dD, None, None


ista_fwd.register_autograd(_ista_backward, setup_context=_ista_setup_context)


def ista(x: Tensor, D: Tensor, eta: float, lmbda: float) -> Tensor:
    """ISTA step ``relu(x + eta (x - x D^T) D - eta lmbda)`` on x (..., H), D (H, H), differentiable;
    equals ``wbdit.reference.ista``. Under ``torch.autocast`` x and D are cast to the autocast dtype."""
    x, D = autocast_inputs(x, D)
    return ista_fwd(x, D, float(eta), float(lmbda))[0]
