"""Whole training steps and whole sampling passes: WB-DiT (reference, fused) vs DiT.

    pytest benchmarks/test_bench_training.py --benchmark-only --benchmark-json=bench.json

One benchmark group per (what, configuration, device), so each table row set shows the
variants side by side:

- "train step": ``wbdit.trainer.train_step`` (forward + loss under the trainer's autocast,
  backward, gradient clipping, AdamW, EMA) on one batch, for the four variants of
  ``benchmarks/speed.py`` (``wbdit.compare.VARIANTS``); ``extra_info["flops"]`` is the step's
  matrix-product and attention FLOPs (``speed.step_flops``);
- "train step compiled": the fused variants under ``torch.compile`` (inductor, one graph) as
  ``wbdit.train(compile=True)`` runs them; ``extra_info`` holds the compile seconds and the
  first step's loss against eager on the same weights and draws;
- "sample": one sampling pass of one batch with ``wbdit.sample``'s default sampler settings
  (DPM-Solver++(2M), its default steps, guidance on its default interval), and DDIM-50 with
  guidance at every step, the sampler those defaults replace.

Configurations: "small" (preset small, 765 genes as PBMC) and "seed" (preset seed: hidden 768,
depth 3, 8 heads, patch 10; 2000 genes). Batch 256 on CUDA; on CPU 64 for small and 16 for seed
(issue 18's comparison). Every timed call ends synchronized. CUDA cases are skipped without a
GPU. For the ratios asked of a CPU (DiT / WB-DiT, reference / fused, round by round, against
the fp32 peak), ``python benchmarks/speed.py train`` runs the variants in turn.
"""

from __future__ import annotations

import time

import pytest
import speed
import torch

from wbdit import ops
from wbdit.diffusion import GaussianDiffusion
from wbdit.model import PRESETS, build_model

CONFIGS = {  # name -> (preset, genes, {device type: batch})
    "small": ("small", 765, {"cpu": 64, "cuda": 256}),
    "seed": ("seed", 2000, {"cpu": 16, "cuda": 256}),
}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
ROUNDS = {"cpu": 3, "cuda": 20}  # timed calls per case, after one warm-up call
SAMPLERS = {  # name -> GaussianDiffusion.sample settings beyond the defaults of speed.sampling_pass
    "defaults": {},
    "ddim50-cfg": dict(sampler="ddim", steps=50, cfg_interval=None),
}


def _case(config: str, device_name: str) -> tuple[str, int, int]:
    preset, n_genes, batches = CONFIGS[config]
    return preset, n_genes, batches[torch.device(device_name).type]


def _run(benchmark, fn, device_name: str, info: dict, group: str) -> None:
    benchmark.group = group
    benchmark.extra_info.update(info)
    benchmark.pedantic(fn, rounds=ROUNDS[torch.device(device_name).type], iterations=1, warmup_rounds=1)
    benchmark.extra_info["implementations"] = ops.report()


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("variant", list(speed.VARIANTS))
def test_train_step(benchmark, variant: str, config: str, device_name: str) -> None:
    arch, fused = speed.VARIANTS[variant]
    preset, n_genes, batch = _case(config, device_name)
    step, info = speed.train_step_fn(arch, fused, preset, n_genes, batch, device_name)
    info.update(variant=variant, flops=speed.step_flops(arch, fused, preset, n_genes, batch, device_name))
    _run(benchmark, step, device_name, info, f"train step, {config} ({n_genes} genes, B={batch}), {device_name}")


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("variant", ["wbdit-fused", "dit-fused"])
def test_train_step_compiled(benchmark, variant: str, config: str, device_name: str) -> None:
    arch, fused = speed.VARIANTS[variant]
    preset, n_genes, batch = _case(config, device_name)
    torch._dynamo.reset()
    step, info = speed.train_step_fn(arch, fused, preset, n_genes, batch, device_name, compile=True)
    start = time.perf_counter()
    loss = float(step())  # compiles
    eager = float(speed.train_step_fn(arch, fused, preset, n_genes, batch, device_name)[0]())
    info.update(
        variant=variant + "-compiled", compile_s=time.perf_counter() - start, first_loss=loss, eager_first_loss=eager
    )
    assert abs(loss - eager) <= 1e-4 * abs(eager), (loss, eager)
    _run(benchmark, step, device_name, info, f"train step, {config} ({n_genes} genes, B={batch}), {device_name}")


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("variant", list(speed.VARIANTS))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sampling(benchmark, sampler: str, variant: str, config: str, device_name: str) -> None:
    arch, fused = speed.VARIANTS[variant]
    preset, n_genes, batch = _case(config, device_name)
    torch.manual_seed(0)
    model = build_model(arch, n_genes=n_genes, num_classes=speed.NUM_CLASSES, fused=fused, **PRESETS[preset])
    with torch.no_grad():  # as trained: no zero-initialized layer hides work from a kernel
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    diffusion = GaussianDiffusion(prediction="v")
    # Untimed: warms up and counts the model calls per cell.
    info = speed.sampling_pass(model, diffusion, batch, batch, device_name, **SAMPLERS[sampler])
    settings = speed.sampler_settings(**SAMPLERS[sampler])
    y = torch.randint(0, speed.NUM_CLASSES, (batch,), device=device_name)

    def one_pass():
        gen = torch.Generator(device=device_name).manual_seed(0)
        with torch.inference_mode():
            diffusion.sample(model, batch, n_genes, y=y, generator=gen, device=device_name, **settings)
        speed.sync(torch.device(device_name))

    info = {k: info[k] for k in ("model_calls_per_cell", *settings)}
    _run(
        benchmark,
        one_pass,
        device_name,
        dict(variant=variant, **info),
        f"sample {sampler}, {config} ({n_genes} genes, B={batch}), {device_name}",
    )
