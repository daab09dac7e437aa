"""Suite stage "sample": sampling throughput with ``wbdit.sample``'s default settings, in cells/s.

The defaults (``wbdit.diffusion``): DPM-Solver++(2M), 7 steps, guidance 1.5 only while t / T lies
in [0.2, 0.8], in batches of ``wbdit.sampling.BATCH_SIZES["cuda"]`` cells, fp32 (sampling runs no
autocast); and, for WB-DiT fused only, the old recipe it replaced (DDIM, 50 steps, guidance 1.5 at
every step) on a smaller batch, so that the speed-up is measured on the GPU as on the CPU
(benchmarks/RESULTS.md, "Sampling"). Seed configuration with 2000 genes and 10 cell types, for
WB-DiT fused, WB-DiT reference and DiT fused; weights random at 0.02 (speed does not depend on
them; no kernel sees the zero-initialized output layers). ``speed.sampling_pass`` runs one warm-up
batch (compiles, cuBLAS handles, the ISTA matrix B formed once) and then the timed cells; it
counts model calls per cell (a guided step calls the model on both halves of a doubled batch).
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
from common import HAS_CUDA, SEED_GENES, record, skip

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from speed import sampler_settings, sampling_pass  # noqa: E402

from wbdit.diffusion import DEFAULT_STEPS, GaussianDiffusion  # noqa: E402
from wbdit.model import PRESETS, build_model  # noqa: E402
from wbdit.sampling import BATCH_SIZES  # noqa: E402

VARIANTS = {"wbdit-fused": ("wbdit", True), "wbdit-ref": ("wbdit", False), "dit-fused": ("dit", True)}
NUM_CLASSES = 10
BATCH = BATCH_SIZES["cuda"]
# (name, cells, batch, settings): the defaults for every variant, then the old recipe for one.
CASES = [("defaults", BATCH, BATCH, {})]
OLD_RECIPE = ("ddim-50, guidance 1.5 every step", 1024, 1024, dict(sampler="ddim", steps=50, cfg_interval=None))


def _model(arch: str, fused: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, n_genes=SEED_GENES, num_classes=NUM_CLASSES, fused=fused, **PRESETS["seed"])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    return model


def run_case(variant: str, name: str, cells: int, batch: int, settings: dict) -> None:
    arch, fused = VARIANTS[variant]
    model = _model(arch, fused)
    torch.cuda.reset_peak_memory_stats()
    result = sampling_pass(model, GaussianDiffusion(), cells, batch, device="cuda", **settings)
    out = result.pop("implementations")
    record(
        "sample",
        variant=variant,
        sampler=f"{name}: {result['sampler']} {result.get('steps') or DEFAULT_STEPS[result['sampler']]} steps, "
        f"cfg {result['cfg_scale']} in {result['cfg_interval']}",
        batch=batch,
        cells=cells,
        seconds=result["seconds"],
        cells_per_s=result["cells_per_s"],
        model_calls_per_cell=result["model_calls_per_cell"],
        peak_mib=torch.cuda.max_memory_allocated() / 2**20,
        warmup_s=result["warmup_s"],
        finite=result["finite"],
        implementations=out,
    )


def main() -> int:
    cases = [(v, *c) for v in VARIANTS for c in CASES] + [("wbdit-fused", *OLD_RECIPE)]
    if not HAS_CUDA:
        for variant, name, cells, batch, settings in cases:
            what = f"{cells} cells x {SEED_GENES} genes in batches of {batch}"
            skip(f"sampling {variant}, {name} ({sampler_settings(**settings)}): {what}")
        return 0
    ok = True
    for case in cases:
        try:
            run_case(*case)
        except Exception:
            traceback.print_exc()
            record("error", what=f"sample {case[0]} {case[1]}", error=traceback.format_exc(limit=3))
            ok = False
        torch.cuda.empty_cache()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
