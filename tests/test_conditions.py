"""Conditioning on several obs columns: two attributes end to end from the CLI, guidance per
column, ``--condition`` and ``--like`` (the synthetic twin), bad input, and old one-label runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from wbdit import datasets
from wbdit.checkpoint import load_checkpoint, save_checkpoint
from wbdit.cli import main
from wbdit.data import read_h5ad, write_h5ad
from wbdit.diffusion import GaussianDiffusion, guidance_terms
from wbdit.model import WhiteBoxDiT
from wbdit.preprocessing import Preprocessor, label_candidates
from wbdit.run import Run
from wbdit.sampling import plan_labels, sample
from wbdit.trainer import train

M = 5  # marker genes per type and per batch
# Reference ops: these tests are about conditioning, and without a GPU the fused kernels run in
# the Triton interpreter (conftest), far too slowly for training.
TINY = ["--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--patch-size", "4", "--reference"]
GROUPS = {
    "type_0": slice(0, M),
    "type_1": slice(M, 2 * M),
    "batch_0": slice(2 * M, 3 * M),
    "batch_1": slice(3 * M, 4 * M),
}  # datasets.synthetic's marker genes, types first
COMBOS = [(t, b) for t in ("type_0", "type_1") for b in ("batch_0", "batch_1")]


def two_attributes(n_cells=256, seed=3):
    """Type (type_0/type_1) and batch (batch_0/batch_1), drawn independently, each with its own markers."""
    return datasets.synthetic(n_cells=n_cells, n_genes=40, n_types=2, markers_per_type=M, n_batches=2, seed=seed)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    write_h5ad(two_attributes(), path)
    return path


@pytest.fixture(scope="module")
def run_dir(data_file, tmp_path_factory):
    """Trained from the CLI on both columns."""
    out = tmp_path_factory.mktemp("runs") / "two"
    assert (
        main(
            [
                "train",
                str(data_file),
                "--label-key",
                "cell_type",
                "--label-key",
                "batch",
                "--out",
                str(out),
                "--epochs",
                "50",
                "--batch-size",
                "32",
                "--lr",
                "2e-3",
                "--device",
                "cpu",
                *TINY,
            ]
        )
        == 0
    )
    return out


def cli_sample(run_dir, out, *args) -> int:
    return main(["sample", str(run_dir), "-o", str(out), "--steps", "20", "--device", "cpu", "--reference", *args])


# ---------------------------------------------------------------- end to end


def test_every_combination_expresses_its_two_markers_and_neither_other(run_dir, tmp_path, capsys):
    out = tmp_path / "gen.h5ad"
    conditions = [arg for t, b in COMBOS for arg in ("--condition", f"cell_type={t},batch={b}:25")]
    assert cli_sample(run_dir, out, *conditions, "--cfg-scale", "1.5") == 0, capsys.readouterr().err
    gen = read_h5ad(out)
    assert gen.n_obs == 100  # --n-cells defaults to the requested total
    X = gen.X.toarray()
    for t, b in COMBOS:
        cells = X[(gen.obs["cell_type"] == t).to_numpy() & (gen.obs["batch"] == b).to_numpy()]
        assert len(cells) == 25
        other_t, other_b = ("type_1" if t == "type_0" else "type_0"), ("batch_1" if b == "batch_0" else "batch_0")
        for own, other in ((t, other_t), (b, other_b)):
            mine, theirs = cells[:, GROUPS[own]], cells[:, GROUPS[other]]
            assert mine.mean() > 4 * theirs.mean() + 0.5, (t, b, own, mine.mean(), theirs.mean())
            assert (mine.sum(1) > theirs.sum(1)).mean() >= 0.95, (t, b, own)  # each cell, not only the mean
    assert dict(gen.uns["wbdit"]["cfg_scale"]) == {"cell_type": 1.5, "batch": 1.5}


def test_like_makes_a_twin_with_the_templates_composition_and_obs(run_dir, data_file, tmp_path, capsys):
    template = read_h5ad(data_file)[40:100].copy()
    template.obs["donor_age"] = np.arange(template.n_obs)  # any other obs column is copied too
    write_h5ad(template, tmp_path / "template.h5ad")
    out = tmp_path / "twin.h5ad"
    assert cli_sample(run_dir, out, "--like", str(tmp_path / "template.h5ad")) == 0, capsys.readouterr().err
    twin = read_h5ad(out)
    assert list(twin.obs_names) == [f"{name}-twin" for name in template.obs_names]
    pd.testing.assert_frame_equal(twin.obs.reset_index(drop=True), template.obs.reset_index(drop=True))
    counts = lambda a: a.obs.groupby(["cell_type", "batch"], observed=True).size().to_dict()  # noqa: E731
    assert counts(twin) == counts(template)
    assert list(twin.var_names) == list(template.var_names)


def test_unnamed_columns_follow_the_named_ones_training_frequencies():
    pre = Preprocessor(
        var_names=["g"],
        input_kind="counts",
        label_keys=["cell_type", "donor"],
        label_categories=[["B", "T"], ["d1", "d2", "d3"]],
        label_combinations=[[0, 0], [0, 1], [1, 1], [1, 2]],
        combination_counts=[300, 100, 500, 500],
    )
    labels = plan_labels(pre, 4000, [({"cell_type": "B"}, 4000)], seed=0)
    assert labels.shape == (4000, 2) and (labels[:, 0] == 0).all()
    assert abs((labels[:, 1] == 0).mean() - 0.75) < 0.03 and not (labels[:, 1] == 2).any()  # d3 never has B cells
    rest = plan_labels(pre, 2800, [({"cell_type": "T", "donor": "d2"}, 300)], seed=1)
    assert (rest[:300] == [1, 1]).all()
    assert abs((rest[300:] == [0, 0]).all(1).mean() - 300 / 1400) < 0.04  # the others: joint training frequencies
    with pytest.raises(ValueError, match=r"cell_type='B', donor='d3' never occurs in the training data"):
        plan_labels(pre, 5, [({"cell_type": "B", "donor": "d3"}, 5)])
    unseen = plan_labels(pre, 5, [({"cell_type": "B", "donor": "d3"}, 5)], allow_unseen=True)
    assert (unseen == [0, 2]).all()


# ---------------------------------------------------------------- guidance


def test_guidance_terms_state_the_formulas():
    assert guidance_terms([1.0]) == [((True,), 1.0)]  # no guidance: the conditional output alone
    assert guidance_terms([2.0]) == guidance_terms([2.0], "compositional") == [((True,), 2.0), ((False,), -1.0)]
    assert guidance_terms([1.5, 1.5]) == [((True, True), 1.5), ((False, False), -0.5)]  # joint: u + w (c - u)
    # u + 1.5 (c_type - u) + 1.0 (c_type,batch - c_type)
    assert guidance_terms([1.5, 1.0]) == [((True, True), 1.0), ((True, False), 0.5), ((False, False), -0.5)]
    # CFGen: u + sum_k w_k (c_k - u)
    assert guidance_terms([1.5, 1.0], "compositional") == [
        ((True, False), 1.5),
        ((False, True), 1.0),
        ((False, False), -1.5),
    ]
    with pytest.raises(ValueError, match="unknown guidance 'mixed'"):
        guidance_terms([1.0], "mixed")


@pytest.mark.parametrize("guidance", ["joint", "compositional"])
def test_one_guided_step_is_the_formula_on_the_models_outputs(guidance):
    torch.manual_seed(0)
    model = WhiteBoxDiT(n_genes=12, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=[2, 3]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    d, y, w = GaussianDiffusion(100), torch.tensor([[0, 2], [1, 0], [1, 1]]), (2.0, 0.5)
    out = d.sample(
        model, 3, 12, y=y, steps=1, cfg_scale=w, guidance=guidance, generator=torch.Generator().manual_seed(0)
    )
    x_T, t = torch.randn(3, 12, generator=torch.Generator().manual_seed(0)), torch.full((3,), 99)
    c = lambda keep: model(x_T, t, model.drop_labels(y, ~torch.tensor(keep)))  # noqa: E731
    u = c([False, False])
    if guidance == "joint":
        guided = u + w[0] * (c([True, False]) - u) + w[1] * (c([True, True]) - c([True, False]))
    else:
        guided = u + w[0] * (c([True, False]) - u) + w[1] * (c([False, True]) - u)
    torch.testing.assert_close(out, d.eps_and_x0(guided, x_T, t)[1], rtol=1e-5, atol=1e-5)


def test_per_column_scales_from_the_cli(run_dir, tmp_path, capsys):
    out = tmp_path / "g.h5ad"
    assert (
        cli_sample(
            run_dir,
            out,
            "--n-cells",
            "4",
            "--steps",
            "2",
            "--cfg-scale",
            "1.5",
            "--cfg-scale",
            "batch=1.0",
            "--guidance",
            "compositional",
        )
        == 0
    ), capsys.readouterr().err
    u = read_h5ad(out).uns["wbdit"]
    assert dict(u["cfg_scale"]) == {"cell_type": 1.5, "batch": 1.0} and u["guidance"] == "compositional"
    assert cli_sample(run_dir, out, "--n-cells", "4", "--cfg-scale", "donor=2") != 0
    assert "cfg_scale names 'donor', not a label column" in capsys.readouterr().err


# ---------------------------------------------------------------- training


def test_each_column_is_dropped_on_its_own_during_training(tmp_path):
    seen = []
    model = WhiteBoxDiT(n_genes=40, patch_size=4, hidden_size=16, depth=1, num_heads=2, num_classes=[2, 2])
    model.register_forward_pre_hook(lambda module, args: seen.append(args[2].clone()))  # (x_t, t, y)
    a = two_attributes(n_cells=128)
    run = train(
        a,
        model,
        label_key=["cell_type", "batch"],
        out_dir=tmp_path / "r",
        epochs=3,
        batch_size=64,
        label_dropout=0.5,
        device="cpu",
        progress=False,
        fused=False,
    )
    null = torch.cat(seen) == 2  # both columns have 2 classes: null class 2
    assert null.shape == (6 * 64, 2)
    assert abs(null[:, 0].float().mean() - 0.5) < 0.1 and abs(null[:, 1].float().mean() - 0.5) < 0.1
    assert abs(null.all(1).float().mean() - 0.25) < 0.08  # independently
    pre = run.preprocessor
    assert pre.label_keys == ["cell_type", "batch"] and pre.label_categories == [
        ["type_0", "type_1"],
        ["batch_0", "batch_1"],
    ]
    assert sum(pre.combination_counts) == 128 and len(pre.label_combinations) == 4
    saved = load_checkpoint(tmp_path / "r")
    assert saved["model_config"]["num_classes"] == [2, 2] and saved["preprocessor"]["label_keys"] == pre.label_keys


def test_model_config_one_table_per_column():
    one = WhiteBoxDiT(n_genes=8, patch_size=4, hidden_size=16, depth=1, num_heads=2, num_classes=3)
    two = WhiteBoxDiT(n_genes=8, patch_size=4, hidden_size=16, depth=1, num_heads=2, num_classes=[3, 2])
    assert [k for k in one.state_dict() if k.startswith("y_")] == ["y_embedder.weight"]  # as every earlier run
    assert [tuple(two.state_dict()[f"y_embedder.{k}.weight"].shape) for k in (0, 1)] == [(4, 16), (3, 16)]
    y = torch.tensor([[0, 1], [2, 0]])
    torch.testing.assert_close(two.embed_labels(y), two.y_embedder[0](y[:, 0]) + two.y_embedder[1](y[:, 1]))
    assert torch.equal(two.drop_labels(y, torch.tensor([[True, False], [False, True]])), torch.tensor([[3, 1], [2, 2]]))
    with pytest.raises(ValueError, match=r"labels for 2 label columns \(num_classes=\[3, 2\]\)"):
        two(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_classes must list >= 1 classes"):
        WhiteBoxDiT(n_genes=8, patch_size=4, hidden_size=16, depth=1, num_heads=2, num_classes=[3, 0])


def test_training_without_label_key_suggests_label_columns(data_file, tmp_path, capsys):
    obs = pd.DataFrame(
        {"cell_type": ["a", "b"] * 50, "n_counts": np.arange(100.0), "barcode": [str(i) for i in range(100)]}
    )
    assert label_candidates(obs) == {"cell_type": 2}  # numbers and per-cell ids are not labels
    assert main(["train", str(data_file), "--out", str(tmp_path / "u"), "--epochs", "1", "--device", "cpu", *TINY]) == 0
    err = capsys.readouterr().err
    assert "obs columns that look like cell types: 'cell_type' (2 values), 'batch' (2 values)" in err
    assert "--label-key cell_type" in err


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--condition", "cell_type=type_0,batch=batch_7:3"],
            "unknown value of label column 'batch' 'batch_7'; the model knows ['batch_0', 'batch_1']",
        ),
        (
            ["--condition", "donor=d1:3"],
            "the run was not trained on label column 'donor'; its label columns: ['cell_type', 'batch']",
        ),
        (["--cell-type", "type_0=2", "--like", "TEMPLATE"], "like= makes one cell per template cell"),
    ],
)
def test_bad_requests_are_named_and_write_nothing(run_dir, data_file, tmp_path, capsys, args, message):
    out = tmp_path / "out" / "gen.h5ad"
    out.parent.mkdir()
    assert cli_sample(run_dir, out, *[str(data_file) if a == "TEMPLATE" else a for a in args]) != 0
    assert message in capsys.readouterr().err
    assert list(out.parent.iterdir()) == []


def test_bad_condition_syntax(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_sample(run_dir, tmp_path / "g.h5ad", "--condition", "cell_type=type_0")
    assert "expected COLUMN=VALUE[,COLUMN=VALUE...]:COUNT" in capsys.readouterr().err


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda t: t.obs.drop(columns="batch"),
            "the template's obs has no column 'batch'; the run is conditioned on ['cell_type', 'batch']",
        ),
        (
            lambda t: t.obs.assign(batch=t.obs["batch"].cat.add_categories("?").where(np.arange(t.n_obs) % 4 > 0)),
            "the template's obs['batch'] has 5 missing (NaN) labels",
        ),
        (
            lambda t: t.obs.assign(cell_type=["type_9"] + ["type_0"] * (t.n_obs - 1)),
            "the template's obs['cell_type'] has values the run was not trained on: ['type_9']",
        ),
    ],
)
def test_bad_templates_are_named_and_write_nothing(run_dir, data_file, tmp_path, capsys, damage, message):
    template = read_h5ad(data_file)[:20].copy()
    template.obs = damage(template)
    write_h5ad(template, tmp_path / "template.h5ad")
    out = tmp_path / "twin.h5ad"
    assert cli_sample(run_dir, out, "--like", str(tmp_path / "template.h5ad")) != 0
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unseen_combinations_are_refused_unless_allowed(tmp_path, capsys):
    a = two_attributes(n_cells=96)
    seen = ~((a.obs["cell_type"] == "type_1") & (a.obs["batch"] == "batch_1")).to_numpy()
    write_h5ad(a[seen].copy(), tmp_path / "train.h5ad")
    write_h5ad(a, tmp_path / "template.h5ad")
    run_dir = tmp_path / "r"
    assert (
        main(
            [
                "train",
                str(tmp_path / "train.h5ad"),
                "--label-key",
                "cell_type",
                "--label-key",
                "batch",
                "--out",
                str(run_dir),
                "--epochs",
                "1",
                "--device",
                "cpu",
                *TINY,
            ]
        )
        == 0
    )
    out = tmp_path / "g.h5ad"
    assert cli_sample(run_dir, out, "--steps", "2", "--condition", "cell_type=type_1,batch=batch_1:3") != 0
    assert "the combination cell_type='type_1', batch='batch_1' never occurs in the training data" in (
        capsys.readouterr().err
    )
    assert cli_sample(run_dir, out, "--steps", "2", "--like", str(tmp_path / "template.h5ad")) != 0
    assert f"{int((~seen).sum())} template cells hold label combinations never seen" in capsys.readouterr().err
    assert not out.exists()
    assert (
        cli_sample(run_dir, out, "--steps", "2", "--condition", "cell_type=type_1,batch=batch_1:3", "--allow-unseen")
        == 0
    )
    gen = read_h5ad(out)
    assert ((gen.obs["cell_type"] == "type_1") & (gen.obs["batch"] == "batch_1")).all()


# ---------------------------------------------------------------- one label, as before


def test_a_one_label_run_of_the_earlier_layout_still_loads_and_samples(tmp_path):
    a = two_attributes(n_cells=48)
    run = train(
        a,
        lambda n, c: WhiteBoxDiT(n_genes=n, num_classes=c, patch_size=4, hidden_size=16, depth=1, num_heads=2),
        label_key="cell_type",
        out_dir=tmp_path / "r",
        epochs=1,
        batch_size=16,
        device="cpu",
        progress=False,
        fused=False,
    )
    assert run.model.num_classes == 2 and run.preprocessor.num_classes == 2
    ckpt = load_checkpoint(tmp_path / "r")
    pre = ckpt["preprocessor"]
    old = {
        k: v
        for k, v in pre.items()
        if k not in ("label_keys", "label_categories", "label_combinations", "combination_counts")
    }
    old.update(label_key="cell_type", categories=["type_0", "type_1"], class_counts=run.preprocessor.class_counts)
    save_checkpoint(tmp_path / "r", {**ckpt, "preprocessor": old})  # what format-1 runs before several labels hold
    loaded = Run.load(tmp_path / "r")
    assert loaded.preprocessor == run.preprocessor and loaded.preprocessor.label_key == "cell_type"
    gen = sample(loaded, cell_types={"type_1": 3}, steps=2, cfg_scale=1.5, device="cpu", progress=False, fused=False)
    assert list(gen.obs["cell_type"]) == ["type_1"] * 3 and float(gen.uns["wbdit"]["cfg_scale"]) == 1.5
