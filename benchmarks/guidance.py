"""Joint against compositional guidance over two label columns, on a simulated dataset.

Cells have a type and a batch, drawn independently, each with its own marker genes
(``wbdit.datasets.synthetic(n_batches=...)``); 30% of every type x batch combination is held
out. One model is trained on both columns; then, for each guidance formula and scale
(``wbdit.diffusion.guidance_terms``), as many cells of each combination as are held out are
generated and compared with the held-out cells (``wbdit.evaluate``, PCA fit on the training
cells, label = the combination). ``markers_ok``: the fraction of generated cells whose own
type markers and own batch markers both outweigh the other types' and batches' markers (real
held-out cells: reported as the floor). One JSON line per setting on stdout
(benchmarks/QUALITY.md, "Guidance over several columns"):

    python benchmarks/guidance.py --out /tmp/guidance
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from wbdit import datasets
from wbdit.data import split_cells
from wbdit.evaluation import evaluate
from wbdit.sampling import sample
from wbdit.trainer import train

SETTINGS = [
    ("joint", 1.0),
    ("joint", 1.5),
    ("compositional", 1.5),
    ("joint", 2.0),
    ("compositional", 2.0),
    ("joint", {"cell_type": 1.5, "batch": 1.0}),
    ("compositional", {"cell_type": 1.5, "batch": 1.0}),
]


def markers_ok(adata, n_types: int, n_batches: int, m: int) -> float:
    """Fraction of cells whose own type's and own batch's markers outweigh every other type's and batch's."""
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    X = np.log1p(X / X.sum(1, keepdims=True) * 1e4) if np.array_equal(X, np.round(X)) else X
    sums = np.stack([X[:, g * m : (g + 1) * m].sum(1) for g in range(n_types + n_batches)], axis=1)
    t = adata.obs["cell_type"].cat.codes.to_numpy()
    b = adata.obs["batch"].cat.codes.to_numpy()
    own_t = sums[np.arange(len(X)), t] >= sums[:, :n_types].max(1)
    own_b = sums[np.arange(len(X)), n_types + b] >= sums[:, n_types:].max(1)
    return float((own_t & own_b).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=4000)
    p.add_argument("--genes", type=int, default=200)
    p.add_argument("--types", type=int, default=3)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--markers", type=int, default=10)
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--out", required=True, help="run directory")
    args = p.parse_args()
    torch.set_num_threads(1)  # shared 2-core machines: one thread avoids OpenMP spin-waiting
    adata = datasets.synthetic(
        n_cells=args.cells,
        n_genes=args.genes,
        n_types=args.types,
        markers_per_type=args.markers,
        n_batches=args.batches,
        seed=0,
    )
    adata.obs["combination"] = (adata.obs["cell_type"].astype(str) + "|" + adata.obs["batch"].astype(str)).astype(
        "category"
    )
    train_idx, test_idx = split_cells(adata, "combination", 0.3, seed=0)
    real_train, held_out = adata[train_idx].copy(), adata[test_idx].copy()
    t0 = time.perf_counter()
    run = train(
        real_train,
        label_key=["cell_type", "batch"],
        out_dir=args.out,
        max_steps=args.steps,
        device="cpu",
        progress=False,
    )
    print(
        json.dumps(
            dict(
                n_train=real_train.n_obs,
                n_held_out=held_out.n_obs,
                steps=args.steps,
                train_s=time.perf_counter() - t0,
                real_markers_ok=markers_ok(held_out, args.types, args.batches, args.markers),
            )
        ),
        flush=True,
    )
    wanted = held_out.obs.groupby(["cell_type", "batch"], observed=True).size()
    conditions = [({"cell_type": t, "batch": b}, int(n)) for (t, b), n in wanted.items()]
    for guidance, scale in SETTINGS:
        t0 = time.perf_counter()
        gen = sample(
            run, conditions=conditions, cfg_scale=scale, guidance=guidance, seed=0, device="cpu", progress=False
        )
        sample_s = time.perf_counter() - t0
        gen.obs["combination"] = (gen.obs["cell_type"].astype(str) + "|" + gen.obs["batch"].astype(str)).astype(
            "category"
        )
        report = evaluate(held_out, gen, label_key="combination", reference=real_train, baselines=False)
        per = report.generated["per_type"]
        print(
            json.dumps(
                dict(
                    guidance=guidance,
                    cfg_scale=scale,
                    sample_s=sample_s,
                    markers_ok=markers_ok(gen, args.types, args.batches, args.markers),
                    knn_auc_worst_combination=max(v.get("knn_auc") or 0 for v in per.values()),
                    **report.headline(),
                )
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
