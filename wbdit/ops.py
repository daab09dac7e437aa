"""Op dispatch: every fused op = a reference (``wbdit.reference``) + fast paths + one function here.

Models call only these functions. With ``fused=False`` the reference runs. With
``fused=True`` the first registered fast implementation that supports the inputs runs
(Triton on CUDA or under ``TRITON_INTERPRET=1``, the C++/CUDA extension ``wbdit._C``,
then the CPU fast paths). If none does, the reference runs with a one-time warning, or a
``RuntimeError`` when ``WBDIT_STRICT_FUSED=1``. ``report()`` tells which implementation ran.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from wbdit import fastpaths, reference, tuning

STRICT_ENV = "WBDIT_STRICT_FUSED"


@dataclass(frozen=True)
class Impl:
    """A fast implementation of an op: ``supports(*args)`` says whether it can run them."""

    name: str
    fn: Callable[..., Tensor]
    supports: Callable[..., bool]
    priority: int


def _ista_reference(x: Tensor, D: Tensor, eta: float, lmbda: float, B: Tensor | None) -> Tensor:
    # B, the fast paths' precomputed matrix, is not used: the reference is CRATE's literal form.
    return reference.ista(x, D, eta, lmbda)


_REFERENCE: dict[str, Callable[..., Tensor]] = {
    "mssa": reference.mssa,
    "ista": _ista_reference,
    "attention": reference.attention,
    "patch_embed": reference.patch_embed,
    "timestep_embedding": reference.timestep_embedding,
}
_IMPLS: dict[str, list[Impl]] = {op: [] for op in _REFERENCE}
_UNAVAILABLE: dict[str, str] = {}  # backend -> why it could not be loaded
_LAST: dict[str, str] = {}  # op -> implementation that ran last
_WARNED: set[tuple[str, str]] = set()
_backends_loaded = False


def register(op: str, name: str, supports: Callable[..., bool], priority: int = 0):
    """Decorator: register ``fn`` as fast implementation ``name`` of ``op`` (higher priority first)."""

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        impls = [i for i in _IMPLS[op] if i.name != name] + [Impl(name, fn, supports, priority)]
        _IMPLS[op] = sorted(impls, key=lambda i: -i.priority)
        return fn

    return deco


def triton_interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _first_tensor(args) -> Tensor:
    return next(a for a in args if isinstance(a, Tensor))


def _triton_supports(*args) -> bool:
    t = _first_tensor(args)
    return t.is_cuda or (t.device.type == "cpu" and triton_interpreting())


def _load_backends() -> None:
    """Import the optional fast backends once; remember why one is missing."""
    global _backends_loaded
    if _backends_loaded:
        return
    _backends_loaded = True
    for backend, module in (
        ("triton", "wbdit.kernels"),
        ("extension", "wbdit.extension"),
        ("torch", "wbdit.fastpaths"),
    ):
        try:
            importlib.import_module(module).register_ops(register, _triton_supports)
        except Exception as exc:  # ImportError, or a broken build: reported, not hidden
            _UNAVAILABLE[backend] = f"{type(exc).__name__}: {exc}"


def _describe(args) -> str:
    t = _first_tensor(args)
    return f"{t.device.type} {str(t.dtype).replace('torch.', '')} {tuple(t.shape)}"


def _dispatch(op: str, fused: bool, *args) -> Tensor:
    if fused:
        _load_backends()
        for impl in _IMPLS[op]:
            if impl.supports(*args):
                _LAST[op] = impl.name
                return impl.fn(*args)
        why = "; ".join(f"{b} unavailable ({e})" for b, e in _UNAVAILABLE.items()) or "no backend"
        msg = f"fused=True but no fast implementation of {op} supports {_describe(args)} ({why}); running the reference"
        if os.environ.get(STRICT_ENV, "0") == "1":
            raise RuntimeError(msg + f" is refused because {STRICT_ENV}=1")
        key = (op, _describe(args).split(" (")[0])
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        _LAST[op] = "reference (fallback)"
    else:
        _LAST[op] = "reference"
    return _REFERENCE[op](*args)


def report() -> dict[str, str]:
    """Which implementation each op ran last, e.g. ``{"mssa": "triton", "ista": "cpu-1gemm"}``; once a
    Triton kernel ran, ``"tuning"`` says whether its launches used measured winners (``wbdit.tuning``)."""
    out = dict(_LAST)
    if "triton" in out.values():
        out["tuning"] = tuning.describe()
    return out


def available() -> dict[str, list[str]]:
    """Registered fast implementations per op, plus ``"unavailable"``: backends that failed to load."""
    _load_backends()
    out = {op: [i.name for i in impls] for op, impls in _IMPLS.items()}
    out["unavailable"] = [f"{b}: {e}" for b, e in _UNAVAILABLE.items()]
    return out


# ---------------------------------------------------------------- public ops


def mssa(w: Tensor, num_heads: int, fused: bool = False) -> Tensor:
    """Subspace self-attention, Q = K = V = w: (B, N, heads * d) -> (B, N, heads * d)."""
    return _dispatch("mssa", fused, w, num_heads)


def ista(x: Tensor, D: Tensor, eta: float, lmbda: float, fused: bool = False, B: Tensor | None = None) -> Tensor:
    """ISTA step ``relu(x + eta (x D - x D^T D) - eta lmbda)``: x (..., H), D (H, H) -> like x.

    The fast paths compute ``relu(x + x B - eta lmbda)`` with ``B = ista_matrix(D, eta)``. A caller
    whose D is constant (sampling) passes that B, formed once; it carries no gradient to D, so it
    is refused while D needs one. The reference ignores B.
    """
    if B is not None and torch.is_grad_enabled() and D.requires_grad:
        raise ValueError("a precomputed B is for a constant D: D requires grad here")
    return _dispatch("ista", fused, x, D, eta, lmbda, B)


def ista_matrix(D: Tensor, eta: float) -> Tensor:
    """``B = eta (D - D^T D)``, (H, H) float32 (float64 for a float64 D), for ``ista(..., B=B)``
    (``wbdit.fastpaths.ista_matrix``)."""
    return fastpaths.ista_matrix(D, eta)


def attention(qkv: Tensor, num_heads: int, fused: bool = False) -> Tensor:
    """Multi-head self-attention of the DiT baseline: qkv (B, N, 3C) -> (B, N, C)."""
    return _dispatch("attention", fused, qkv, num_heads)


def patch_embed(x: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor, fused: bool = False) -> Tensor:
    """Gene vector (B, G) to tokens (B, N, H); weight (H, p), bias (H,), pos_embed (N, H)."""
    return _dispatch("patch_embed", fused, x, weight, bias, pos_embed)


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0, fused: bool = False) -> Tensor:
    """Sinusoidal timestep embedding: t (B,) -> (B, dim) float32."""
    return _dispatch("timestep_embedding", fused, t, dim, max_period)
