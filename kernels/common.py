"""Launch helpers shared by the MSSA and ISTA Triton ops.

A kernel launch is described once, as a :class:`KernelSpec` (the kernel, the Triton type
of every runtime argument, the constexprs, warps and stages). The ops launch from it and
``wbdit.kernels.aot`` compiles the very same specs ahead of time, so the configurations
the heuristics choose are exactly the ones whose registers and shared memory get checked.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch
from torch import Tensor

from wbdit.ops import triton_interpreting as interpreting  # one definition: the dispatcher's

# Triton's name of each tensor dtype, as used in kernel signatures ("*bf16").
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class KernelSpec(NamedTuple):
    """One kernel launch: ``arg_types`` maps each runtime argument to its Triton type
    (``"*bf16"``, ``"i32"``, ``"fp32"``); ``constexprs`` holds the compile-time ones."""

    name: str
    kernel: Any
    arg_types: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int

    def launch(self, grid: tuple[int, ...], *args) -> None:
        """Run the kernel on ``args`` (in ``arg_types`` order) over ``grid``."""
        self.kernel[grid](*args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def int_arg(value: int) -> str:
    """Triton type of an int32 kernel argument with this value, with the divisibility-by-16 hint
    the JIT would specialize on (``"i32:16"``), so ahead-of-time builds match real launches."""
    return "i32:16" if value % 16 == 0 else "i32"


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs use tf32x3 (three tf32 tensor-core products,
    about fp32 accuracy: the reference is fp32 and tests hold 1e-5). 16-bit inputs multiply
    natively whatever this says (Triton reads it for fp32 operands only)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def check_device(*tensors: Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""
    for t in tensors:
        if not (t.is_cuda or (t.device.type == "cpu" and interpreting())):
            raise RuntimeError(
                f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {t.device}"
            )
        if t.dtype not in TRITON_DTYPE:
            raise TypeError(f"Triton kernels support float32, bfloat16 and float16, got {t.dtype}")


def on_device(t: Tensor):
    """Context that makes ``t``'s GPU the current one: Triton launches on the current device,
    which need not be the tensors' (several GPUs in one process)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def autocast_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Inside ``torch.autocast`` cast floating inputs to the autocast dtype, as autocast does for
    matmul-like ops (the reference's F.linear / matmul run in that dtype too)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def interpreter_upcast(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Under the interpreter tl.dot on 16-bit inputs is wrong (numpy multiplies the raw bits),
    so 16-bit tensors compute in float32 there (callers cast results back). On GPU: unchanged."""
    if interpreting():
        return tuple(t.float() for t in tensors)
    return tensors
