"""Fused Triton kernels of WB-DiT (installed as wbdit.kernels)."""
