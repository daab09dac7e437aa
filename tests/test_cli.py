"""The ``wbdit`` command line, called in-process (``wbdit.cli.main``) on tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from wbdit import datasets
from wbdit.checkpoint import CHECKPOINT, LOG, PREVIOUS, load_checkpoint
from wbdit.cli import main
from wbdit.data import read_h5ad, write_h5ad

TINY = ["--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--patch-size", "10"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    write_h5ad(datasets.synthetic(n_cells=48, n_genes=25, n_types=3, markers_per_type=5, seed=0), path)
    return path


@pytest.fixture(scope="module")
def trained(data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "x"
    rc = main(
        [
            "train",
            str(data_file),
            "--label-key",
            "cell_type",
            "--out",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--device",
            "cpu",
            "--seed",
            "1",
            *TINY,
        ]
    )
    assert rc == 0
    return out


def error_of(capsys) -> str:
    return capsys.readouterr().err


# ---------------------------------------------------------------- end to end


def test_train_writes_a_run(trained, capsys):
    assert sorted(p.name for p in trained.iterdir()) == sorted([CHECKPOINT, PREVIOUS, LOG])
    ckpt = load_checkpoint(trained)
    assert ckpt["arch"] == "wbdit" and ckpt["epoch"] == 2
    assert ckpt["model_config"] == dict(n_genes=25, num_classes=3, patch_size=10, hidden_size=32, depth=1, num_heads=2)
    assert ckpt["train_config"]["seed"] == 1 and ckpt["train_config"]["batch_size"] == 16
    assert len((trained / LOG).read_text().splitlines()) == 2


def test_sample_end_to_end(trained, tmp_path, capsys):
    out = tmp_path / "gen.h5ad"
    rc = main(
        [
            "sample",
            str(trained),
            "--n-cells",
            "10",
            "-o",
            str(out),
            "--steps",
            "3",
            "--device",
            "cpu",
            "--cell-type",
            "type_1=4",
            "--cell-type",
            "type_2=6",
        ]
    )
    assert rc == 0, error_of(capsys)
    assert "wrote 10 cells x 25 genes" in capsys.readouterr().out
    gen = read_h5ad(out)
    assert list(gen.var_names) == [f"gene_{i}" for i in range(25)]
    assert gen.obs["cell_type"].value_counts().to_dict() == {"type_1": 4, "type_2": 6, "type_0": 0}
    u = gen.uns["wbdit"]  # the defaults but --steps: DPM-Solver++(2M) with guidance on an interval of t
    assert u["sampler"] == "dpm++2m" and int(u["steps"]) == 3 and float(u["cfg_scale"]) == 1.5
    assert list(u["cfg_interval"]) == [0.2, 0.8]
    X = gen.X.toarray()
    assert np.isfinite(X).all() and (X >= 0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.h5ad"]


def test_sample_counts_and_ddpm_options(trained, tmp_path, capsys):
    out = tmp_path / "counts.h5ad"
    rc = main(
        [
            "sample",
            str(trained),
            "--n-cells",
            "5",
            "-o",
            str(out),
            "--sampler",
            "ddim",
            "--steps",
            "2",
            "--eta",
            "1.0",
            "--cfg-scale",
            "1.5",
            "--counts",
            "--seed",
            "3",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0, error_of(capsys)
    gen = read_h5ad(out)
    X = gen.X.toarray()
    assert (X >= 0).all() and np.array_equal(X, np.round(X)) and "log_normalized" in gen.layers
    assert float(gen.uns["wbdit"]["cfg_scale"]) == 1.5 and float(gen.uns["wbdit"]["eta"]) == 1.0


def test_resume_continues_the_run(data_file, tmp_path, capsys):
    args = ["train", str(data_file), "--label-key", "cell_type", "--batch-size", "16", "--device", "cpu", *TINY]
    assert main([*args, "--out", str(tmp_path / "a"), "--epochs", "1"]) == 0
    assert main([*args, "--out", str(tmp_path / "a"), "--epochs", "2", "--resume"]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--epochs", "2"]) == 0
    la = [json.loads(s)["loss"] for s in (tmp_path / "a" / LOG).read_text().splitlines()]
    lb = [json.loads(s)["loss"] for s in (tmp_path / "b" / LOG).read_text().splitlines()]
    assert len(la) == 2 and la == lb
    assert "trained 2 epochs" in capsys.readouterr().out


def test_train_options_reach_the_run(data_file, tmp_path, capsys):
    out = tmp_path / "dit"
    rc = main(
        [
            "train",
            str(data_file),
            "--out",
            str(out),
            "--arch",
            "dit",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--n-top-genes",
            "12",
            "--scaling",
            "standard",
            "--schedule",
            "cosine",
            "--prediction",
            "v",
            "--lr",
            "0.002",
            "--device",
            "cpu",
            *TINY,
        ]
    )
    assert rc == 0, error_of(capsys)
    ckpt = load_checkpoint(out)
    assert (
        ckpt["arch"] == "dit" and ckpt["model_config"]["n_genes"] == 12 and ckpt["model_config"]["num_classes"] is None
    )
    assert ckpt["diffusion"] == dict(num_timesteps=1000, schedule="cosine", prediction="v")
    assert ckpt["preprocessor"]["scaling"] == "standard" and ckpt["train_config"]["lr"] == 0.002


# ---------------------------------------------------------------- bad input


def test_train_missing_file(tmp_path, capsys):
    rc = main(["train", str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "r"), *TINY])
    assert rc != 0
    assert "missing.h5ad: no such file" in error_of(capsys)
    assert not (tmp_path / "r").exists()


def test_train_not_an_h5ad(tmp_path, capsys):
    bad = tmp_path / "cells.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["train", str(bad), "--out", str(tmp_path / "r")]) != 0
    assert "not an .h5ad" in error_of(capsys)
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "r")]) != 0
    assert "is a directory" in error_of(capsys)
    assert not (tmp_path / "r").exists()


def test_train_bad_label_key(data_file, tmp_path, capsys):
    rc = main(["train", str(data_file), "--label-key", "celltype", "--out", str(tmp_path / "r"), *TINY])
    assert rc != 0
    err = error_of(capsys)
    assert "label key 'celltype' not in obs" in err and "cell_type" in err
    assert not (tmp_path / "r").exists()


def test_train_bad_values(tmp_path, capsys):
    a = datasets.synthetic(n_cells=10, n_genes=20, n_types=2, markers_per_type=3)
    a.X = a.X.toarray()
    a.X[0, 0] = np.nan
    write_h5ad(a, tmp_path / "nan.h5ad")
    assert main(["train", str(tmp_path / "nan.h5ad"), "--out", str(tmp_path / "r")]) != 0
    assert "NaN or infinite" in error_of(capsys)
    a.X[0, 0] = -2
    write_h5ad(a, tmp_path / "neg.h5ad")
    assert main(["train", str(tmp_path / "neg.h5ad"), "--out", str(tmp_path / "r")]) != 0
    assert "negative values" in error_of(capsys)
    write_h5ad(a[:0].copy(), tmp_path / "empty.h5ad")
    assert main(["train", str(tmp_path / "empty.h5ad"), "--out", str(tmp_path / "r")]) != 0
    assert "zero cells" in error_of(capsys)
    assert not (tmp_path / "r").exists()


def test_train_existing_run_without_resume(trained, data_file, capsys):
    before = (trained / CHECKPOINT).read_bytes()
    rc = main(
        [
            "train",
            str(data_file),
            "--label-key",
            "cell_type",
            "--out",
            str(trained),
            "--epochs",
            "3",
            "--device",
            "cpu",
            *TINY,
        ]
    )
    err = error_of(capsys)
    assert rc != 0 and "already holds a run" in err and "--resume" in err
    assert (trained / CHECKPOINT).read_bytes() == before


def test_train_resume_with_another_model_config(trained, data_file, capsys):
    before = (trained / CHECKPOINT).read_bytes()
    rc = main(
        [
            "train",
            str(data_file),
            "--label-key",
            "cell_type",
            "--out",
            str(trained),
            "--epochs",
            "3",
            "--device",
            "cpu",
            "--resume",
            "--seed",
            "1",
            "--batch-size",
            "16",
            "--hidden-size",
            "64",
            "--depth",
            "1",
            "--num-heads",
            "2",
        ]
    )
    assert rc != 0
    err = error_of(capsys)
    assert "cannot resume" in err and "model_config" in err and "'hidden_size': 64" in err
    assert (trained / CHECKPOINT).read_bytes() == before


def test_sample_unknown_cell_type(trained, tmp_path, capsys):
    out = tmp_path / "gen.h5ad"
    rc = main(["sample", str(trained), "-o", str(out), "--n-cells", "4", "--cell-type", "B cell=2", "--device", "cpu"])
    assert rc != 0
    assert "unknown cell type 'B cell'" in error_of(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("n", ["0", "-5"])
def test_sample_n_cells_must_be_positive(trained, tmp_path, capsys, n):
    out = tmp_path / "gen.h5ad"
    with pytest.raises(SystemExit) as exc:
        main(["sample", str(trained), "-o", str(out), "--n-cells", n])
    assert exc.value.code != 0
    assert f"--n-cells: must be > 0, got {n}" in error_of(capsys)
    assert list(tmp_path.iterdir()) == []


def test_sample_bad_cell_type_syntax(trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", str(trained), "-o", str(tmp_path / "g.h5ad"), "--cell-type", "type_1"])
    assert exc.value.code != 0 and "expected NAME=COUNT, got 'type_1'" in error_of(capsys)


def test_sample_missing_run(tmp_path, capsys):
    rc = main(["sample", str(tmp_path / "norun"), "-o", str(tmp_path / "g.h5ad"), "--n-cells", "3"])
    assert rc != 0 and "no checkpoint" in error_of(capsys)
    assert list(tmp_path.iterdir()) == []


def test_sample_failed_write_leaves_no_file(trained, tmp_path, capsys, monkeypatch):
    import anndata as ad

    def broken(self, filename, *a, **k):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken)
    rc = main(
        ["sample", str(trained), "-o", str(tmp_path / "g.h5ad"), "--n-cells", "2", "--steps", "1", "--device", "cpu"]
    )
    assert rc != 0 and "disk full (simulated)" in error_of(capsys)
    assert list(tmp_path.iterdir()) == []


def test_sample_unwritable_output_is_a_clear_error(trained, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc = main(
        ["sample", str(trained), "-o", str(blocker / "g.h5ad"), "--n-cells", "2", "--steps", "1", "--device", "cpu"]
    )
    assert rc != 0 and "error:" in error_of(capsys)
    assert list(tmp_path.iterdir()) == [blocker]


def test_no_command_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code != 0
    with pytest.raises(SystemExit) as exc:
        main(["fly"])
    assert exc.value.code != 0 and "invalid choice" in error_of(capsys)


# ---------------------------------------------------------------- help and demo


def test_python_m_wbdit_help():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "wbdit", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for cmd in ("train", "sample", "evaluate", "report", "demo"):
        assert cmd in out.stdout


@pytest.mark.parametrize("cmd", ["train", "sample", "evaluate", "report", "demo"])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    assert f"usage: wbdit {cmd}" in capsys.readouterr().out


def test_demo_end_to_end_with_one_epoch(tmp_path, capsys, monkeypatch):
    """``wbdit demo`` plumbing on tiny settings: PBMC split, train, sample, evaluate, report, summary.

    Made fast (seconds, not minutes) by: one epoch, a tiny model instead of the "small" preset,
    5 DDIM steps, and umap-learn hidden so the report draws its t-SNE fallback (UMAP's numba
    compilation alone takes 20-60 s on a 2-core machine). The demo's quality is not tested here.
    """
    try:
        import wbdit.evaluation  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"wbdit demo needs wbdit.evaluation, not importable yet: {exc}")
    import wbdit.demo as demo

    monkeypatch.setitem(demo.PRESETS, "small", dict(patch_size=10, hidden_size=32, depth=1, num_heads=2))
    monkeypatch.setattr(demo, "DEMO_SAMPLING", {**demo.DEMO_SAMPLING, "steps": 5})
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap -> ImportError -> t-SNE
    out = tmp_path / "demo"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["demo", "--epochs", "1", "--out", str(out), "--device", "cpu"])
    assert rc == 0, error_of(capsys)
    assert "demo finished" in capsys.readouterr().out
    gen = read_h5ad(out / "generated.h5ad")
    real = read_h5ad(out / "real_heldout.h5ad")
    assert gen.n_obs == real.n_obs and abs(real.n_obs - 210) <= 5  # 30% held out per cell type
    assert list(gen.var_names) == list(real.var_names) and gen.n_vars == 765
    counts = lambda a: a.obs["cell_type"].astype(str).value_counts().to_dict()  # noqa: E731
    assert counts(gen) == counts(real) and len(counts(gen)) == 10
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["n_heldout"] == real.n_obs and summary["n_train"] + real.n_obs == 700
    assert summary["wall_time_s"] > 0 and summary["metrics"]
    assert (out / "summary.txt").read_text().startswith("wbdit demo")
    assert (out / "run" / CHECKPOINT).exists() and any((out / "report").iterdir())
