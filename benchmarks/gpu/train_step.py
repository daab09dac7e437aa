"""Suite stage "train": the whole training step at the seed configuration, bf16.

WB-DiT fused (Triton MSSA and ISTA, the C++/CUDA input ops), WB-DiT reference (plain PyTorch)
and DiT (fused: SDPA attention and the C++/CUDA input ops, its fastest form), each eager and under
``torch.compile``: ``wbdit.trainer.train_step`` (forward and loss under the trainer's bf16
autocast, backward, gradient clipping, AdamW, EMA) on one batch of 256 cells x 2000 genes with
10 cell types. Seed config: hidden 768, depth 3, 8 heads, patch 10.

Per case: compile/warm-up seconds (the first steps), then ``STEPS`` steps each between CUDA
events: median ms/step, cells/s = 256 / median step, and the peak of allocated GPU memory over
warm-up and timing (``torch.cuda.max_memory_allocated``). Eager cases run first: a compile that
fails or runs out of the stage's time keeps the eager numbers.
"""

from __future__ import annotations

import copy
import traceback

import torch
from common import HAS_CUDA, SEED_B, SEED_GENES, Timer, cuda_time_ms, median, record, skip

from wbdit import ops
from wbdit.diffusion import GaussianDiffusion
from wbdit.model import PRESETS, build_model
from wbdit.trainer import train_step  # at the top: the CPU twin's dry run proves it imports there

VARIANTS = {"wbdit-fused": ("wbdit", True), "wbdit-ref": ("wbdit", False), "dit-fused": ("dit", True)}
NUM_CLASSES = 10
WARMUP, STEPS = 3, 20


def setup(variant: str, device: str):
    """Seeded model, optimizer, EMA and one batch, as the trainer builds them."""
    arch, fused = VARIANTS[variant]
    torch.manual_seed(0)
    model = build_model(arch, n_genes=SEED_GENES, num_classes=NUM_CLASSES, fused=fused, **PRESETS["seed"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    x = torch.randn(SEED_B, SEED_GENES, device=device)
    y = torch.randint(0, NUM_CLASSES, (SEED_B,), device=device)
    return model, opt, ema, GaussianDiffusion(), x, y


def run_case(variant: str, compiled: bool) -> None:
    model, opt, ema, diffusion, x, y = setup(variant, "cuda")
    net = torch.compile(model) if compiled else model
    gen = torch.Generator(device="cuda").manual_seed(0)

    def step():
        train_step(net, opt, diffusion, x, y, gen, grad_clip=1.0, ema=ema, ema_decay=0.999)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with Timer() as warm:
        for _ in range(WARMUP):
            step()
        torch.cuda.synchronize()
    ms = median(cuda_time_ms(step, STEPS))
    record(
        "train",
        variant=variant,
        mode="compile" if compiled else "eager",
        ms_per_step=ms,
        cells_per_s=SEED_B / ms * 1e3,
        peak_mib=torch.cuda.max_memory_allocated() / 2**20,
        warmup_s=warm.s,
        params=sum(p.numel() for p in model.parameters()),
        implementations=ops.report(),
    )


def main() -> int:
    if not HAS_CUDA:
        for variant in VARIANTS:  # build what can be built without a GPU: a broken model shows here
            model = setup(variant, "cpu")[0]
            skip(
                f"train step {variant} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params), "
                "eager and torch.compile"
            )
        return 0
    ok = True
    for compiled in (False, True):
        for variant in VARIANTS:
            try:
                run_case(variant, compiled)
            except Exception:
                traceback.print_exc()
                record(
                    "error",
                    what=f"train {variant} {'compile' if compiled else 'eager'}",
                    error=traceback.format_exc(limit=3),
                )
                ok = False
            torch.cuda.empty_cache()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
