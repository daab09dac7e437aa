"""What happens when things go wrong: diverging training, damaged checkpoints, NaN samples, a
second writer, TPM-like input and hostile files (README, "What happens when things go wrong").
Killed-and-resumed training is in tests/test_streaming.py (KILL_CHILD)."""

from __future__ import annotations

import json
import os
import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import wbdit
from wbdit import datasets
from wbdit.checkpoint import (
    BAD,
    CHECKPOINT,
    LOG,
    PREVIOUS,
    append_log,
    load_checkpoint,
    nonfinite_tensors,
    read_log,
    truncate_log,
)
from wbdit.cli import main
from wbdit.data import read_h5ad, write_h5ad
from wbdit.diffusion import GaussianDiffusion
from wbdit.errors import DivergedError, InputError
from wbdit.model import WhiteBoxDiT
from wbdit.preprocessing import LOG_MAX, Preprocessor, log_normalize, validate_expression
from wbdit.run import Run
from wbdit.runlock import LOCK, RunLockedError, run_lock
from wbdit.sampling import sample
from wbdit.trainer import NONFINITE_PATIENCE, TrainHook

TINY = dict(patch_size=10, hidden_size=16, depth=1, num_heads=2)
TINY_CLI = [
    "--hidden-size",
    "16",
    "--depth",
    "1",
    "--num-heads",
    "2",
    "--patch-size",
    "10",
    "--batch-size",
    "16",
    "--device",
    "cpu",
]


def counts(n_cells=48, seed=0) -> ad.AnnData:
    return datasets.synthetic(n_cells=n_cells, n_genes=20, n_types=2, markers_per_type=4, seed=seed)


def tpm(adata: ad.AnnData) -> ad.AnnData:
    """The same cells as transcripts per million: non-integer, up to ~1e5."""
    X = adata.X.toarray().astype(np.float64)
    out = adata.copy()
    out.X = sp.csr_matrix((X / X.sum(axis=1, keepdims=True) * 1e6).astype(np.float32))
    return out


def tiny(n, c):
    return WhiteBoxDiT(n_genes=n, num_classes=c, **TINY)


def quick_train(adata, out_dir, model=tiny, **kw):
    kw = dict(
        dict(
            label_key="cell_type",
            epochs=2,
            batch_size=16,
            lr=3e-3,
            device="cpu",
            progress=False,
            diffusion=GaussianDiffusion(num_timesteps=50),
        ),
        **kw,
    )
    return wbdit.train(adata, model, out_dir=out_dir, **kw)


def strict_json(line: str):
    def refuse(token):
        raise AssertionError(f"not strict JSON: {token} in {line!r}")

    return json.loads(line, parse_constant=refuse)


def nan_at_steps(steps: set[int]) -> WhiteBoxDiT:
    """A tiny model whose output is NaN at the given training steps (1-based; one forward per step)."""
    model = WhiteBoxDiT(n_genes=20, num_classes=2, **TINY)
    calls = [0]

    def poison(module, args, out):
        calls[0] += 1
        return out * float("nan") if calls[0] in steps else out

    model.register_forward_hook(poison)
    return model


class Snapshots(TrainHook):
    """Appends the model's parameters after every step to ``into``."""

    def __init__(self, model, into):
        self.model, self.into = model, into

    def on_step_end(self, step, loss):
        self.into.append({k: v.clone() for k, v in self.model.state_dict().items()})


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- non-finite steps


def test_nonfinite_steps_are_not_applied_and_three_in_a_row_stop_training(tmp_path):
    """3 steps per epoch, a checkpoint every step; NaN at step 2, then at 5, 6, 7."""
    model, after = nan_at_steps({2, 5, 6, 7}), []
    stopped = (
        r"not finite at steps 5 to 7 \(3 in a row\); they were not applied \(the weights are those of step "
        r"4\) and .* keeps its checkpoint of step 6"
    )
    with pytest.raises(DivergedError, match=stopped):
        quick_train(counts(), tmp_path / "r", model, epochs=4, checkpoint_every=1, hook=Snapshots(model, after))
    assert NONFINITE_PATIENCE == 3 and len(after) == 7
    assert same(after[1], after[0]) and not same(after[2], after[1])  # step 2 skipped, step 3 applied
    assert same(after[4], after[3]) and same(after[5], after[3]) and same(after[6], after[3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the newest checkpoint is usable: no fallback
        ckpt = load_checkpoint(tmp_path / "r")
    assert ckpt["step"] == 6 and nonfinite_tensors(ckpt) == [] and same(ckpt["model"], after[3])
    assert [strict_json(line)["nonfinite_steps"] for line in (tmp_path / "r" / LOG).read_text().splitlines()] == [1, 2]
    assert not (tmp_path / "r" / LOCK).exists()  # the lock went with the error
    with run_lock(tmp_path / "r"):
        pass


def test_skip_nonfinite_trains_on_counting_the_skipped_steps(tmp_path):
    model = nan_at_steps({2, 4, 5, 6, 7})  # epoch 2 has no finite step at all
    run = quick_train(counts(), tmp_path / "r", model, epochs=4, skip_nonfinite=True)
    lines = [strict_json(line) for line in (tmp_path / "r" / LOG).read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in lines] == [1, 3, 1, 0]
    assert lines[1]["loss"] is None and all(np.isfinite(r["loss"]) for i, r in enumerate(lines) if i != 1)
    assert run.history == lines and nonfinite_tensors(load_checkpoint(tmp_path / "r")) == []


def test_cli_train_that_diverges_exits_non_zero_and_keeps_a_finite_checkpoint(tmp_path, capsys):
    path = tmp_path / "cells.h5ad"
    write_h5ad(counts(), path)
    rc = main(
        [
            "train",
            str(path),
            "--label-key",
            "cell_type",
            "--out",
            str(tmp_path / "r"),
            "--epochs",
            "3",
            "--lr",
            "1e30",
            *TINY_CLI,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "wbdit train: error: training diverged: the loss or gradient norm was not finite at steps" in err
    assert "Traceback" not in err and "--skip-nonfinite" in err
    assert nonfinite_tensors(load_checkpoint(tmp_path / "r")) == []


# ---------------------------------------------------------------- checkpoints


def test_a_truncated_newest_checkpoint_falls_back_and_resume_ends_like_an_unbroken_run(tmp_path):
    straight = quick_train(counts(), tmp_path / "straight", epochs=3)
    quick_train(counts(), tmp_path / "r", epochs=2)
    newest = tmp_path / "r" / CHECKPOINT
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    lost = r"cannot be read .*previous checkpoint .*\(epoch 1, step 3\): what was trained after step 3 is lost"
    with pytest.warns(UserWarning, match=lost):
        run = Run.load(tmp_path / "r")
    assert run.epoch == 1
    assert sample(run, n_cells=4, steps=2, device="cpu", progress=False).n_obs == 4
    with pytest.warns(UserWarning, match=f"moved it to {BAD}"):
        resumed = quick_train(counts(), tmp_path / "r", epochs=3, resume=True)
    assert same(load_checkpoint(tmp_path / "r")["model"], load_checkpoint(tmp_path / "straight")["model"])
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted([BAD, CHECKPOINT, PREVIOUS, LOG])


def test_a_nan_checkpoint_falls_back_and_alone_is_refused_by_sample(tmp_path, capsys):
    quick_train(counts(), tmp_path / "r", epochs=2)
    ckpt = torch.load(tmp_path / "r" / CHECKPOINT, weights_only=True)  # as a wbdit without the guard wrote it
    ckpt["ema"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in ckpt["ema"].items()}
    torch.save(ckpt, tmp_path / "r" / CHECKPOINT)
    with pytest.warns(UserWarning, match=r"\(step 6\) holds non-finite values in \d+ tensors \(ema\..*step 3\)"):
        assert load_checkpoint(tmp_path / "r")["step"] == 3
    (tmp_path / "r" / PREVIOUS).unlink()
    out = tmp_path / "gen.h5ad"
    assert main(["sample", str(tmp_path / "r"), "--n-cells", "5", "-o", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "holds non-finite values" in err and "no previous checkpoint to fall back to" in err and not out.exists()


def test_a_checkpoint_written_before_the_two_checkpoint_format_loads_and_resumes(tmp_path):
    quick_train(counts(), tmp_path / "r", epochs=1)
    ckpt = load_checkpoint(tmp_path / "r")
    for key in ("log_line", "epoch_nonfinite"):  # format 1 as it was: one file, none of the new keys
        del ckpt[key]
    del ckpt["train_config"]["skip_nonfinite"]
    torch.save(ckpt, tmp_path / "r" / CHECKPOINT)
    assert not (tmp_path / "r" / PREVIOUS).exists()
    assert Run.load(tmp_path / "r").epoch == 1
    assert quick_train(counts(), tmp_path / "r", epochs=2, resume=True).epoch == 2


def test_sample_refuses_to_write_non_finite_cells(tmp_path, capsys):
    quick_train(counts(), tmp_path / "r", epochs=1)
    run = Run.load(tmp_path / "r")
    with torch.no_grad():
        next(run.model.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="5 of 5 generated cells have non-finite values"):
        sample(run, n_cells=5, steps=2, device="cpu", progress=False)
    # Finite weights that overflow: the checkpoint loads, the cells it makes do not.
    ckpt = load_checkpoint(tmp_path / "r")
    ckpt["ema"] = {k: v * 1e30 if v.is_floating_point() else v for k, v in ckpt["ema"].items()}
    torch.save(ckpt, tmp_path / "r" / CHECKPOINT)
    out = tmp_path / "gen.h5ad"
    assert (
        main(["sample", str(tmp_path / "r"), "--n-cells", "5", "--steps", "2", "-o", str(out), "--device", "cpu"]) == 2
    )
    assert "5 of 5 generated cells have non-finite values" in capsys.readouterr().err
    assert list(tmp_path.glob("gen*")) == []


def test_log_is_strict_json_and_a_line_cut_short_is_dropped(tmp_path):
    append_log(tmp_path, dict(epoch=1, step=3, loss=float("nan"), eval=dict(mmd=float("inf"), w=[1.0, float("nan")])))
    line = (tmp_path / LOG).read_text()
    assert strict_json(line) == dict(epoch=1, step=3, loss=None, eval=dict(mmd=None, w=[1.0, None]))
    with open(tmp_path / LOG, "a") as f:
        f.write('{"epoch": 2, "st')  # killed while appending
    assert read_log(tmp_path) == [strict_json(line)]
    truncate_log(tmp_path, 2, json.dumps(dict(epoch=2, step=6, loss=0.5)))  # the checkpoint's copy of its line
    assert [r["epoch"] for r in read_log(tmp_path)] == [1, 2]
    with open(tmp_path / LOG, "a") as f:
        f.write("garbage\n" + line)
    with pytest.raises(ValueError, match=r"log.jsonl: line 3 is not JSON"):
        read_log(tmp_path)


# ---------------------------------------------------------------- one writer


def test_a_second_writer_is_refused_at_once(tmp_path, capsys):
    path = tmp_path / "cells.h5ad"
    write_h5ad(counts(), path)
    with run_lock(tmp_path / "r"):
        assert f"pid {os.getpid()} on " in (tmp_path / "r" / LOCK).read_text()
        with pytest.raises(RunLockedError, match=f"is being written by pid {os.getpid()} on"):
            quick_train(counts(), tmp_path / "r")
        assert main(["train", str(path), "--out", str(tmp_path / "r"), *TINY_CLI]) == 2
        assert "is being written by pid" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # the refused runs wrote nothing; the lock took its directory with it


# ---------------------------------------------------------------- input kinds


def test_the_input_kind_rule():
    X = counts().X
    logx, _ = log_normalize(X, "counts")
    cpm_log = logx.copy()
    cpm_log.data = np.log1p(np.expm1(logx.data) * 100)  # log1p(normalize_total(1e6)): up to 13.8
    assert validate_expression(X) == "counts"
    assert validate_expression(logx) == validate_expression(cpm_log) == "log-normalized"
    assert validate_expression(tpm(counts()).X) == "tpm-like"
    assert validate_expression(np.array([[0.5, LOG_MAX]])) == "log-normalized"
    assert validate_expression(np.array([[0.5, LOG_MAX + 0.5]])) == "tpm-like"


def test_tpm_input_is_normalized_and_logged_like_the_counts_it_came_from():
    a = counts()
    pre_c, logx_c, _ = Preprocessor.fit(a)
    pre_t, logx_t, _ = Preprocessor.fit(tpm(a))
    assert pre_t.input_kind == "tpm-like" and pre_t.log_library == {} and pre_c.input_kind == "counts"
    np.testing.assert_allclose(logx_t.toarray(), logx_c.toarray(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pre_t.x_max, pre_c.x_max, rtol=1e-5)
    hvg, logx, _ = Preprocessor.fit(tpm(a), n_top_genes=10)  # expm1 of log values: no overflow (issue 19)
    assert hvg.n_genes == 10 and np.isfinite(logx.data).all()


def test_a_streamed_file_switches_kind_when_a_later_chunk_shows_it(tmp_path):
    """Chunks of 16: integers, then non-integer values up to 20, then TPM: read as tpm-like."""
    a = counts()
    X = a.X.toarray().astype(np.float32)
    X[16:32] = np.log1p(X[16:32])
    X[32:] = X[32:] / X[32:].sum(axis=1, keepdims=True) * 1e6
    a.X = sp.csr_matrix(X)
    a.write_h5ad(tmp_path / "mixed.h5ad")
    mem, _, _ = Preprocessor.fit(a)
    streamed, _, _ = Preprocessor.fit(read_h5ad(tmp_path / "mixed.h5ad", backed=True), chunk_cells=16)
    assert mem.input_kind == streamed.input_kind == "tpm-like"
    assert streamed.x_max == mem.x_max and streamed.center == mem.center


def test_input_kind_overrides_and_their_refusals(tmp_path):
    with pytest.raises(InputError, match="input kind 'counts' was given but it holds non-integer values"):
        Preprocessor.fit(tpm(counts()), input_kind="counts")
    with pytest.raises(InputError, match="input kind 'log-normalized' was given but it holds values up to"):
        Preprocessor.fit(tpm(counts()), input_kind="log-normalized")
    run = quick_train(counts(), tmp_path / "r", epochs=1, input_kind="tpm-like")  # e.g. rounded TPM
    assert run.preprocessor.input_kind == "tpm-like"
    with pytest.raises(
        ValueError, match="counts=True needs a model trained on raw counts; this one was trained on tpm-like data"
    ):
        sample(run, n_cells=2, steps=2, counts=True, device="cpu", progress=False)


def test_tpm_file_trains_with_gene_selection_and_evaluates_in_log_space(tmp_path, capsys):
    """The Smart-seq2 case of issue 19: TPM-like values, --n-top-genes."""
    real = tpm(counts(n_cells=64, seed=3))
    write_h5ad(real, tmp_path / "tpm.h5ad")
    rc = main(
        [
            "train",
            str(tmp_path / "tpm.h5ad"),
            "--label-key",
            "cell_type",
            "--out",
            str(tmp_path / "r"),
            "--epochs",
            "1",
            "--n-top-genes",
            "10",
            *TINY_CLI,
        ]
    )
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "input .X: non-integer values above 20, not logged (TPM" in printed.out  # the kind, printed
    assert load_checkpoint(tmp_path / "r")["preprocessor"]["input_kind"] == "tpm-like"

    from wbdit.evaluation import evaluate  # scikit-learn and POT: only this test

    lognorm = real.copy()
    lognorm.X = log_normalize(real.X, "counts")[0]
    generated = lognorm[::2].copy()
    generated.obs_names = [f"g{i}" for i in range(generated.n_obs)]
    on_tpm = evaluate(real, generated, label_key="cell_type", baselines=False).headline()
    on_log = evaluate(lognorm, generated, label_key="cell_type", baselines=False).headline()
    assert on_tpm.keys() == on_log.keys()
    for key, value in on_log.items():
        assert (on_tpm[key] is None) if value is None else on_tpm[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


# ---------------------------------------------------------------- hostile inputs


def _csr_with_float16_data(path):
    write_h5ad(counts(), path)
    with h5py.File(path, "r+") as f:
        data = f["X/data"][...]
        del f["X/data"]
        f["X/data"] = data.astype(np.float16)


def _write(path, kind):
    a = counts()
    if kind == "duplicated var_names":
        a.var_names = ["g"] * 10 + [f"g{i}" for i in range(10)]
    elif kind == "zero genes":
        a = a[:, :0].copy()
    elif kind == "NaN labels":
        a.obs["cell_type"] = pd.Categorical(["T" if i % 5 else None for i in range(a.n_obs)])
    elif kind == "continuous numbers as labels":
        a.obs["cell_type"] = np.linspace(0.1, 7.3, a.n_obs)
    elif kind == "empty-string labels":
        a.obs["cell_type"] = np.where(np.arange(a.n_obs) % 2, "T", "")
    elif kind == "float16 CSR data":
        return _csr_with_float16_data(path)
    elif kind == "HDF5 but not AnnData":
        with h5py.File(path, "w") as f:
            f["counts"] = np.ones((4, 4))
        return
    elif kind == "truncated half way":
        write_h5ad(a, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return
    elif kind == "not HDF5":
        path.write_text("cell,gene\n")
        return
    write_h5ad(a, path)


@pytest.mark.parametrize(
    "kind,message",
    [
        ("duplicated var_names", "var_names has 1 repeated gene names"),
        ("zero genes", ".X has zero genes"),
        ("NaN labels", "obs['cell_type'] has 10 missing labels"),
        ("continuous numbers as labels", "obs['cell_type'] holds non-integer numbers (e.g. 0.1), not labels"),
        ("empty-string labels", "obs['cell_type'] has 24 empty labels"),
        ("float16 CSR data", "could not be read as AnnData: scipy.sparse does not support dtype float16"),
        ("HDF5 but not AnnData", "an HDF5 file but not AnnData (it holds ['counts']"),
        ("truncated half way", "truncated or damaged, HDF5 cannot open it"),
        ("not HDF5", "not an .h5ad (HDF5) file"),
    ],
)
def test_a_hostile_file_is_one_clear_error_and_writes_nothing(tmp_path, capsys, kind, message):
    path = tmp_path / "in.h5ad"
    _write(path, kind)
    rc = main(["train", str(path), "--label-key", "cell_type", "--out", str(tmp_path / "r"), *TINY_CLI])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists() or list((tmp_path / "r").iterdir()) == []


def _messy(kind):
    a = counts()
    X = sp.csr_matrix(a.X, dtype=np.float32)
    if kind == "float16 dense X":
        a.X = X.toarray().astype(np.float16)
    elif kind == "int64 X":
        a.X = X.astype(np.int64)
    elif kind == "CSR with stored zeros":
        X.data[::3] = 0  # explicit zeros, and those counts removed
        a.X = X
    elif kind == "CSR with unsorted indices":
        Y = X.copy()
        Y.data[::3] = 0
        Y.eliminate_zeros()
        for i in range(Y.shape[0]):  # every row's entries reversed
            s, e = Y.indptr[i], Y.indptr[i + 1]
            Y.indices[s:e], Y.data[s:e] = Y.indices[s:e][::-1].copy(), Y.data[s:e][::-1].copy()
        Y.has_sorted_indices = False
        a.X = Y
    elif kind == "duplicated obs_names":
        a.obs_names = ["cell"] * a.n_obs
    elif kind == "integer labels":
        a.obs["cell_type"] = a.obs["cell_type"].cat.codes.astype(np.int64)
    return a


@pytest.mark.parametrize(
    "kind",
    [
        "float16 dense X",
        "int64 X",
        "CSR with stored zeros",
        "CSR with unsorted indices",
        "duplicated obs_names",
        "integer labels",
    ],
)
def test_an_unusual_but_valid_input_is_preprocessed_as_its_clean_twin(kind):
    """Each is the same data as a clean float32 CSR file (stored zeros: with those counts removed;
    float16: the values float16 holds, counts above 2048 rounded; integer labels: named "0", "1")."""
    messy = _messy(kind)
    clean = counts()
    if kind == "float16 dense X":
        clean.X = sp.csr_matrix(clean.X.toarray().astype(np.float16).astype(np.float32))
    if kind in ("CSR with stored zeros", "CSR with unsorted indices"):
        X = sp.csr_matrix(clean.X, dtype=np.float32)
        X.data[::3] = 0
        X.eliminate_zeros()
        clean.X = X
    pre_m, logx_m, labels_m = Preprocessor.fit(messy, "cell_type", n_top_genes=12)
    pre_c, logx_c, labels_c = Preprocessor.fit(clean, "cell_type", n_top_genes=12)
    a, b = pre_m.to_dict(), pre_c.to_dict()
    for key in ("input_kind", "var_names", "x_max", "center", "scale", "zero_threshold"):
        assert a[key] == b[key], key
    assert list(a["log_library"].values()) == list(b["log_library"].values())
    assert np.array_equal(labels_m, labels_c) and (logx_m != logx_c).nnz == 0
