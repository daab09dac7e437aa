"""Fast paths written with plain torch ops (CPU, and cuBLAS/SDPA on CUDA), offered to ``wbdit.ops``.

They use the cheaper forms of DESIGN.md ("Cheaper math, same function") and are tested against
``wbdit.reference`` like every other fast path. ``register_ops`` is the same protocol as
``wbdit.kernels`` and ``wbdit.extension``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _on_cpu(*args) -> bool:
    return next(a for a in args if isinstance(a, Tensor)).device.type == "cpu"


def _on_cuda(*args) -> bool:
    return next(a for a in args if isinstance(a, Tensor)).is_cuda


def mssa_sdpa(w: Tensor, num_heads: int) -> Tensor:
    """MSSA as SDPA with q = k = v: (B, N, heads * d) -> (B, N, heads * d)."""
    B, N, C = w.shape
    wh = w.view(B, N, num_heads, C // num_heads).transpose(1, 2)
    return F.scaled_dot_product_attention(wh, wh, wh).transpose(1, 2).reshape(B, N, C)


def _autocast_dtype(x: Tensor) -> Tensor:
    """Inside ``torch.autocast`` x in the autocast dtype, as autocast runs the reference's F.linear."""
    device = x.device.type
    return x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x


def _matrix_dtype(D: Tensor) -> torch.dtype:
    return torch.promote_types(D.dtype, torch.float32)  # 16-bit D: fp32; float64 stays float64


@torch.library.custom_op("wbdit::ista_matrix", mutates_args=())
def _ista_matrix(D: Tensor, eta: float) -> Tensor:
    Dw = D.to(_matrix_dtype(D))
    with torch.autocast(D.device.type, enabled=False):  # autocast reaches into custom ops: B keeps its dtype
        return torch.addmm(Dw, Dw.t(), Dw, beta=eta, alpha=-eta)


@_ista_matrix.register_fake
def _ista_matrix_fake(D: Tensor, eta: float) -> Tensor:
    return torch.empty_like(D, dtype=_matrix_dtype(D))


def _ista_matrix_setup(ctx, inputs, output) -> None:
    D, eta = inputs
    ctx.save_for_backward(D)
    ctx.eta = eta


def _ista_matrix_backward(ctx, dB: Tensor):
    # B = eta (D - D^T D): dD = eta (dB - D (dB + dB^T)), one H x H GEMM (autograd of D^T D takes two).
    (D,) = ctx.saved_tensors
    dB = dB.to(_matrix_dtype(D))
    return torch.addmm(dB, D.to(dB.dtype), dB + dB.t(), beta=ctx.eta, alpha=-ctx.eta).to(D.dtype), None


_ista_matrix.register_autograd(_ista_matrix_backward, setup_context=_ista_matrix_setup)


def ista_matrix(D: Tensor, eta: float) -> Tensor:
    """B = eta (D - D^T D): D (H, H) -> B (H, H) in float32 (float64 for a float64 D), differentiable in D.

    ISTA before its ReLU is ``x + x B - eta lambda`` (DESIGN.md, "Cheaper math, same function"):
    every fast path multiplies by B once instead of by D two or three times. 2 H^3 FLOPs.
    """
    return _ista_matrix(D, float(eta))


@torch.library.custom_op("wbdit::ista_1gemm", mutates_args=())
def ista_apply(x: Tensor, B: Tensor, threshold: float) -> Tensor:
    """``relu(x + x B - threshold)``: x (..., H), B (H, H) from ``ista_matrix`` -> like x.

    One GEMM (``torch.addmm``: cuBLAS on CUDA tensors) with the residual as its addend, then the
    threshold and ReLU in place. B is rounded once to x's dtype; the GEMM accumulates in fp32.
    """
    x2 = x.reshape(-1, x.shape[-1])
    with torch.autocast(x.device.type, enabled=False):  # x's dtype is the compute dtype (fake agrees)
        out = torch.addmm(x2, x2, B.to(x.dtype))
    return out.sub_(threshold).relu_().view_as(x)


@ista_apply.register_fake
def _ista_apply_fake(x: Tensor, B: Tensor, threshold: float) -> Tensor:
    return torch.empty_like(x)


def _ista_apply_setup(ctx, inputs, output) -> None:
    x, B, _ = inputs
    ctx.save_for_backward(x, B, output)


def _ista_apply_backward(ctx, dout: Tensor):
    # g = dout [out > 0] (the ReLU mask from the output, nothing else stored):
    # dx = g + g B^T, dB = x^T g (two GEMMs where CRATE's form takes six).
    x, B, out = ctx.saved_tensors
    H = x.shape[-1]
    g = torch.ops.aten.threshold_backward(dout, out, 0).reshape(-1, H)  # 0.5 ms; where(out > 0, ...) 6 ms
    x2 = x.reshape(-1, H)
    dx = torch.addmm(g, g, B.to(x.dtype).t()).view_as(x)
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):  # cuBLAS can keep the fp32 sums
        dB = torch.mm(x2.t(), g, out_dtype=torch.float32)
    else:
        dB = (x2.t() @ g).to(B.dtype)
    return dx, dB, None


ista_apply.register_autograd(_ista_apply_backward, setup_context=_ista_apply_setup)


def ista_one_gemm(x: Tensor, D: Tensor, eta: float, lmbda: float, B: Tensor | None = None) -> Tensor:
    """ISTA step ``relu(x + x B - eta lmbda)``, B = eta (D - D^T D), equal to ``wbdit.reference.ista``:
    x (..., H), D (H, H) -> like x. ``B``: ``ista_matrix(D, eta)`` formed by the caller when D is
    constant (sampling), else formed here, differentiably. Under ``torch.autocast`` x runs in the
    autocast dtype; B is formed in fp32 either way."""
    if B is None:
        B = ista_matrix(D, eta)
    return ista_apply(_autocast_dtype(x), B, float(eta * lmbda))


def attention_sdpa(qkv: Tensor, num_heads: int) -> Tensor:
    """Multi-head self-attention of the DiT baseline via SDPA: qkv (B, N, 3C) -> (B, N, C)."""
    B, N, C3 = qkv.shape
    q, k, v = qkv.view(B, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C3 // 3)


def register_ops(register, triton_supports) -> None:
    """Offer these paths to ``wbdit.ops`` below the Triton kernels and the extension."""
    register("mssa", "cpu-sdpa", _on_cpu, priority=-10)(mssa_sdpa)
    register("ista", "cpu-1gemm", _on_cpu, priority=-10)(ista_one_gemm)
    # The same op on CUDA tensors is addmm in cuBLAS: what the Triton kernels are measured against.
    register("ista", "cublas-1gemm", _on_cuda, priority=-10)(ista_one_gemm)
    register("attention", "sdpa", lambda *a: True, priority=-10)(attention_sdpa)
