"""The C++/CUDA extension ``wbdit._C`` (built from ``csrc/``) as fast paths of ``wbdit.ops``.

Loading ``wbdit._C`` registers the ops ``torch.ops.wbdit.patch_embed``,
``torch.ops.wbdit.patch_embed_backward`` and ``torch.ops.wbdit.timestep_embedding`` with their
CPU kernels, and their CUDA kernels when the extension was compiled with CUDA. This module adds
what ``torch.compile`` and ``torch.library.opcheck`` need on top: fake (meta) kernels and
autograd. ``register_ops`` then offers the ops to ``wbdit.ops`` as ``cpu-ext`` / ``cuda-ext``.

``unpatchify`` has no kernel: the reference is a reshape and a slice (a view), which no kernel
can beat.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

try:
    from wbdit import _C  # noqa: F401  (loading the library runs its TORCH_LIBRARY registrations)
except ImportError as exc:
    raise ImportError(
        "wbdit._C (the C++/CUDA extension) is not built: install with "
        "`pip install --no-build-isolation -e .` with torch and a C++ compiler present "
        f"({exc})"
    ) from exc

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Timestep dtypes both kernels take (the CUDA one dispatches on t's dtype; the CPU one casts).
TIMESTEP_DTYPES = FLOAT_DTYPES + (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def has_cuda() -> bool:
    """Whether this build of ``wbdit._C`` contains the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("wbdit::patch_embed", "CUDA")


# ---------------------------------------------------------------- fake kernels


@torch.library.register_fake("wbdit::patch_embed")
def _patch_embed_fake(x: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor) -> Tensor:
    torch._check(x.dim() == 2 and weight.dim() == 2 and pos_embed.dim() == 2)
    torch._check(bias.shape == (weight.shape[0],) and pos_embed.shape[1] == weight.shape[0])
    return x.new_empty((x.shape[0], pos_embed.shape[0], weight.shape[0]))


@torch.library.register_fake("wbdit::patch_embed_backward")
def _patch_embed_backward_fake(
    grad: Tensor, x: Tensor, weight: Tensor, compute_dx: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    torch._check(grad.dim() == 3 and grad.shape[0] == x.shape[0] and grad.shape[2] == weight.shape[0])
    dx = x.new_empty(x.shape if compute_dx else (0,))
    return dx, weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


@torch.library.register_fake("wbdit::timestep_embedding")
def _timestep_embedding_fake(t: Tensor, dim: int, max_period: float) -> Tensor:
    torch._check(t.dim() == 1 and dim > 0 and dim % 2 == 0)
    return t.new_empty((t.shape[0], dim), dtype=torch.float32)


# ---------------------------------------------------------------- autograd


def _patch_embed_setup(ctx, inputs, output) -> None:
    x, weight, _, _ = inputs
    ctx.save_for_backward(x, weight)


def _patch_embed_bwd(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b, need_pos = ctx.needs_input_grad
    dx = dw = db = dpos = None
    if need_x or need_w or need_b:
        # In training x is data: skipping dx saves half of the backward's arithmetic.
        dx, dw, db = torch.ops.wbdit.patch_embed_backward(grad, x, weight, need_x)
    if need_pos:  # frozen in the model; computed only if a caller makes it trainable
        dpos = grad.sum(0)
    return (dx if need_x else None, dw if need_w else None, db if need_b else None, dpos)


torch.library.register_autograd("wbdit::patch_embed", _patch_embed_bwd, setup_context=_patch_embed_setup)


def _timestep_setup(ctx, inputs, output) -> None:
    t, dim, max_period = inputs
    ctx.half, ctx.max_period = dim // 2, max_period
    ctx.save_for_backward(t, output)


def _timestep_bwd(ctx, grad: Tensor):
    # out = [cos(t f), sin(t f)]: d/dt = sum_k f_k (g_sin_k cos_k - g_cos_k sin_k), with the
    # reference's float32 frequencies.
    t, out = ctx.saved_tensors
    half = ctx.half
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(ctx.max_period) * k / half)
    cos, sin = out[:, :half], out[:, half:]
    dt = ((grad[:, half:] * cos - grad[:, :half] * sin) * freqs).sum(-1)
    return dt.to(t.dtype), None, None


torch.library.register_autograd("wbdit::timestep_embedding", _timestep_bwd, setup_context=_timestep_setup)


# ---------------------------------------------------------------- wbdit.ops registration


def patch_embed(x: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor) -> Tensor:
    """``reference.patch_embed`` in one pass: (B, G) -> (B, N, H)."""
    return torch.ops.wbdit.patch_embed(x, weight, bias, pos_embed)


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """``reference.timestep_embedding`` in one kernel: (B,) -> (B, dim) float32."""
    return torch.ops.wbdit.timestep_embedding(t, int(dim), float(max_period))


def _patch_embed_supports(device_type: str):
    def supports(x: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor) -> bool:
        tensors = (x, weight, bias, pos_embed)
        return (
            x.device.type == device_type
            and all(t.device == x.device and t.dtype == x.dtype for t in tensors)
            and x.dtype in FLOAT_DTYPES
            and x.dim() == 2
            and weight.dim() == 2
        )

    return supports


def _timestep_supports(device_type: str):
    def supports(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> bool:
        return (
            t.device.type == device_type
            and t.dim() == 1
            and t.dtype in TIMESTEP_DTYPES
            and int(dim) > 0
            and int(dim) % 2 == 0  # odd dims go to the reference, which raises its ValueError
        )

    return supports


def register_ops(register, triton_supports) -> None:
    """Offer the extension's ops to ``wbdit.ops`` (``triton_supports`` is not needed here)."""
    devices = [("cpu-ext", "cpu")] + ([("cuda-ext", "cuda")] if has_cuda() else [])
    for name, device_type in devices:
        register("patch_embed", name, _patch_embed_supports(device_type), priority=5)(patch_embed)
        register("timestep_embedding", name, _timestep_supports(device_type), priority=5)(timestep_embedding)
