"""wbdit._C vs the plain-PyTorch references at the seed shape (B=256, G=2000, p=10, H=768).

``pytest benchmarks/test_bench_extension.py --benchmark-only``: one group per (op, pass, device),
so each table holds the reference and the extension side by side. CUDA cases skip without a GPU;
on CUDA every timed call ends with a synchronize, so the time is the kernels', not the launch's.
The fwd+bwd cases train like the model does: W and bias need gradients, the gene vector x does not.
"""

from __future__ import annotations

import pytest
import torch

from wbdit import extension, reference

B, G, P, H = 256, 2000, 10, 768
N = -(-G // P)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not (torch.cuda.is_available() and extension.has_cuda()), reason="needs a GPU and a CUDA build of wbdit._C"
        ),
    ),
]
IMPLS = {
    "reference": (reference.patch_embed, reference.timestep_embedding),
    "extension": (extension.patch_embed, extension.timestep_embedding),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _patch_inputs(device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, G, generator=g)
    w = torch.randn(H, P, generator=g) / P**0.5
    b = torch.randn(H, generator=g)
    pos = reference.sincos_pos_embed(N, H)
    return [t.to(device) for t in (x, w, b, pos)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_patch_embed_forward(benchmark, impl, device):
    benchmark.group = f"patch_embed fwd {device}"
    fn = IMPLS[impl][0]
    args = _patch_inputs(device)

    def run():
        out = fn(*args)
        _sync(device)
        return out

    with torch.no_grad():
        out = benchmark(run)
    assert out.shape == (B, N, H)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_patch_embed_forward_backward(benchmark, impl, device):
    benchmark.group = f"patch_embed fwd+bwd {device}"
    fn = IMPLS[impl][0]
    x, w, b, pos = _patch_inputs(device)
    w.requires_grad_()
    b.requires_grad_()
    grad = torch.randn(B, N, H, device=device)

    def run():
        dw, db = torch.autograd.grad(fn(x, w, b, pos), (w, b), grad)
        _sync(device)
        return dw, db

    dw, db = benchmark(run)
    assert dw.shape == (H, P) and db.shape == (H,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_timestep_embedding_forward(benchmark, impl, device):
    benchmark.group = f"timestep_embedding fwd {device}"
    fn = IMPLS[impl][1]
    t = torch.randint(0, 1000, (B,), generator=torch.Generator().manual_seed(0)).to(device)

    def run():
        out = fn(t, 256, 10000.0)
        _sync(device)
        return out

    out = benchmark(run)
    assert out.shape == (B, 256)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_timestep_embedding_forward_backward(benchmark, impl, device):
    # The model's timesteps are integers (no gradient); float timesteps that need one are the
    # case where the backward runs at all.
    benchmark.group = f"timestep_embedding fwd+bwd {device}"
    fn = IMPLS[impl][1]
    t = (torch.rand(B, generator=torch.Generator().manual_seed(0)) * 1000).to(device).requires_grad_()
    grad = torch.randn(B, 256, device=device)

    def run():
        (dt,) = torch.autograd.grad(fn(t, 256, 10000.0), t, grad)
        _sync(device)
        return dt

    assert benchmark(run).shape == (B,)
