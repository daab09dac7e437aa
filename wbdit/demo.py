"""``wbdit demo``: train on the bundled PBMC cells, generate, evaluate against held-out cells."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from wbdit import datasets
from wbdit.atomic import atomic_path
from wbdit.data import split_cells, write_h5ad
from wbdit.model import PRESETS, WhiteBoxDiT
from wbdit.run import TrainConfig
from wbdit.sampling import sample
from wbdit.trainer import train

# Settings chosen by the experiments in benchmarks/QUALITY.md. Sampling: wbdit.sample's
# defaults, measured on this model against DDIM-50 with guidance 1.5 at every step, the demo's
# recipe before them (benchmarks/RESULTS.md, "Sampling"); keywords here override them.
DEMO_CONFIG = TrainConfig(epochs=450)
DEMO_SAMPLING: dict = {}
HELD_OUT = 0.3


def run_demo(
    out_dir: str = "wbdit-demo",
    config: TrainConfig = DEMO_CONFIG,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Train, sample and evaluate; write everything under ``out_dir``; return the summary."""
    from wbdit.evaluation import evaluate, write_report

    out = Path(out_dir)
    t0 = time.perf_counter()
    adata = datasets.pbmc68k()
    train_idx, test_idx = split_cells(adata, "cell_type", HELD_OUT, seed)
    real_train, real_test = adata[train_idx].copy(), adata[test_idx].copy()
    shutil.rmtree(out / "run", ignore_errors=True)  # the demo owns its directory: start afresh
    model = WhiteBoxDiT(n_genes=adata.n_vars, num_classes=adata.obs["cell_type"].nunique(), **PRESETS["small"])
    run = train(
        real_train,
        model,
        label_key="cell_type",
        out_dir=out / "run",
        config=config,
        seed=seed,
        device=device,
        progress=progress,
    )
    train_s = time.perf_counter() - t0
    counts = real_test.obs["cell_type"].value_counts()
    gen = sample(
        run,
        n_cells=real_test.n_obs,
        cell_types={k: int(v) for k, v in counts.items()},
        seed=seed,
        device=device,
        progress=progress,
        **DEMO_SAMPLING,
    )
    write_h5ad(gen, out / "generated.h5ad")
    write_h5ad(real_test, out / "real_heldout.h5ad")
    report = evaluate(real_test, gen, label_key="cell_type", reference=real_train)
    write_report(report, out / "report", real=real_test, generated=gen)
    summary = dict(
        wall_time_s=time.perf_counter() - t0,
        train_time_s=train_s,
        cells_per_s=float(np.mean([r["cells_per_s"] for r in run.history])),
        n_train=int(real_train.n_obs),
        n_heldout=int(real_test.n_obs),
        epochs=config.epochs,
        metrics=report.headline(),
        floor=report.floor_headline(),
    )
    with atomic_path(out / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2))
    text = report.table()
    (out / "summary.txt").write_text(
        f"wbdit demo: {summary['n_train']} PBMC cells trained, {summary['n_heldout']} held out\n"
        f"training {train_s:.0f} s ({summary['cells_per_s']:.0f} cells/s), "
        f"total {summary['wall_time_s']:.0f} s\n\n{text}\n"
    )
    return summary
