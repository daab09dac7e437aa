"""Reproduce benchmarks/WHITEBOX.md: white-box measures of WB-DiT and DiT, trained with the demo recipe and fresh.

    python benchmarks/whitebox_pbmc.py --out wb-pbmc [--epochs 305]

Trains (unless ``OUT/runs/<arch>`` already holds a run) a "small" WB-DiT and a DiT with the demo's
settings (``wbdit.demo.DEMO_CONFIG``, 70% of the bundled PBMC cells, seed 0) for ``--epochs``, then
inspects both trained runs and both freshly initialised models (same seed as the trainer's factory)
on 500 of the 700 PBMC cells at 10 noise levels, and writes ``OUT/trained``, ``OUT/fresh``,
``OUT/trained_learned_u`` (R^c on U's learned columns) and ``OUT/timing.json`` (wall and CPU seconds
of each inspection). CPU: about 20 CPU-seconds per inspection, the training about 1 s per epoch and
model on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP (see wbdit/__init__.py)

import torch  # noqa: E402

from wbdit import datasets  # noqa: E402
from wbdit.checkpoint import CHECKPOINT  # noqa: E402
from wbdit.data import split_cells  # noqa: E402
from wbdit.demo import DEMO_CONFIG, HELD_OUT  # noqa: E402
from wbdit.model import PRESETS, build_model  # noqa: E402
from wbdit.run import Run  # noqa: E402
from wbdit.trainer import train  # noqa: E402
from wbdit.whitebox import cells_in_model_space, inspect  # noqa: E402
from wbdit.whitebox_report import write_report  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="wb-pbmc")
    p.add_argument("--epochs", type=int, default=305, help="demo recipe epochs (the demo itself trains 450)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    adata = datasets.pbmc68k()
    n_types = adata.obs["cell_type"].nunique()
    train_idx, _ = split_cells(adata, "cell_type", HELD_OUT, 0)
    found, timing = {}, {}

    def timed(key, *a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        found[key] = inspect(*a, **k)
        timing[key] = dict(
            wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0, loadavg_1min=os.getloadavg()[0]
        )
        print(key, timing[key], flush=True)

    for arch in ("wbdit", "dit"):
        run_dir = out / "runs" / arch
        if not (run_dir / CHECKPOINT).exists():
            model = build_model(arch, n_genes=adata.n_vars, num_classes=n_types, **PRESETS["small"])
            train(
                adata[train_idx].copy(),
                model,
                label_key="cell_type",
                out_dir=run_dir,
                config=replace(DEMO_CONFIG, epochs=args.epochs),
                seed=0,
                device="cpu",
                progress=False,
            )
        run = Run.load(run_dir)
        timed(f"{arch} trained", run, adata, label=f"demo recipe, {run.epoch} epochs")
        x, y = cells_in_model_space(adata, run.preprocessor)
        torch.manual_seed(0)  # the trainer's factory seeds the initial weights with config.seed = 0
        fresh = build_model(arch, n_genes=adata.n_vars, num_classes=n_types, **PRESETS["small"]).eval()
        timed(f"{arch} fresh", fresh, x, labels=y, diffusion=run.diffusion, label="fresh init, seed 0")
        if arch == "wbdit":
            timed(
                "wbdit trained, learned U",
                run,
                adata,
                orthonormal=False,
                label=f"{run.epoch} epochs, learned U columns",
            )
    write_report([found["wbdit trained"], found["dit trained"]], out / "trained")
    write_report([found["wbdit fresh"], found["dit fresh"]], out / "fresh")
    write_report([found["wbdit trained, learned U"]], out / "trained_learned_u")
    (out / "timing.json").write_text(json.dumps(timing, indent=1))


if __name__ == "__main__":
    main()
