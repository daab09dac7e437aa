"""The default training length (a rule on the number of cells) and the one progress report over a run."""

from __future__ import annotations

import io

import pytest

from wbdit import datasets
from wbdit.cli import main
from wbdit.data import write_h5ad
from wbdit.progress import Progress, duration
from wbdit.run import TrainConfig, default_epochs

TINY = ["--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--patch-size", "10", "--reference"]


@pytest.mark.parametrize(
    "n_cells, batch, epochs",
    [
        (490, 32, 450),  # 70% of the bundled PBMC cells: the demo's 6,750 steps
        (20000, 32, 16),  # 625 steps an epoch: 10,000 steps
        (100000, 32, 16),  # large: 16 passes
        (48, 64, 6750),  # fewer cells than a batch: one step an epoch
    ],
)
def test_default_epochs(n_cells, batch, epochs):
    assert default_epochs(n_cells, batch) == epochs


def test_epochs_and_max_steps_override_the_default():
    assert TrainConfig().planned(490).epochs == 450
    assert TrainConfig(epochs=3).planned(490).epochs == 3
    assert TrainConfig(max_steps=100).planned(490).epochs == 7  # enough epochs of 15 steps for 100 steps


def test_cli_default_run_prints_its_plan_and_reports_progress_in_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("wbdit.run.MIN_STEPS", 20)
    monkeypatch.setattr("wbdit.run.MIN_EPOCHS", 10)
    write_h5ad(datasets.synthetic(n_cells=48, n_genes=25, n_types=3, markers_per_type=5), tmp_path / "cells.h5ad")
    assert (
        main(
            [
                "train",
                str(tmp_path / "cells.h5ad"),
                "--out",
                str(tmp_path / "r"),
                "--batch-size",
                "16",
                "--label-key",
                "cell_type",
                "--device",
                "cpu",
                *TINY,
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "plan: 30 optimizer steps = 10 epochs of 3 batches of 16 cells (the default for 48 cells" in out
    assert "trained 10 epochs" in out and "epoch 1:" not in out  # one report, not one per epoch
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    assert lines[0].startswith("step 20/30 (67%)") and "cells/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("step 30/30 (100%)") and "\r" not in err  # not a terminal: no carriage returns


def test_progress_lines_every_five_percent():
    stream = io.StringIO()
    p = Progress(total=1000, done=0, cells_per_step=32, stream=stream)
    for step in range(1, 1001):
        p.update(step, 0.5)
    steps = [int(line.split()[1].split("/")[0].replace(",", "")) for line in stream.getvalue().splitlines()]
    assert steps == [20] + list(range(50, 1001, 50))
    assert duration(3725) == "1h02m" and duration(330) == "5m30s" and duration(12.4) == "12s"
