"""Fast by default: train, Run.load, sample and the CLI run the fast paths; --reference / fused=False opt out."""

from __future__ import annotations

import pytest

from wbdit import datasets, ops
from wbdit.cli import main
from wbdit.data import write_h5ad
from wbdit.diffusion import GaussianDiffusion
from wbdit.model import WhiteBoxDiT
from wbdit.run import Run
from wbdit.sampling import sample
from wbdit.trainer import train

TINY = dict(patch_size=10, hidden_size=32, depth=1, num_heads=2)
TINY_CLI = ["--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--patch-size", "10"]


def ran_fast_paths() -> bool:
    return all(ops.report()[op] not in ("reference", "reference (fallback)") for op in ("mssa", "ista"))


@pytest.fixture(scope="module")
def adata():
    return datasets.synthetic(n_cells=32, n_genes=25, n_types=3, markers_per_type=5, seed=0)


def quick(adata, out_dir, **kw):
    model = WhiteBoxDiT(n_genes=25, num_classes=3, **TINY)  # the constructor's default: fused=False
    return train(
        adata,
        model,
        label_key="cell_type",
        out_dir=out_dir,
        epochs=1,
        batch_size=16,
        device="cpu",
        progress=False,
        diffusion=GaussianDiffusion(num_timesteps=50),
        **kw,
    )


def test_train_load_and_sample_take_the_fast_paths(adata, tmp_path):
    run = quick(adata, tmp_path / "r")
    assert run.model.fused and ran_fast_paths()
    loaded = Run.load(tmp_path / "r")
    assert loaded.model.fused
    sample(loaded, n_cells=3, steps=2, device="cpu", progress=False)
    assert ran_fast_paths()
    sample(loaded, n_cells=3, steps=2, device="cpu", progress=False, fused=False)
    assert not loaded.model.fused and ops.report()["mssa"] == "reference"


def test_fused_false_trains_on_the_reference(adata, tmp_path):
    run = quick(adata, tmp_path / "r", fused=False)
    assert not run.model.fused and ops.report()["mssa"] == ops.report()["ista"] == "reference"
    assert not Run.load(tmp_path / "r", fused=False).model.fused


def test_cli_reference_flag(adata, tmp_path):
    path = tmp_path / "cells.h5ad"
    write_h5ad(adata, path)
    out = tmp_path / "r"
    args = [
        "train",
        str(path),
        "--label-key",
        "cell_type",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        *TINY_CLI,
    ]
    assert main([*args, "--reference"]) == 0
    assert ops.report()["mssa"] == "reference"
    gen = tmp_path / "g.h5ad"
    assert main(["sample", str(out), "-o", str(gen), "--n-cells", "2", "--steps", "2", "--device", "cpu"]) == 0
    assert ran_fast_paths()
    assert (
        main(["sample", str(out), "-o", str(gen), "--n-cells", "2", "--steps", "2", "--device", "cpu", "--reference"])
        == 0
    )
    assert ops.report()["mssa"] == "reference"
