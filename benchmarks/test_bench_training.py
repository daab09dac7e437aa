"""Whole training steps and whole DDIM sampling passes: WB-DiT (reference, fused) vs DiT.

    pytest benchmarks/test_bench_training.py --benchmark-only --benchmark-json=bench.json

One benchmark group per (what, configuration, device), so each table row set shows the
four variants of ``wbdit.compare.VARIANTS`` side by side:

- "train step": ``wbdit.trainer.train_step`` (forward + loss under the trainer's autocast,
  backward, gradient clipping, AdamW, EMA) on one batch;
- "ddim10": a 10-step DDIM sampling pass (``GaussianDiffusion.sample``) of one batch.

Configurations: "small" (preset small, 765 genes as PBMC) and "seed" (preset seed:
hidden 768, depth 3, 8 heads, patch 10; 2000 genes). Batch 256 on CUDA; on CPU 64 for
small and 8 for seed, so the suite finishes. Every timed call ends with
``torch.cuda.synchronize()`` on CUDA. CUDA cases are skipped without a GPU.
"""
from __future__ import annotations

import copy

import pytest
import torch

from wbdit import ops
from wbdit.compare import VARIANTS
from wbdit.diffusion import GaussianDiffusion
from wbdit.model import PRESETS, build_model
from wbdit.trainer import train_step

CONFIGS = {  # name -> (preset, genes, {device type: batch})
    "small": ("small", 765, {"cpu": 64, "cuda": 256}),
    "seed": ("seed", 2000, {"cpu": 8, "cuda": 256}),
}
NUM_CLASSES = 10
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
ROUNDS = {"cpu": 3, "cuda": 20}  # timed calls per case, after one warm-up call


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup(variant: str, config: str, device_name: str):
    """Model (seeded init), one batch of (x, y) on ``device``, its batch size."""
    arch, fused = VARIANTS[variant]
    preset, n_genes, batches = CONFIGS[config]
    device = torch.device(device_name)
    batch = batches[device.type]
    torch.manual_seed(0)
    model = build_model(arch, n_genes=n_genes, num_classes=NUM_CLASSES, fused=fused, **PRESETS[preset]).to(device)
    x = torch.randn(batch, n_genes, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    return model, x, y, device


def _run(benchmark, fn, device: torch.device, model, variant: str, group: str) -> None:
    benchmark.group = group
    benchmark.extra_info.update(variant=variant, params=sum(p.numel() for p in model.parameters()))
    benchmark.pedantic(fn, rounds=ROUNDS[device.type], iterations=1, warmup_rounds=1)
    benchmark.extra_info["implementations"] = ops.report()


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_step(benchmark, variant: str, config: str, device_name: str) -> None:
    model, x, y, device = _setup(variant, config, device_name)
    diffusion = GaussianDiffusion()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        train_step(model, opt, diffusion, x, y, gen, grad_clip=1.0, ema=ema, ema_decay=0.999)
        _sync(device)

    group = f"train step, {config} ({x.shape[1]} genes, B={len(x)}), {device_name}"
    _run(benchmark, step, device, model, variant, group)


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ddim_sampling(benchmark, variant: str, config: str, device_name: str) -> None:
    model, x, y, device = _setup(variant, config, device_name)
    model.eval()
    diffusion = GaussianDiffusion()

    def sample():
        gen = torch.Generator(device=device).manual_seed(0)
        out = diffusion.sample(model, len(x), x.shape[1], y=y, sampler="ddim", steps=10, generator=gen, device=device)
        _sync(device)
        return out

    group = f"ddim10, {config} ({x.shape[1]} genes, B={len(x)}), {device_name}"
    _run(benchmark, sample, device, model, variant, group)
