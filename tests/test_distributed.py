"""Distributed data parallel: torchrun with 2 gloo processes follows the single-process trajectory."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from wbdit.checkpoint import load_checkpoint
from wbdit.cli import main
from wbdit.datasets import write_synthetic_h5ad
from wbdit.distributed import Dist, setup


def test_ranks_split_the_global_batch_and_one_process_is_unchanged():
    d = Dist(torch.device("cpu"), rank=1, world_size=4)
    assert d.shard(32) == slice(8, 16) and not d.is_main
    with pytest.raises(ValueError, match="not divisible by the 4 processes"):
        d.shard(30)
    one = setup(torch.device("cpu"))  # no torchrun environment: no process group
    assert (one.rank, one.world_size, one.is_main, one.shard(30)) == (0, 1, True, slice(0, 30))
    x, net = torch.tensor([1.0, 2.0]), torch.nn.Linear(2, 2)
    assert one.mean(x) is x and one.wrap(net) is net


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_two_gloo_processes_match_one_process_and_resume_with_another_world_size(tmp_path):
    """96 cells, global batch 32: 3 steps per epoch. 1 process x 4 epochs is the reference;
    torchrun 2 processes x 2 epochs (16 cells per rank), then 1 process resumes for epochs 3-4."""
    data = tmp_path / "cells.h5ad"
    write_synthetic_h5ad(data, n_cells=96, n_genes=40, n_types=3, markers_per_type=5, seed=0)
    args = [
        str(data),
        "--label-key",
        "cell_type",
        "--patch-size",
        "10",
        "--hidden-size",
        "32",
        "--depth",
        "1",
        "--num-heads",
        "2",
        "--batch-size",
        "32",
        "--lr",
        "1e-3",
        "--device",
        "cpu",
    ]
    assert main(["train", *args, "--out", str(tmp_path / "one"), "--epochs", "4"]) == 0

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "wbdit",
            "train",
            *args,
            "--out",
            str(tmp_path / "two"),
            "--epochs",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("trained 2 epochs") == 1  # rank 0 alone reports
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt", "log.jsonl"]
    two = _log(tmp_path / "two")
    assert [r["step"] for r in two] == [3, 6]

    assert main(["train", *args, "--out", str(tmp_path / "two"), "--epochs", "4", "--resume"]) == 0
    ref, resumed = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["step"] for r in resumed] == [r["step"] for r in ref] == [3, 6, 9, 12]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in ref[:2]], rtol=1e-5)
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in ref], rtol=1e-5)
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    assert not any(k.startswith("module.") for k in b["model"])  # the unwrapped model is saved
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5)
