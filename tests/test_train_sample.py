"""Training (overfit, exact resume, refusals) and sampling (AnnData out, counts, errors) on tiny runs."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from wbdit import datasets
from wbdit.checkpoint import CHECKPOINT, LOG, PREVIOUS, load_checkpoint
from wbdit.data import read_h5ad, write_h5ad
from wbdit.diffusion import GaussianDiffusion
from wbdit.model import DiT, WhiteBoxDiT
from wbdit.preprocessing import Preprocessor
from wbdit.run import Run, TrainConfig
from wbdit.sampling import plan_labels, sample
from wbdit.trainer import learning_rate, train

TINY = dict(patch_size=10, hidden_size=32, depth=1, num_heads=2)


def tiny(cls=WhiteBoxDiT, **over):
    return lambda n_genes, num_classes: cls(n_genes=n_genes, num_classes=num_classes, **{**TINY, **over})


def tiny_data(n_cells=48, n_genes=25, seed=0) -> ad.AnnData:
    return datasets.synthetic(n_cells=n_cells, n_genes=n_genes, n_types=3, markers_per_type=5, seed=seed)


def quick_train(adata, out_dir, model=None, **kw):
    kw = {
        "epochs": 2,
        "batch_size": 16,
        "lr": 3e-3,
        "device": "cpu",
        "progress": False,
        "diffusion": GaussianDiffusion(num_timesteps=100),
        **kw,
    }
    return train(adata, model or tiny(), out_dir=out_dir, **kw)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A conditional run trained on counts for a few epochs (sampling tests share it)."""
    out = tmp_path_factory.mktemp("run") / "r"
    quick_train(tiny_data(), out, label_key="cell_type", epochs=3)
    return out


@pytest.fixture(scope="module")
def run(run_dir):
    return Run.load(run_dir)


# ---------------------------------------------------------------- training


def test_tiny_model_overfits_tiny_dataset(tmp_path):
    a = datasets.synthetic(n_cells=32, n_genes=20, n_types=2, markers_per_type=5, seed=0)
    r = train(
        a,
        tiny(),
        label_key="cell_type",
        out_dir=tmp_path / "r",
        epochs=80,
        batch_size=16,
        lr=1e-2,
        label_dropout=0.0,
        device="cpu",
        progress=False,
        diffusion=GaussianDiffusion(prediction="epsilon"),
    )
    losses = [rec["loss"] for rec in r.history]
    assert len(losses) == 80 and all(np.isfinite(losses))
    first, last = losses[0], float(np.mean(losses[-8:]))
    assert first > 0.5  # a zero-initialised model starts near E[eps^2] = 1
    assert first / last > 5, (first, last)
    assert last < 0.25


def test_log_and_checkpoint_contents(run_dir):
    lines = [json.loads(s) for s in (run_dir / LOG).read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3] and [r["step"] for r in lines] == [3, 6, 9]  # 48 cells / 16
    for r in lines:
        assert r["loss"] > 0 and r["epoch_time_s"] > 0 and r["cells_per_s"] > 0
    ckpt = load_checkpoint(run_dir)
    assert ckpt["arch"] == "wbdit" and ckpt["epoch"] == 3 and ckpt["step"] == 9
    assert ckpt["model_config"] == dict(n_genes=25, num_classes=3, **TINY)
    assert ckpt["diffusion"] == dict(num_timesteps=100, schedule="linear", prediction="epsilon")
    assert ckpt["preprocessor"]["var_names"] == [f"gene_{i}" for i in range(25)]
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([CHECKPOINT, PREVIOUS, LOG])  # no temporaries, no lock


def test_run_load_carries_ema_weights_in_eval_mode(run_dir):
    r = Run.load(run_dir)
    ckpt = load_checkpoint(run_dir)
    assert not r.model.training and r.epoch == 3 and len(r.history) == 3
    for k, v in r.model.state_dict().items():
        assert torch.equal(v, ckpt["ema"][k])
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    assert isinstance(r.preprocessor, Preprocessor) and r.preprocessor.categories == ["type_0", "type_1", "type_2"]
    assert r.config.batch_size == 16 and r.diffusion.num_timesteps == 100


@pytest.mark.parametrize("cls", [WhiteBoxDiT, DiT])
def test_resume_equals_uninterrupted(tmp_path, cls):
    a = tiny_data(n_cells=32)
    kw = dict(label_key="cell_type", batch_size=8, ema_decay=0.9, warmup_steps=3)
    straight = quick_train(a, tmp_path / "straight", tiny(cls), epochs=4, **kw)
    quick_train(a, tmp_path / "split", tiny(cls), epochs=2, **kw)
    resumed = quick_train(a, tmp_path / "split", tiny(cls), epochs=4, resume=True, **kw)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    assert [r["step"] for r in resumed.history] == [4, 8, 12, 16]
    s, r = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    for part in ("model", "ema"):
        assert s[part].keys() == r[part].keys()
        for k in s[part]:
            assert torch.equal(s[part][k], r[part][k]), (part, k)
    assert s["step"] == r["step"] == 16 and torch.equal(s["rng"], r["rng"])


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    a = tiny_data(n_cells=16)
    torch.rand(7)  # whatever the global RNG did before, the factory's initial weights follow the seed
    r1 = quick_train(a, tmp_path / "a", epochs=2, seed=5)
    r2 = quick_train(a, tmp_path / "b", epochs=2, seed=5)
    r3 = quick_train(a, tmp_path / "c", epochs=2, seed=6)
    assert [r["loss"] for r in r1.history] == [r["loss"] for r in r2.history]
    assert [r["loss"] for r in r1.history] != [r["loss"] for r in r3.history]
    assert all(torch.equal(v, r2.model.state_dict()[k]) for k, v in r1.model.state_dict().items())


def test_resume_drops_log_lines_past_the_checkpoint(tmp_path):
    a = tiny_data(n_cells=32)
    quick_train(a, tmp_path / "r", epochs=2)
    with open(tmp_path / "r" / LOG, "a") as f:  # a run killed after logging epoch 3, before saving it
        f.write(json.dumps(dict(epoch=3, step=99, loss=1.0)) + "\n")
    r = quick_train(a, tmp_path / "r", epochs=3, resume=True)
    assert [x["epoch"] for x in r.history] == [1, 2, 3] and r.history[-1]["step"] != 99


def test_existing_run_dir_without_resume_errors(tmp_path):
    a = tiny_data(n_cells=16)
    quick_train(a, tmp_path / "r", epochs=1)
    before = (tmp_path / "r" / CHECKPOINT).read_bytes()
    with pytest.raises(FileExistsError, match="already holds a run; pass resume=True"):
        quick_train(a, tmp_path / "r", epochs=2)
    assert (tmp_path / "r" / CHECKPOINT).read_bytes() == before


def test_resume_without_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        quick_train(tiny_data(n_cells=16), tmp_path / "empty", resume=True)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(model=tiny(hidden_size=64)), "checkpoint model_config"),
        (dict(model=tiny(DiT)), "checkpoint arch"),
        (dict(diffusion=GaussianDiffusion(num_timesteps=100, prediction="v")), "checkpoint diffusion"),
        (dict(lr=1e-3), "training settings differ"),
    ],
)
def test_resume_refuses_another_config(tmp_path, change, match):
    a = tiny_data(n_cells=16)
    quick_train(a, tmp_path / "r", epochs=1)
    before = (tmp_path / "r" / CHECKPOINT).read_bytes()
    with pytest.raises(ValueError, match=f"cannot resume: {match}"):
        quick_train(a, tmp_path / "r", epochs=2, resume=True, **change)
    assert (tmp_path / "r" / CHECKPOINT).read_bytes() == before


def test_resume_refuses_other_genes(tmp_path):
    quick_train(tiny_data(n_cells=16), tmp_path / "r", epochs=1)
    other = tiny_data(n_cells=16)
    other.var_names = [f"g{i}" for i in range(other.n_vars)]
    with pytest.raises(ValueError, match="cannot resume: the checkpoint was trained on other genes"):
        quick_train(other, tmp_path / "r", epochs=2, resume=True)


def test_model_must_fit_the_data(tmp_path):
    a = tiny_data(n_cells=16)
    with pytest.raises(ValueError, match="n_genes=30 but the data has 25 genes"):
        quick_train(a, tmp_path / "r", model=WhiteBoxDiT(n_genes=30, num_classes=3, **TINY), label_key="cell_type")
    with pytest.raises(ValueError, match="num_classes=None but the labels have 3 classes"):
        quick_train(a, tmp_path / "r", model=WhiteBoxDiT(n_genes=25, **TINY), label_key="cell_type")
    assert not (tmp_path / "r").exists()


def test_checkpoint_write_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the bytes are written...
        raise OSError("disk full (simulated)")  # ...and then the write fails

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        quick_train(tiny_data(n_cells=16), tmp_path / "r", epochs=1)
    assert not (tmp_path / "r").exists()  # the run created it, and leaves nothing behind


# ---------------------------------------------------------------- sampling


def test_sample_writes_genes_labels_and_provenance(run):
    gen = sample(run, n_cells=12, steps=5, seed=0, device="cpu", progress=False)
    assert gen.shape == (12, 25)
    assert list(gen.var_names) == [f"gene_{i}" for i in range(25)]
    assert list(gen.obs["cell_type"].cat.categories) == ["type_0", "type_1", "type_2"]
    X = gen.X.toarray()
    assert np.isfinite(X).all() and (X >= 0).all() and X.max() > 0
    assert (X <= np.asarray(run.preprocessor.x_max, dtype=np.float32) + 1e-6).all()
    u = gen.uns["wbdit"]
    assert u["arch"] == "wbdit" and u["sampler"] == "dpm++2m" and u["steps"] == 5 and u["seed"] == 0
    assert u["cfg_scale"] == 1.5 and u["cfg_interval"] == [0.2, 0.8]  # the defaults: guidance on an interval of t
    assert u["model_config"] == dict(n_genes=25, num_classes=3, **TINY) and u["epoch"] == 3
    assert u["X"] == "log1p(normalize_total(counts, 1e4))" and u["prediction"] == "epsilon"


def test_sample_is_deterministic_given_the_seed(run):
    kw = dict(n_cells=6, steps=4, device="cpu", progress=False)
    a, b, c = sample(run, seed=1, **kw), sample(run, seed=1, **kw), sample(run, seed=2, **kw)
    assert (a.X != b.X).nnz == 0 and list(a.obs["cell_type"]) == list(b.obs["cell_type"])
    assert (a.X != c.X).nnz > 0


def test_sample_ddpm_records_all_steps(run):
    gen = sample(run, n_cells=3, sampler="ddpm", seed=0, device="cpu", progress=False)
    assert gen.uns["wbdit"]["steps"] == 100 and gen.uns["wbdit"]["sampler"] == "ddpm"
    assert np.isfinite(gen.X.toarray()).all()


def test_per_cell_type_counts_are_honoured(run):
    want = {"type_2": 5, "type_0": 2, "type_1": 3}
    gen = sample(run, n_cells=10, cell_types=want, steps=3, device="cpu", progress=False)
    assert gen.obs["cell_type"].value_counts().to_dict() == want
    gen = sample(run, n_cells=20, cell_types={"type_1": 7}, steps=3, device="cpu", progress=False)
    assert (gen.obs["cell_type"] == "type_1").sum() >= 7 and gen.n_obs == 20
    big = sample(run, n_cells=9, cell_types={"type_0": 9}, steps=3, batch_size=4, device="cpu", progress=False)
    assert (big.obs["cell_type"] == "type_0").all() and big.n_obs == 9  # across several batches


def test_unrequested_cells_follow_training_proportions():
    pre = Preprocessor(
        var_names=["a"],
        input_kind="counts",
        label_keys=["t"],
        label_categories=[["x", "y"]],
        label_combinations=[[0], [1]],
        combination_counts=[900, 100],
    )
    labels = plan_labels(pre, 2000, seed=0)
    assert labels.shape == (2000,) and abs((labels == 0).mean() - 0.9) < 0.03


def test_sample_errors(run):
    kw = dict(steps=2, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"unknown cell type 'T cell'; the model knows \['type_0'"):
        sample(run, n_cells=4, cell_types={"T cell": 2}, **kw)
    for n in (0, -3):
        with pytest.raises(ValueError, match=f"n_cells must be > 0, got {n}"):
            sample(run, n_cells=n, **kw)
    with pytest.raises(ValueError, match="ask for 6 cells but n_cells is 4"):
        sample(run, n_cells=4, cell_types={"type_0": 6}, **kw)
    with pytest.raises(ValueError, match="negative count"):
        sample(run, n_cells=4, cell_types={"type_0": -1}, **kw)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        sample("/nonexistent/run", n_cells=4, **kw)


def test_unconditional_model_refuses_cell_types(tmp_path):
    r = quick_train(tiny_data(n_cells=16), tmp_path / "u", epochs=1)
    assert r.preprocessor.categories == [] and r.model.num_classes is None
    with pytest.raises(ValueError, match="unconditional"):
        sample(r, n_cells=4, cell_types={"type_0": 2}, steps=2, device="cpu", progress=False)
    with pytest.raises(ValueError, match="needs class labels"):
        sample(r, n_cells=4, cfg_scale=2.0, steps=2, device="cpu", progress=False)
    gen = sample(r, n_cells=4, steps=2, counts=True, device="cpu", progress=False)
    assert "cell_type" not in gen.obs and gen.shape == (4, 25)
    X = gen.X.toarray()
    assert (X >= 0).all() and np.array_equal(X, np.round(X)) and set(r.preprocessor.log_library) == {"__all__"}


def test_counts_are_nonnegative_integers_with_realistic_libraries(run):
    gen = sample(run, n_cells=60, counts=True, steps=5, seed=3, device="cpu", progress=False)
    X = gen.X.toarray()
    assert (X >= 0).all() and np.array_equal(X, np.round(X)) and X.sum() > 0
    assert gen.uns["wbdit"]["X"] == "counts"
    logx = gen.layers["log_normalized"].toarray()
    assert np.isfinite(logx).all() and (logx >= 0).all()
    assert ((X > 0) <= (logx > 0)).all()  # a count only where the profile is expressed
    real_lib = np.asarray(tiny_data().X.sum(1)).ravel()
    lib = X.sum(1)
    assert lib.min() > 0.1 * real_lib.min() and lib.max() < 10 * real_lib.max(), (lib.min(), lib.max(), real_lib)
    assert 0.25 < np.median(lib) / np.median(real_lib) < 4


def test_counts_library_follows_the_fitted_distribution():
    """Counts drawn from a real profile: library sizes match the per-type log-normal fit."""
    from wbdit.sampling import _draw_counts

    a = datasets.synthetic(n_cells=400, n_genes=60, n_types=2, markers_per_type=5, seed=1)
    pre, logx, labels = Preprocessor.fit(a, "cell_type")
    counts = _draw_counts(logx.toarray(), labels, pre, seed=0)
    for k, name in enumerate(pre.categories):
        ll = np.log(counts[labels == k].sum(1))
        mu, sd = pre.log_library[name]
        assert abs(ll.mean() - mu) < 0.1 and abs(ll.std() - sd) < 0.1


def test_counts_need_a_model_trained_on_counts(tmp_path):
    a = tiny_data(n_cells=16)
    a.X = sp.csr_matrix(np.log1p(a.X.toarray() / a.X.toarray().sum(1, keepdims=True) * 1e4).astype(np.float32))
    r = quick_train(a, tmp_path / "ln", label_key="cell_type", epochs=1)
    assert r.preprocessor.input_kind == "log-normalized"
    with pytest.raises(ValueError, match="counts=True needs a model trained on raw counts"):
        sample(r, n_cells=4, counts=True, steps=2, device="cpu", progress=False)


def test_h5ad_round_trip_keeps_var_names_labels_and_uns(run, tmp_path):
    gen = sample(run, n_cells=8, cell_types={"type_1": 3}, counts=True, steps=3, device="cpu", progress=False)
    write_h5ad(gen, tmp_path / "gen.h5ad")
    back = read_h5ad(tmp_path / "gen.h5ad")
    assert list(back.var_names) == list(gen.var_names) == run.preprocessor.var_names
    assert list(back.obs["cell_type"].astype(str)) == list(gen.obs["cell_type"].astype(str))
    assert (back.X != gen.X).nnz == 0 and "log_normalized" in back.layers
    assert back.uns["wbdit"]["arch"] == "wbdit" and int(back.uns["wbdit"]["steps"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.h5ad"]


def test_sample_label_key_column_is_kept(tmp_path):
    a = tiny_data(n_cells=16)
    a.obs["celltype"] = a.obs["cell_type"]
    r = quick_train(a, tmp_path / "r", label_key="celltype", epochs=1)
    gen = sample(r, n_cells=4, steps=2, device="cpu", progress=False)
    assert list(gen.obs["celltype"]) == list(gen.obs["cell_type"])


def test_train_config_overrides():
    assert TrainConfig().lr == 1e-3 and TrainConfig().epochs is None  # measured defaults (QUALITY.md)
    with pytest.raises(TypeError):
        train(tiny_data(n_cells=8), tiny(), out_dir="unused", learning_rate=1.0)


def test_learning_rate_warmup_then_schedule():
    const = TrainConfig(warmup_steps=10)
    assert [learning_rate(const, s, 100) for s in (0, 9, 50, 99)] == pytest.approx([1e-4, 1e-3, 1e-3, 1e-3])
    cos = TrainConfig(warmup_steps=10, lr_schedule="cosine")
    lrs = [learning_rate(cos, s, 100) for s in range(100)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[55] == pytest.approx(5e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-6
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")


def test_gene_order_is_saved_and_sampling_returns_the_files_order(tmp_path, run):
    a = tiny_data()
    assert sorted(run.preprocessor.order) == list(range(a.n_vars))  # "cluster" by default, saved with the run
    assert run.preprocessor.order != list(range(a.n_vars))
    plain = quick_train(a, tmp_path / "input", label_key="cell_type", gene_order="input")
    assert plain.preprocessor.order == []
    gen = sample(run, n_cells=20, seed=0, progress=False)
    assert list(gen.var_names) == list(a.var_names)
    with pytest.raises(ValueError, match="unknown gene_order 'sorted'"):
        quick_train(a, tmp_path / "bad", gene_order="sorted")


def test_counts_on_lattice_gives_back_real_counts():
    from wbdit.sampling import counts_on_lattice

    a = datasets.synthetic(n_cells=50, n_genes=40, n_types=2, markers_per_type=5, seed=2)
    counts = a.X.toarray()
    logx = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    np.testing.assert_array_equal(counts_on_lattice(logx, counts.sum(1)), counts)
    tiny_library = counts_on_lattice(logx, np.full(50, 1.0))  # expressed genes keep a count
    np.testing.assert_array_equal(tiny_library > 0, counts > 0)


def test_too_many_genes_to_cluster_warns_and_keeps_the_order(tmp_path, monkeypatch):
    monkeypatch.setattr("wbdit.preprocessing.CLUSTER_MAX_GENES", 10)
    with pytest.warns(UserWarning, match="25 genes: too many to cluster"):
        r = quick_train(tiny_data(), tmp_path / "r", label_key="cell_type", epochs=1)
    assert r.preprocessor.order == []
