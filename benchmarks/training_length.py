"""How long to train: held-out quality against optimizer steps on a simulated dataset.

One run of the CLI's default model and optimiser settings on ``--cells`` simulated training
cells, its EMA model evaluated every ``--eval-every`` epochs against held-out cells of the same
simulation (PCA fit on the training cells); one JSON line per evaluation on stdout. Used to
measure the default training length rule (``wbdit.run.default_epochs``, benchmarks/QUALITY.md):

    python benchmarks/training_length.py --cells 20000 --epochs 16 --eval-every 2 --out /tmp/len20k
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from wbdit import datasets
from wbdit.data import split_cells
from wbdit.evaluation import during_training
from wbdit.trainer import TrainHook, train


class Clock(TrainHook):
    """Adds the training seconds so far to every epoch record (evaluation time excluded)."""

    def __init__(self):
        self.train_s = 0.0

    def on_epoch_end(self, record: dict) -> None:
        self.train_s += record["epoch_time_s"]
        record["train_s"] = self.train_s
        print(
            json.dumps({k: record[k] for k in ("epoch", "step", "loss", "train_s", "eval") if k in record}), flush=True
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=20000, help="training cells (30%% more are simulated and held out)")
    p.add_argument("--genes", type=int, default=200)
    p.add_argument("--types", type=int, default=10)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=2, help="epochs")
    p.add_argument("--eval-cells", type=int, default=1000, help="generated and held-out cells per evaluation")
    p.add_argument("--out", required=True, help="run directory")
    args = p.parse_args()
    torch.set_num_threads(1)  # shared 2-core machines: one thread avoids OpenMP spin-waiting
    adata = datasets.synthetic(n_cells=round(args.cells / 0.7), n_genes=args.genes, n_types=args.types, seed=0)
    train_idx, test_idx = split_cells(adata, "cell_type", 0.3, seed=0)
    real_train, held_out = adata[train_idx].copy(), adata[test_idx[: args.eval_cells]].copy()
    t0 = time.perf_counter()
    train(
        real_train,
        label_key="cell_type",
        out_dir=args.out,
        epochs=args.epochs,
        eval_every=args.eval_every,
        evaluate=during_training(held_out, reference=real_train, n_cells=args.eval_cells),
        device="cpu",
        progress=False,
        hook=Clock(),
    )
    print(json.dumps({"n_train": real_train.n_obs, "wall_s": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
