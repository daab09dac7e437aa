"""Plain-PyTorch reference implementations: the specification every fast path must equal.

Each function here is the readable statement of one op of WB-DiT (DESIGN.md). The fast
implementations (Triton in ``wbdit.kernels``, C++/CUDA in ``wbdit._C``, CPU fast paths in
``wbdit.ops``) are tested against these, forward and backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def mssa(w: Tensor, num_heads: int) -> Tensor:
    """Subspace self-attention with Q = K = V = w.

    w: (B, N, num_heads * d), already projected by the shared U. Per head h:
    ``out_h = softmax(w_h w_h^T * d^-0.5) w_h``. Returns (B, N, num_heads * d).
    """
    B, N, C = w.shape
    d = C // num_heads
    wh = w.view(B, N, num_heads, d).transpose(1, 2)  # (B, h, N, d)
    scores = (wh @ wh.transpose(-1, -2)) * d**-0.5
    out = torch.softmax(scores.float(), dim=-1).to(w.dtype) @ wh
    return out.transpose(1, 2).reshape(B, N, C)


def ista(x: Tensor, D: Tensor, eta: float, lmbda: float) -> Tensor:
    """One ISTA sparse-coding step of CRATE, in CRATE's own three-GEMM form.

    x: (..., H), D: (H, H). ``relu(x + eta * (x D - x D^T D) - eta * lmbda)``.
    """
    x1 = F.linear(x, D)  # x D^T
    g1 = F.linear(x1, D.t())  # x D^T D
    g2 = F.linear(x, D.t())  # x D
    return F.relu(x + eta * (g2 - g1) - eta * lmbda)


def attention(qkv: Tensor, num_heads: int) -> Tensor:
    """Standard multi-head self-attention of the DiT baseline.

    qkv: (B, N, 3 * C) from Linear(C, 3C). Returns (B, N, C).
    """
    B, N, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    q, k, v = qkv.view(B, N, 3, num_heads, d).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) * d**-0.5
    out = torch.softmax(scores.float(), dim=-1).to(qkv.dtype) @ v
    return out.transpose(1, 2).reshape(B, N, C)


def patch_embed(x: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor) -> Tensor:
    """Gene vector to tokens: zero-pad, cut into patches, project, add position embedding.

    x: (B, G); weight: (H, p) as in Linear(p, H); bias: (H,); pos_embed: (N, H) with
    N = ceil(G / p). Returns (B, N, H).
    """
    B, G = x.shape
    N, _ = pos_embed.shape
    p = weight.shape[1]
    if N * p != G:
        x = F.pad(x, (0, N * p - G))
    return F.linear(x.view(B, N, p), weight, bias) + pos_embed


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]``, ``f_k = exp(-ln(max_period) k / (dim/2))``.

    t: (B,) float or int timesteps. Returns (B, dim) float32. ``dim`` must be even.
    """
    if dim % 2:
        raise ValueError(f"timestep embedding dim must be even, got {dim}")
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def unpatchify(tokens: Tensor, n_genes: int) -> Tensor:
    """(B, N, p) per-token outputs back to (B, n_genes), cropping the zero padding."""
    B = tokens.shape[0]
    return tokens.reshape(B, -1)[:, :n_genes]


def sincos_pos_embed(n_tokens: int, dim: int) -> Tensor:
    """Fixed 1-D sin-cos position embedding (N, dim), as in DiT/MAE (float32)."""
    if dim % 2:
        raise ValueError(f"position embedding dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = torch.arange(n_tokens, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()
