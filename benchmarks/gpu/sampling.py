"""Suite stage "sample": sampling throughput of the default sampler, in cells/s.

The default of ``wbdit.sample`` and ``wbdit sample``: DDIM, 50 steps, eta 0, no guidance, batches
of 1024 cells, fp32 (sampling runs no autocast). Seed configuration with 2000 genes and 10 cell
types, for WB-DiT fused, WB-DiT reference and DiT fused; weights as initialized (speed does not
depend on them; DiT's zero-initialized output layers are randomized so no kernel sees zeros).
One warm-up pass of 2 steps (compiles, cuBLAS handles), then one timed pass of 50 steps between
CUDA events. Without gradients WB-DiT forms its ISTA matrix B once and reuses it while D is
unchanged (``wbdit.model``), as in any real sampling run.
"""

from __future__ import annotations

import traceback

import torch
from common import HAS_CUDA, SEED_GENES, Timer, record, skip

from wbdit import ops
from wbdit.diffusion import GaussianDiffusion
from wbdit.model import PRESETS, build_model

VARIANTS = {"wbdit-fused": ("wbdit", True), "wbdit-ref": ("wbdit", False), "dit-fused": ("dit", True)}
BATCH, STEPS, NUM_CLASSES = 1024, 50, 10


def run_case(variant: str) -> None:
    arch, fused = VARIANTS[variant]
    torch.manual_seed(0)
    model = build_model(arch, n_genes=SEED_GENES, num_classes=NUM_CLASSES, fused=fused, **PRESETS["seed"])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    model = model.cuda().eval()
    diffusion = GaussianDiffusion()
    y = torch.randint(0, NUM_CLASSES, (BATCH,), device="cuda")

    def sample(steps: int) -> torch.Tensor:
        gen = torch.Generator(device="cuda").manual_seed(0)
        return diffusion.sample(
            model, BATCH, SEED_GENES, y=y, sampler="ddim", steps=steps, generator=gen, device="cuda"
        )

    with Timer() as warm:
        sample(2)
        torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.reset_peak_memory_stats()
    start.record()
    out = sample(STEPS)
    end.record()
    torch.cuda.synchronize()
    s = start.elapsed_time(end) / 1e3
    record(
        "sample",
        variant=variant,
        sampler=f"ddim {STEPS} steps",
        batch=BATCH,
        seconds=s,
        cells_per_s=BATCH / s,
        ms_per_step=s / STEPS * 1e3,
        peak_mib=torch.cuda.max_memory_allocated() / 2**20,
        warmup_s=warm.s,
        finite=bool(torch.isfinite(out).all()),
        implementations=ops.report(),
    )


def main() -> int:
    if not HAS_CUDA:
        for variant in VARIANTS:
            skip(f"sampling {variant}: ddim {STEPS} steps, {BATCH} cells x {SEED_GENES} genes")
        return 0
    ok = True
    for variant in VARIANTS:
        try:
            run_case(variant)
        except Exception:
            traceback.print_exc()
            record("error", what=f"sample {variant}", error=traceback.format_exc(limit=3))
            ok = False
        torch.cuda.empty_cache()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
