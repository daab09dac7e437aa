"""Fused Triton kernels of WB-DiT (installed as ``wbdit.kernels``).

- :mod:`wbdit.kernels.mssa`: subspace self-attention (Q = K = V), flash-style forward and backward.
- :mod:`wbdit.kernels.ista`: the ISTA sparse-coding step, one fused GEMM forward, two backward.
- :mod:`wbdit.kernels.aot`: ahead-of-time compilation for sm_80 / sm_90a and the resource table.

Each op is a ``torch.library`` custom op (``wbdit::mssa_triton_fwd`` / ``_bwd``,
``wbdit::ista_triton_fwd`` / ``_bwd``) with fake and autograd registrations. Importing this
package raises ImportError when Triton is not installed.
"""

import triton  # noqa: F401  (fail at import, cleanly, when Triton is missing)

from . import ista, mssa
from .common import TRITON_DTYPE

__all__ = ["ista", "mssa", "register_ops"]


def register_ops(register, supports) -> None:
    """Register the Triton implementations with a dispatcher: ``register(op, name, supports,
    priority)`` returns a decorator (``wbdit.ops.register``); ``supports(*args)`` says whether
    Triton can run on the arguments (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""

    def mssa_ok(w, num_heads) -> bool:  # other head dims and dtypes fall back (with a warning)
        return supports(w) and w.dtype in TRITON_DTYPE and w.shape[-1] // num_heads <= mssa.MAX_HEAD_DIM

    def ista_ok(x, D, eta, lmbda, B) -> bool:  # D of any float dtype: B is formed from it in fp32
        return supports(x) and x.dtype in TRITON_DTYPE

    register("mssa", "triton", mssa_ok, priority=10)(mssa.mssa)
    register("ista", "triton", ista_ok, priority=10)(ista.ista)
