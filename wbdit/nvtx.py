"""NVTX ranges for Nsight Systems timelines: ``with nvtx_range("forward"): ...``."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def nvtx_range(name: str):
    """Push an NVTX range named ``name`` around the block when CUDA is available.

    A CPU-only torch build raises on NVTX calls, and under ``torch.compile`` the range
    would break the graph, so both cases run the block without a range.
    """
    if not torch.cuda.is_available() or torch.compiler.is_compiling():
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
