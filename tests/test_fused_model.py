"""Whole-model proof: fused=True (Triton kernels through the interpreter on CPU, the C++
extension for the input path) equals fused=False on the same weights, loss and gradients."""

import os

import pytest
import torch

import wbdit
from wbdit import ops
from wbdit.diffusion import GaussianDiffusion

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randomized(cls, num_classes, seed=0):
    """A small model (N=5 tokens: not a block multiple; head dim 32) with every weight non-zero."""
    torch.manual_seed(seed)
    model = cls(n_genes=47, patch_size=10, hidden_size=64, depth=2, num_heads=2, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)  # 0.2 makes the net ill-conditioned: fp32 itself drifts 1e-5
    return model.to(DEVICE)


def loss_and_grads(model, fused, x, t, y):
    model.fused = fused
    model.zero_grad(set_to_none=True)
    loss = ((model(x, t, y) - x) ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("num_classes", [None, 3])
def test_fused_equals_reference_loss_and_grads(num_classes):
    model = randomized(wbdit.WhiteBoxDiT, num_classes)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 47, generator=g).to(DEVICE)
    t = torch.randint(0, 1000, (3,), generator=g).to(DEVICE)
    y = torch.randint(0, 4, (3,), generator=g).to(DEVICE) if num_classes else None
    ref_loss, ref_grads = loss_and_grads(model, False, x, t, y)
    loss, grads = loss_and_grads(model, True, x, t, y)
    used = ops.report()
    assert used["mssa"] == "triton" and used["ista"] == "triton", used
    assert torch.isfinite(loss) and torch.allclose(loss, ref_loss, rtol=1e-5, atol=0)
    for name, ref in ref_grads.items():
        assert torch.isfinite(grads[name]).all(), name
        scale = ref.abs().max().clamp_min(1e-12)
        assert ((grads[name] - ref).abs().max() / scale) < 1e-5, name


def test_fused_training_loss_matches_with_same_draws():
    model = randomized(wbdit.WhiteBoxDiT, 3, seed=2)
    diffusion = GaussianDiffusion()
    x = torch.randn(2, 47).to(DEVICE)
    y = torch.tensor([0, 3]).to(DEVICE)
    losses = []
    for fused in (False, True):
        model.fused = fused
        g = torch.Generator(device=DEVICE).manual_seed(0)
        losses.append(diffusion.training_loss(model, x, y, g))
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)


def test_torch_compile_of_fused_model():
    model = randomized(wbdit.WhiteBoxDiT, None, seed=3)
    x, t = torch.randn(2, 47).to(DEVICE), torch.tensor([5, 900]).to(DEVICE)
    model.fused = False
    expected = model(x, t)
    model.fused = True
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x, t)
    out.square().mean().backward()
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_head_dim_beyond_the_kernels_is_not_sent_to_triton(monkeypatch):
    """Head dim 136 > 128: the Triton MSSA declines; the next implementation runs (the CPU fast
    path here; on CUDA the reference with a warning, an error when strict), equal to fused=False."""
    wide = wbdit.WhiteBoxDiT(n_genes=47, patch_size=10, hidden_size=136, depth=1, num_heads=1).to(DEVICE)
    x, t = torch.randn(2, 47).to(DEVICE), torch.tensor([5, 900]).to(DEVICE)
    with torch.no_grad():
        for p in wide.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    wide.fused = False
    expected = wide(x, t)
    wide.fused = True
    monkeypatch.setattr(ops, "_WARNED", set())
    if DEVICE == "cpu":
        out = wide(x, t)
        assert ops.report()["mssa"] == "cpu-sdpa" and ops.report()["ista"] == "triton"
    else:
        with pytest.warns(RuntimeWarning, match="no fast implementation of mssa"):
            out = wide(x, t)
        monkeypatch.setenv("WBDIT_STRICT_FUSED", "1")
        with pytest.raises(RuntimeError, match="WBDIT_STRICT_FUSED=1"):
            wide(x, t)
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-6)
