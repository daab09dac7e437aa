r"""The ISTA sparse-coding step of CRATE as fused Triton GEMM kernels: one GEMM forward, two backward.

Equals ``wbdit.reference.ista``: x (M, H) rows (leading dims flattened), dictionary D (H, H),
runtime scalars eta and lambda. Before its ReLU the step is linear in x (DESIGN.md, "Cheaper
math, same function"):

    out = relu(x + eta (x D - x D^T D) - eta lambda) = relu(x + x B - eta lambda),
    B   = eta (D - D^T D)                            (H x H; CRATE's form takes three GEMMs per row)

B is formed in fp32 by ``wbdit.fastpaths.ista_matrix`` (one torch addmm, 2 H^3 FLOPs, once per
call, or once per sampling run when D is constant) and rounded once to x's dtype.

Forward, one kernel:
    1. out = relu(x + x B - eta lambda)   GEMM with residual, threshold and ReLU in its epilogue
  Nothing but x and out is kept for the backward.

Backward. With g = dout * [out > 0] (the ReLU mask is recomputed from out, never stored; g is
formed on the fly as the GEMM operands are loaded):
    2. dx = g + g B^T                     GEMM with the residual g in its epilogue
    3. dB = x^T g                         reduction over the M rows into fp32, split over M into
                                          fp32 partial sums when the (H, H) grid alone is too small
                                          to fill the GPU (summed in a fixed order)
  then dD = eta (dB - D (dB + dB^T)) in fp32 (``ista_matrix``'s backward: one H x H GEMM).

Cost, M rows, width H: forward 2 M H^2 + 2 H^3 FLOPs (the two-GEMM form 4 M H^2, CRATE's 6 M H^2),
backward 4 M H^2 + 2 H^3 (8 and 12 M H^2). Compulsory traffic, M x H tensors in x's dtype and
H x H ones in fp32 (B, dB, and D as an autocast master weight): forward 2 M H (x -> out) +
3 H^2 (D -> B, B read), backward 6 M H (dout, out -> dx; x, dout, out -> dB) + 5 H^2 (B read;
dB written; D, dB -> dD).

Precision: fp32 accumulation; fp32 inputs use tf32x3 tensor-core products (about fp32 accuracy).
16-bit inputs (unit roundoff u = 2^-8 in bf16, 2^-11 in fp16): B is rounded once, out and dx
once more; dB stays fp32. Elementwise, with |B| <= eta (|D| + |D|^T |D|) and g_n = n 2^-24
(n 2^-20 for the tests' allowance for GPU tensor cores, fp32 tf32x3 included):
    |out - exact| <= (3u + g_{H+2}) (|x| + |x| |B| + eta lambda) + (u + g_{H+2}) |x| |B|
(tests/test_ista.py checks this bound, and its analogues for dx and dD, on every path). Measured
on the torch path at H = 768, 3200 rows, bf16, kaiming-uniform D (the kernels round at the same
places): out within 0.38 % of max |out| (RMS 0.26 %), dx 0.24 % (0.18 %), dD 0.32 % (0.24 %) of
exact arithmetic with the path's own ReLU mask, against the bf16 reference's 0.52 % (0.28 %),
0.57 % (0.28 %), 0.46 % (0.36 %): that rounds x D^T, x D^T D and x D to 16 bits on the way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from wbdit import tuning
from wbdit.fastpaths import ista_matrix

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
def _rows_times_b(
    a_ptr,
    gate_ptr,
    b_ptr,
    offs_m,
    offs_n,
    M,
    H,
    TRANSPOSE_B: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """fp32 (BLOCK_M, BLOCK_N) tile of A op(B): op(B) = B^T if TRANSPOSE_B else B, A = a (M, H),
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
        if TRANSPOSE_B:  # op(B)[k, n] = B[n, k]
            b = tl.load(b_ptr + offs_n[None, :] * H + ks[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        else:
            b = tl.load(b_ptr + ks[:, None] * H + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
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
def _ista_fwd_kernel(
    x_ptr,
    b_ptr,
    out_ptr,
    M,
    H,
    threshold,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out = relu(x + x B - threshold), threshold = eta lambda (forward kernel 1)."""
    offs_m, offs_n = _tile_ids(M, H, BLOCK_M, BLOCK_N)
    acc = _rows_times_b(
        x_ptr, x_ptr, b_ptr, offs_m, offs_n, M, H, False, False, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION
    )
    ptrs, mask = _tile_ptrs(offs_m, offs_n, M, H)
    x = tl.load(x_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    out = tl.maximum(x + acc - threshold, 0.0)
    tl.store(out_ptr + ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ista_bwd_dx_kernel(
    dout_ptr,
    out_ptr,
    b_ptr,
    dx_ptr,
    M,
    H,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dx = g + g B^T with g = dout [out > 0] (backward kernel 2)."""
    offs_m, offs_n = _tile_ids(M, H, BLOCK_M, BLOCK_N)
    acc = _rows_times_b(
        dout_ptr, out_ptr, b_ptr, offs_m, offs_n, M, H, True, True, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION
    )
    ptrs, mask = _tile_ptrs(offs_m, offs_n, M, H)
    out = tl.load(out_ptr + ptrs, mask=mask, other=0.0)
    g = tl.where(out > 0, tl.load(dout_ptr + ptrs, mask=mask, other=0.0).to(tl.float32), 0.0)
    tl.store(dx_ptr + ptrs, (g + acc).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ista_bwd_db_kernel(
    x_ptr,
    dout_ptr,
    out_ptr,
    db_ptr,
    M,
    H,
    rows_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dB[split] = x^T g (fp32) over rows [split * rows_per_split, +rows_per_split) (backward
    kernel 3). Tile (BLOCK_N rows of dB) x (BLOCK_K columns), BLOCK_M rows of x per step."""
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
        x = tl.load(x_ptr + rows + offs_n[None, :], mask=m_ok & n_ok[None, :], other=0.0)
        k_mask = m_ok & k_ok[None, :]
        out = tl.load(out_ptr + rows + offs_k[None, :], mask=k_mask, other=0.0)
        g = tl.where(out > 0, tl.load(dout_ptr + rows + offs_k[None, :], mask=k_mask, other=0.0), 0.0).to(x.dtype)
        acc = tl.dot(tl.trans(x), g, acc, input_precision=DOT_PRECISION)

    ptrs = split.to(tl.int64) * H * H + offs_n[:, None] * H + offs_k[None, :]
    tl.store(db_ptr + ptrs, acc, mask=n_ok[:, None] & k_ok[None, :])


# ------------------------------------------------------------------ configuration

# Enough programs for the dB reduction to fill a large GPU (132 SMs on an H100) a few times over.
_DB_TARGET_PROGRAMS = 512
_DB_MIN_ROWS_PER_SPLIT = 512


class IstaShape(NamedTuple):
    """Problem size of one ISTA call: x has ``rows`` (M) rows of ``width`` (H), B is (H, H)."""

    rows: int
    width: int
    dtype: torch.dtype


# Built-in heuristics, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) by "16-bit?" (the dtype is all
# they read: masks handle any M and H). The GEMM kernels (forward, dx): 16-bit 128 x 128 output
# tiles, K steps of 64, 8 warps (96 KiB of shared memory on sm_90a); fp32 (tf32x3: high and low
# tf32 parts, twice the operand registers) 64 x 64, K steps of 16, 4 warps. The dB reduction:
# (BLOCK_N, BLOCK_K) is the dB tile, BLOCK_M the rows per step; three operand tiles (x, dout,
# out) are read per step, so the output tile is what sets the reuse.
_GEMM_CONFIGS = {True: (128, 128, 64, 8, 3), False: (64, 64, 16, 4, 3)}
_DB_CONFIGS = {True: (32, 128, 128, 8, 2), False: (32, 64, 64, 4, 2)}


def _config(kernel: str, shape: IstaShape, defaults: dict) -> tuple[dict, int, int]:
    """(constexprs, warps, stages) of ``kernel``: a measured winner for this GPU (``wbdit.tuning``,
    keyed by dtype and width), else the heuristic."""
    block_m, block_n, block_k, warps, stages = tuning.choose(
        kernel, tuning.config_key(shape.dtype, shape.width), defaults[shape.dtype != torch.float32]
    )
    consts = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "DOT_PRECISION": dot_precision(shape.dtype)}
    return consts, warps, stages


def db_splits(shape: IstaShape, block_n: int, block_k: int) -> int:
    """Number of row splits of the dB reduction: enough programs to fill the GPU, each split
    at least ``_DB_MIN_ROWS_PER_SPLIT`` rows so the fp32 partial sums stay few."""
    tiles = triton.cdiv(shape.width, block_n) * triton.cdiv(shape.width, block_k)
    return max(1, min(triton.cdiv(_DB_TARGET_PROGRAMS, tiles), shape.rows // _DB_MIN_ROWS_PER_SPLIT))


def forward_specs(shape: IstaShape) -> list[KernelSpec]:
    """The one forward launch for ``shape``."""
    t = f"*{TRITON_DTYPE[shape.dtype]}"
    return [
        KernelSpec(
            "ista_fwd",
            _ista_fwd_kernel,
            {
                "x_ptr": t,
                "b_ptr": t,
                "out_ptr": t,
                "M": int_arg(shape.rows),
                "H": int_arg(shape.width),
                "threshold": "fp32",
            },
            *_config("ista_fwd", shape, _GEMM_CONFIGS),
        ),
    ]


def backward_specs(shape: IstaShape) -> list[KernelSpec]:
    """The two backward launches (dx, dB) for ``shape``."""
    t = f"*{TRITON_DTYPE[shape.dtype]}"
    mh = {"M": int_arg(shape.rows), "H": int_arg(shape.width)}
    return [
        KernelSpec(
            "ista_bwd_dx",
            _ista_bwd_dx_kernel,
            {"dout_ptr": t, "out_ptr": t, "b_ptr": t, "dx_ptr": t, **mh},
            *_config("ista_bwd_dx", shape, _GEMM_CONFIGS),
        ),
        KernelSpec(
            "ista_bwd_dB",
            _ista_bwd_db_kernel,
            {"x_ptr": t, "dout_ptr": t, "out_ptr": t, "db_ptr": "*fp32", **mh, "rows_per_split": "i32:16"},
            *_config("ista_bwd_dB", shape, _DB_CONFIGS),
        ),
    ]


def flops_and_bytes(shape: IstaShape, backward: bool) -> tuple[int, int]:
    """GEMM FLOPs and compulsory bytes (module docstring) of the forward, or forward + backward."""
    M, H, dtype = shape
    el = torch.empty((), dtype=dtype).element_size()
    flops, rows, squares = 2 * M * H * H + 2 * H**3, 2 * M * H, 3 * H * H
    if backward:
        flops += 4 * M * H * H + 2 * H**3
        rows += 6 * M * H
        squares += 5 * H * H
    return flops, rows * el + squares * 4


# ------------------------------------------------------------------ launchers


def _gemm_grid(spec: KernelSpec, shape: IstaShape) -> tuple[int]:
    c = spec.constexprs
    return (triton.cdiv(shape.rows, c["BLOCK_M"]) * triton.cdiv(shape.width, c["BLOCK_N"]),)


def forward_into(x: Tensor, B: Tensor, threshold: float, out: Tensor) -> None:
    """Write out = relu(x + x B - threshold); x, out (M, H), B (H, H), all contiguous and of one
    dtype. Every element of out is written."""
    shape = IstaShape(x.shape[0], x.shape[1], x.dtype)
    (step,) = forward_specs(shape)
    step.launch(_gemm_grid(step, shape), x, B, out, shape.rows, shape.width, threshold)


def backward_into(dout: Tensor, x: Tensor, B: Tensor, out: Tensor, dx: Tensor, dB: Tensor) -> None:
    """Write dx (M, H) and dB = x^T g (H, H) float32 given dout and the forward's x, B, out
    (contiguous; dout, x, B, out, dx of one dtype)."""
    shape = IstaShape(x.shape[0], x.shape[1], x.dtype)
    dx_spec, db_spec = backward_specs(shape)
    M, H = shape.rows, shape.width
    dx_spec.launch(_gemm_grid(dx_spec, shape), dout, out, B, dx, M, H)

    c = db_spec.constexprs
    tiles = triton.cdiv(H, c["BLOCK_N"]) * triton.cdiv(H, c["BLOCK_K"])
    splits = db_splits(shape, c["BLOCK_N"], c["BLOCK_K"])
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), c["BLOCK_M"]) * c["BLOCK_M"]
    partial = dB if splits == 1 else torch.empty((splits, H, H), device=x.device, dtype=torch.float32)
    db_spec.launch((tiles * splits,), x, dout, out, partial, M, H, rows_per_split)
    if splits > 1:
        torch.sum(partial, 0, out=dB)


# ------------------------------------------------------------------ torch.library ops


@torch.library.custom_op("wbdit::ista_triton_fwd", mutates_args=())
def ista_fwd(x: Tensor, B: Tensor, threshold: float) -> Tensor:
    """Fused ISTA forward ``relu(x + x B - threshold)``: x (..., H), B (H, H) (``ista_matrix``,
    rounded here to x's dtype) -> like x."""
    Bc = B.to(x.dtype).contiguous()  # the one rounding of B
    check_device(x, Bc)
    H = x.shape[-1]
    x2, Bc = interpreter_upcast(x.reshape(-1, H).contiguous(), Bc)
    out = torch.empty_like(x2)
    with on_device(x):
        forward_into(x2, Bc, threshold, out)
    return out.to(x.dtype).view_as(x)


@ista_fwd.register_fake
def _ista_fwd_fake(x: Tensor, B: Tensor, threshold: float) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("wbdit::ista_triton_bwd", mutates_args=())
def ista_bwd(dout: Tensor, x: Tensor, B: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """Fused ISTA backward: (dx like x, dB (H, H) float32) from dout and the forward's x, B, out
    (dout like x)."""
    Bc = B.to(x.dtype)
    check_device(dout, x, Bc, out)
    H = x.shape[-1]
    dout2, x2, Bc, out2 = interpreter_upcast(*(t.reshape(-1, H).contiguous() for t in (dout, x, Bc, out)))
    dx = torch.empty_like(x2)
    dB = torch.empty_like(B, dtype=torch.float32)
    with on_device(x):
        backward_into(dout2, x2, Bc, out2, dx, dB)
    return dx.to(x.dtype).view_as(x), dB


@ista_bwd.register_fake
def _ista_bwd_fake(dout: Tensor, x: Tensor, B: Tensor, out: Tensor):
    return torch.empty_like(x), torch.empty_like(B, dtype=torch.float32)


def _ista_setup_context(ctx, inputs, output) -> None:
    x, B, _ = inputs
    ctx.save_for_backward(x, B, output)


def _ista_backward(ctx, dout: Tensor):
    x, B, out = ctx.saved_tensors
    dx, dB = ista_bwd(dout, x, B, out)
    return dx, dB, None


ista_fwd.register_autograd(_ista_backward, setup_context=_ista_setup_context)


def ista(x: Tensor, D: Tensor, eta: float, lmbda: float, B: Tensor | None = None) -> Tensor:
    """ISTA step ``relu(x + x B - eta lmbda)``, B = eta (D - D^T D), on x (..., H), D (H, H),
    differentiable; equals ``wbdit.reference.ista``. ``B``: ``ista_matrix(D, eta)`` formed by the
    caller when D is constant (sampling), else formed here. Under ``torch.autocast`` x is cast to
    the autocast dtype; B is formed in fp32 either way."""
    (x,) = autocast_inputs(x)
    if B is None:
        B = ista_matrix(D, eta)
    return ista_fwd(x, B, float(eta * lmbda))
