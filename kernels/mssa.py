r"""Multi-head subspace self-attention (MSSA) of CRATE as fused flash-style Triton kernels.

Equals ``wbdit.reference.mssa``. Per batch b and head h, with W = w[b, :, h*d:(h+1)*d]
(N x d), Q = K = V = W because MSSA has one projection, and c = d^-1/2:

Forward
    S = c W W^T            (N x N, symmetric)
    P = softmax_rows(S),   L_i = log2 sum_j 2^(log2(e) S_ij) = log2(e) logsumexp_j S_ij   (saved, fp32)
    O = P W
  One program owns a block I of BLOCK_M rows and streams the key blocks J of W once:
  the tile W_J loaded for S_IJ = c W_I W_J^T is the same tile used for P_IJ W_J (one read
  stream serves K and V). Online softmax keeps a running max and sum per row, so the
  N x N matrix never reaches memory. exp is computed as exp2 with log2(e) folded into c, and L
  stays in those log2 units, so the backward recomputes P = 2^(S' - L) from the same scaled
  scores S' = log2(e) S the forward used, with no unit conversion (and its rounding) between.

Backward (given dO = dL/dO)
    delta_i = sum_k dO_ik O_ik                       (preprocessing kernel, fp32)
    dP = dO W^T,   dS = P * (dP - delta 1^T)         (softmax backward)
    dQ = c dS W,   dK = c dS^T W,   dV = P^T dO
    dW = dQ + dK + dV = c (dS + dS^T) W + P^T dO
  Symmetry: S_JI = S_IJ^T, so one product S_IJ = c W_I W_J^T gives both directions,
    P_IJ       = 2^(S'_IJ - L_I 1^T)       (row I as query)
    (P_JI)^T   = 2^(S'_IJ - 1 L_J^T)       (row I as key / value)
    (dP_JI)^T  = W_I dO_J^T
    (dS_JI)^T  = (P_JI)^T * ((dP_JI)^T - 1 delta_J^T)
  and the program for block I accumulates all three gradients of W_I in registers:
    dW_I = sum_J c (dS_IJ + (dS_JI)^T) W_J + (P_JI)^T dO_J.
  Five GEMMs per (I, J) tile pair (S, dP, dP^T, the dS product, the P^T product), the same
  count as the flash-attention-2 backward, but with no atomics and no second dQ pass: each
  dW row block is written once, deterministically. Exploiting symmetry further (visiting
  only J >= I) would save S and share tiles but needs atomic adds into dW_J.

Cost per (b, h), N tokens, head dim d (padded to BLOCK_D, a power of two, inside the kernel;
the padding is masked, so d = 96 computes on 128 columns):
    forward   4 N^2 d FLOPs (2 GEMMs);  compulsory bytes: read w, write O (N d each) + 4 N for L
    backward 10 N^2 d FLOPs (5 GEMMs);  compulsory bytes: read w, O, dO, write dW (N d each)
                                        + 12 N (read L, write and read delta)
The streamed re-reads of W_J (and dO_J) hit L2: the (b, h) slice is N d elements (38 KB at
N = 200, d = 96, bf16).

Precision: fp32 accumulation everywhere; fp32 inputs use tf32x3 tensor-core products
(about fp32 accuracy; the interpreter multiplies in fp32 through numpy's BLAS); P and dS are
rounded to the input dtype before their GEMMs, as in flash attention, so 16-bit results differ
from the reference by 16-bit rounding. In fp32, two steps of every flash backward lose accuracy
on large inputs, both of order u c |w|^2 |dO| (u = 2^-24; gamma_d ~ d u bounds the relative
error of a d-term dot in any summation order):
  1. P is recomputed from a fresh score s'_IJ against the forward's L. Two roundings of one
     score c w_i.w_j differ by up to 2 c gamma_d sum_k |w_ik w_jk|, so the backward's rows of P
     sum to 1 only within that (the reference normalises its own scores: a one-hot row stays
     exactly one-hot). Whether the two roundings agree depends on the tile shapes and the BLAS
     kernel: OpenBLAS's Haswell sgemm gives different scores for the forward's and the
     backward's tiles, its SkylakeX and Sandybridge kernels the same ones at this test's shapes.
  2. delta = rowsum(dO * O) cancels against dP in dP - delta: two roundings of sums of size
     sum_k |dO_ik w_ik|, multiplied by c w in dW.
On one-hot rows (scores far apart, as when |w| is large) these give, to first order,
    |dW_kernel - dW|_ik <= 2 c gamma_d (|w_i|^2 |dO_ik| + 2 (sum_k' |dO_ik' w_ik'|) |w_ik|),
(97% of the complete first-order bound there). For d = 64, w ~ N(0, 10^2), dO ~ N(0, 1) it
is 1e-2 (median) to 5e-2 (max) on dW entries of size ~1; the largest error measured through the
interpreter is 9e-4 with OpenBLAS's Haswell kernel, 6e-4 Sandybridge, 2.5e-4 SkylakeX.
tests/test_mssa.py holds dW to the complete first-order bound, elementwise.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from wbdit import tuning

from .common import (
    TRITON_DTYPE,
    KernelSpec,
    autocast_inputs,
    check_device,
    dot_precision,
    int_arg,
    interpreter_upcast,
    next_pow2,
    on_device,
)

LOG2E = 1.4426950408889634


@triton.jit
def _mssa_fwd_kernel(
    w_ptr,
    out_ptr,
    lse_ptr,
    N,
    C,
    NUM_HEADS,
    HEAD_DIM,
    qk_scale_log2,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[b, I, h] = softmax(c W_I W^T) W and lse[b, h, I] (log2 units); grid (B * heads, cdiv(N, BLOCK_M))."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // NUM_HEADS
    h = pid_bh % NUM_HEADS
    base = b.to(tl.int64) * N * C + h * HEAD_DIM  # element offset of W[b, 0, h, 0]

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N
    q = tl.load(w_ptr + base + offs_m[:, None] * C + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of S (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(S - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < N
        kv = tl.load(w_ptr + base + cols[:, None] * C + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(kv), input_precision=DOT_PRECISION) * qk_scale_log2
        s = tl.where(n_ok[None, :], s, float("-inf"))
        # Column 0 is in the first block, so m_new is finite from the first iteration on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(
        out_ptr + base + offs_m[:, None] * C + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    tl.store(lse_ptr + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def _mssa_bwd_delta_kernel(
    out_ptr,
    dout_ptr,
    delta_ptr,
    N,
    C,
    NUM_HEADS,
    HEAD_DIM,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta[b, h, i] = sum_k dO[b, i, h, k] O[b, i, h, k] in fp32; grid (B * heads, cdiv(N, BLOCK_M))."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // NUM_HEADS
    h = pid_bh % NUM_HEADS
    base = b.to(tl.int64) * N * C + h * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    ptrs = base + offs_m[:, None] * C + offs_d[None, :]
    o = tl.load(out_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * N + offs_m, tl.sum(o * do, 1), mask=m_ok)


@triton.jit
def _mssa_bwd_kernel(
    w_ptr,
    dout_ptr,
    lse_ptr,
    delta_ptr,
    dw_ptr,
    N,
    C,
    NUM_HEADS,
    HEAD_DIM,
    sm_scale,
    qk_scale_log2,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dW_I = sum_J c (dS_IJ + dS_JI^T) W_J + P_JI^T dO_J (module docstring);
    grid (B * heads, cdiv(N, BLOCK_M))."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // NUM_HEADS
    h = pid_bh % NUM_HEADS
    base = b.to(tl.int64) * N * C + h * HEAD_DIM
    row_base = pid_bh.to(tl.int64) * N  # offset of lse / delta rows of (b, h)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N
    i_mask = m_ok[:, None] & d_ok[None, :]
    i_ptrs = base + offs_m[:, None] * C + offs_d[None, :]
    w_i = tl.load(w_ptr + i_ptrs, mask=i_mask, other=0.0)
    do_i = tl.load(dout_ptr + i_ptrs, mask=i_mask, other=0.0)
    # lse = +inf past N makes every probability of a padding row exactly 0.
    lse_i = tl.load(lse_ptr + row_base + offs_m, mask=m_ok, other=float("inf"))
    delta_i = tl.load(delta_ptr + row_base + offs_m, mask=m_ok, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < N
        j_mask = n_ok[:, None] & d_ok[None, :]
        j_ptrs = base + cols[:, None] * C + offs_d[None, :]
        w_j = tl.load(w_ptr + j_ptrs, mask=j_mask, other=0.0)
        do_j = tl.load(dout_ptr + j_ptrs, mask=j_mask, other=0.0)
        lse_j = tl.load(lse_ptr + row_base + cols, mask=n_ok, other=float("inf"))
        delta_j = tl.load(delta_ptr + row_base + cols, mask=n_ok, other=0.0)

        s = tl.dot(w_i, tl.trans(w_j), input_precision=DOT_PRECISION) * qk_scale_log2  # S'_IJ, as in the forward
        p = tl.exp2(s - lse_i[:, None])  # P_IJ
        p_t = tl.exp2(s - lse_j[None, :])  # (P_JI)^T: S is symmetric; 0 in padding columns
        dp = tl.dot(do_i, tl.trans(w_j), input_precision=DOT_PRECISION)  # dP_IJ
        dp_t = tl.dot(w_i, tl.trans(do_j), input_precision=DOT_PRECISION)  # (dP_JI)^T
        # Padding columns J have W_J = dO_J = 0, so their p entries meet zero rows of W_J below.
        ds = p * (dp - delta_i[:, None]) + p_t * (dp_t - delta_j[None, :])  # dS_IJ + (dS_JI)^T
        acc = tl.dot((ds * sm_scale).to(w_j.dtype), w_j, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(p_t.to(do_j.dtype), do_j, acc, input_precision=DOT_PRECISION)

    tl.store(dw_ptr + i_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=i_mask)


# ------------------------------------------------------------------ configuration


class MssaShape(NamedTuple):
    """Problem size of one MSSA call: w is (batch, n, heads * head_dim) of ``dtype``."""

    batch: int
    n: int
    heads: int
    head_dim: int
    dtype: torch.dtype


# (16-bit inputs, BLOCK_D) -> (BLOCK_M, BLOCK_N, num_warps, num_stages), chosen with the ptxas
# numbers of ``python -m wbdit.kernels.aot`` (benchmarks/RESULTS.md): the largest tiles that stay
# spill-free on sm_80 and sm_90a (all but the fp32 backward at BLOCK_D = 128, which spills within
# the bound documented in ``aot.spill_bound``). The forward holds a BLOCK_M x BLOCK_D accumulator and two score
# tiles; the backward holds W_I, dO_I, the dW_I accumulator and five BLOCK_M x BLOCK_N tiles, so
# its tiles are smaller. fp32 runs tf32x3 (each product split into a high and a low tf32 part:
# twice the operand registers, three MMAs), which needs the smallest tiles; it is the exact path
# for tests and fp32 training, bf16 is the fast one. N does not enter: masks handle any N, and
# short sequences are launch-bound whatever the tile.
_FWD_CONFIGS = {
    (True, 32): (128, 64, 4, 2),
    (True, 64): (128, 64, 4, 2),
    (True, 128): (128, 64, 8, 2),
    (False, 32): (64, 32, 4, 2),
    (False, 64): (32, 32, 4, 2),
    (False, 128): (16, 32, 4, 2),
}
_BWD_CONFIGS = {
    (True, 32): (64, 64, 4, 2),
    (True, 64): (64, 32, 4, 2),
    (True, 128): (64, 32, 4, 2),
    (False, 32): (32, 16, 4, 1),
    (False, 64): (16, 16, 4, 1),
    (False, 128): (16, 16, 8, 1),
}


MAX_HEAD_DIM = 128  # one head's tile must sit in registers next to the score tile


def _block_d(head_dim: int) -> int:
    """Head dim padded to a power of two (masked in the kernels), at least 32, at most 128."""
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"MSSA kernels support head dims up to {MAX_HEAD_DIM}, got {head_dim}")
    return max(32, next_pow2(head_dim))


def _types(shape: MssaShape) -> tuple[str, dict[str, str]]:
    """Triton type of the tensor pointers and of the integer arguments every MSSA kernel takes."""
    ints = {
        "N": int_arg(shape.n),
        "C": int_arg(shape.heads * shape.head_dim),
        "NUM_HEADS": int_arg(shape.heads),
        "HEAD_DIM": int_arg(shape.head_dim),
    }
    return f"*{TRITON_DTYPE[shape.dtype]}", ints


def forward_specs(shape: MssaShape) -> list[KernelSpec]:
    """The forward launch for ``shape``; its tile depends on the padded head dim and the dtype."""
    t, ints = _types(shape)
    block_d = _block_d(shape.head_dim)
    block_m, block_n, warps, stages = tuning.choose(  # a measured winner for this GPU, if any
        "mssa_fwd", tuning.config_key(shape.dtype, block_d), _FWD_CONFIGS[(shape.dtype != torch.float32, block_d)]
    )
    return [
        KernelSpec(
            "mssa_fwd",
            _mssa_fwd_kernel,
            {"w_ptr": t, "out_ptr": t, "lse_ptr": "*fp32", **ints, "qk_scale_log2": "fp32"},
            {"BLOCK_D": block_d, "BLOCK_M": block_m, "BLOCK_N": block_n, "DOT_PRECISION": dot_precision(shape.dtype)},
            warps,
            stages,
        )
    ]


def backward_specs(shape: MssaShape) -> list[KernelSpec]:
    """The backward launches for ``shape``: the delta preprocessing, then the dW kernel."""
    t, ints = _types(shape)
    block_d = _block_d(shape.head_dim)
    block_m, block_n, warps, stages = tuning.choose(  # a measured winner for this GPU, if any
        "mssa_bwd", tuning.config_key(shape.dtype, block_d), _BWD_CONFIGS[(shape.dtype != torch.float32, block_d)]
    )
    delta = KernelSpec(
        "mssa_bwd_delta",
        _mssa_bwd_delta_kernel,
        {"out_ptr": t, "dout_ptr": t, "delta_ptr": "*fp32", **ints},
        {"BLOCK_D": block_d, "BLOCK_M": 32},
        4,
        1,
    )
    dw = KernelSpec(
        "mssa_bwd",
        _mssa_bwd_kernel,
        {
            "w_ptr": t,
            "dout_ptr": t,
            "lse_ptr": "*fp32",
            "delta_ptr": "*fp32",
            "dw_ptr": t,
            **ints,
            "sm_scale": "fp32",
            "qk_scale_log2": "fp32",
        },
        {"BLOCK_D": block_d, "BLOCK_M": block_m, "BLOCK_N": block_n, "DOT_PRECISION": dot_precision(shape.dtype)},
        warps,
        stages,
    )
    return [delta, dw]


def flops_and_bytes(shape: MssaShape, backward: bool) -> tuple[int, int]:
    """GEMM FLOPs (padding excluded) and compulsory bytes of the forward, or of forward + backward."""
    B, N, H, d, _ = shape
    el = torch.empty((), dtype=shape.dtype).element_size()
    flops = 4 * B * H * N * N * d
    nbytes = 2 * B * N * H * d * el + 4 * B * H * N
    if backward:
        flops += 10 * B * H * N * N * d
        nbytes += 4 * B * N * H * d * el + 12 * B * H * N
    return flops, nbytes


# ------------------------------------------------------------------ launchers


def _shape(w: Tensor, num_heads: int) -> MssaShape:
    B, N, C = w.shape
    if C % num_heads:
        raise ValueError(f"width {C} is not divisible by {num_heads} heads")
    return MssaShape(B, N, num_heads, C // num_heads, w.dtype)


def forward_into(w: Tensor, num_heads: int, out: Tensor, lse: Tensor) -> None:
    """Write MSSA(w) into ``out`` (like w) and the rows' log-sum-exp into ``lse`` (B, heads, N) fp32,
    in log2 units: ``log2(e) * logsumexp(w_h w_h^T d^-1/2)`` (module docstring).

    w must be contiguous (B, N, heads * d); every element of out and lse is written.
    """
    shape = _shape(w, num_heads)
    (spec,) = forward_specs(shape)
    grid = (shape.batch * num_heads, triton.cdiv(shape.n, spec.constexprs["BLOCK_M"]))
    spec.launch(grid, w, out, lse, shape.n, w.shape[2], num_heads, shape.head_dim, shape.head_dim**-0.5 * LOG2E)


def backward_into(dout: Tensor, w: Tensor, out: Tensor, lse: Tensor, num_heads: int, dw: Tensor) -> None:
    """Write dL/dw into ``dw`` given dL/dout; all tensors contiguous, lse from :func:`forward_into`."""
    shape = _shape(w, num_heads)
    delta_spec, dw_spec = backward_specs(shape)
    delta = torch.empty_like(lse)
    bh = shape.batch * num_heads
    C = w.shape[2]
    delta_spec.launch(
        (bh, triton.cdiv(shape.n, delta_spec.constexprs["BLOCK_M"])),
        out,
        dout,
        delta,
        shape.n,
        C,
        num_heads,
        shape.head_dim,
    )
    grid = (bh, triton.cdiv(shape.n, dw_spec.constexprs["BLOCK_M"]))
    c = shape.head_dim**-0.5
    dw_spec.launch(grid, w, dout, lse, delta, dw, shape.n, C, num_heads, shape.head_dim, c, c * LOG2E)


# ------------------------------------------------------------------ torch.library ops


@torch.library.custom_op("wbdit::mssa_triton_fwd", mutates_args=())
def mssa_fwd(w: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    """Fused MSSA forward: (out like w, lse (B, heads, N) fp32 in log2 units, see :func:`forward_into`)."""
    check_device(w)
    (wc,) = interpreter_upcast(w.contiguous())
    out = torch.empty_like(wc)
    lse = torch.empty((w.shape[0], num_heads, w.shape[1]), device=w.device, dtype=torch.float32)
    with on_device(w):
        forward_into(wc, num_heads, out, lse)
    return out.to(w.dtype), lse


@mssa_fwd.register_fake
def _mssa_fwd_fake(w: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(w), w.new_empty((w.shape[0], num_heads, w.shape[1]), dtype=torch.float32)


@torch.library.custom_op("wbdit::mssa_triton_bwd", mutates_args=())
def mssa_bwd(dout: Tensor, w: Tensor, out: Tensor, lse: Tensor, num_heads: int) -> Tensor:
    """Fused MSSA backward: dL/dw from dL/dout and the forward's w, out, lse."""
    check_device(dout, w, out)
    dout_c, wc, out_c = interpreter_upcast(dout.contiguous(), w.contiguous(), out.contiguous())
    dw = torch.empty_like(wc)
    with on_device(w):
        backward_into(dout_c, wc, out_c, lse.contiguous(), num_heads, dw)
    return dw.to(w.dtype)


@mssa_bwd.register_fake
def _mssa_bwd_fake(dout: Tensor, w: Tensor, out: Tensor, lse: Tensor, num_heads: int) -> Tensor:
    return torch.empty_like(w)


def _mssa_setup_context(ctx, inputs, output) -> None:
    w, num_heads = inputs
    out, lse = output
    ctx.save_for_backward(w, out, lse)
    ctx.num_heads = num_heads
    ctx.mark_non_differentiable(lse)


def _mssa_backward(ctx, dout: Tensor, dlse: Tensor):
    w, out, lse = ctx.saved_tensors
    return mssa_bwd(dout, w, out, lse, ctx.num_heads), None


mssa_fwd.register_autograd(_mssa_backward, setup_context=_mssa_setup_context)


def mssa(w: Tensor, num_heads: int) -> Tensor:
    """Subspace self-attention with Q = K = V = w (B, N, heads * d), differentiable; equals
    ``wbdit.reference.mssa``. Under ``torch.autocast`` w is cast to the autocast dtype."""
    (w,) = autocast_inputs(w)
    return mssa_fwd(w, num_heads)[0]
