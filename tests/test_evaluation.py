"""The evaluator: metric values by hand, same vs shifted distributions, cell-type splits, the unbiased
default space, gene selection, biology (markers, correlations, utility), baselines, inputs, errors, files."""

import json
import math
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from wbdit import baselines, datasets, metrics, plots
from wbdit.data import split_cells
from wbdit.evaluation import (
    HEADLINE,
    MAX_GENES,
    baseline_headlines,
    cli_evaluate,
    evaluate,
    plot_training_curves,
    write_report,
)

N_GENES = 60


def nb_cells(n_per_type: dict, seed: int, shift: float = 1.0, prefix: str = "c") -> ad.AnnData:
    """Negative-binomial counts; type B over-expresses genes 0-9, every type has its own mean profile.

    ``shift`` multiplies the means of genes 20-39: 1.0 draws from the reference distribution.
    Base means and type profiles are fixed (seed 0) so two calls differ only in sampling noise.
    """
    fixed = np.random.default_rng(0)
    base = fixed.lognormal(0.0, 1.0, N_GENES)
    profiles = {
        t: base * np.where(np.arange(N_GENES) < 10, 8.0 if t == "B" else 1.0, 1.0) * fixed.lognormal(0.0, 0.3, N_GENES)
        for t in ("A", "B", "C")
    }
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for t, n in n_per_type.items():
        mu = profiles[t] * np.where((np.arange(N_GENES) >= 20) & (np.arange(N_GENES) < 40), shift, 1.0)
        mu = mu[None] * rng.lognormal(0.0, 0.2, (n, 1))
        rows.append(rng.poisson(rng.gamma(shape=5.0, scale=mu / 5.0)))  # NB with dispersion 0.2
        labels += [t] * n
    counts = np.vstack(rows).astype(np.float32)
    counts[counts.sum(axis=1) == 0, 0] = 1  # no empty cells
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=[f"{prefix}{i}" for i in range(len(labels))])
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)]))


def log_normalized(adata: ad.AnnData) -> ad.AnnData:
    out = adata.copy()
    out.X = out.X.astype(np.float32)
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


@pytest.fixture(scope="module")
def real():
    return nb_cells({"A": 250, "B": 250}, seed=1)


@pytest.fixture(scope="module")
def same_report(real):
    return evaluate(real, nb_cells({"A": 250, "B": 250}, seed=2, prefix="g"), label_key="cell_type")


@pytest.fixture(scope="module")
def shifted_report(real):
    return evaluate(
        real, nb_cells({"A": 250, "B": 250}, seed=2, shift=10.0, prefix="g"), label_key="cell_type", baselines=False
    )


def test_mmd_matches_hand_computation():
    x, y = np.array([[0.0], [1.0]]), np.array([[3.0], [5.0]])
    k = lambda d: sum(math.exp(-d * d / (2 * s * s)) for s in (0.01, 0.1, 1.0, 10.0, 100.0))  # noqa: E731
    # unbiased: off-diagonal x-x and y-y pairs, all x-y pairs
    expected = k(1) + k(2) - 2 * (k(3) + k(5) + k(2) + k(4)) / 4
    assert metrics.mmd(x, y) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.mmd(x[:1], y)


def test_wasserstein_matches_hand_computation():
    x, y = np.array([[0.0], [1.0]]), np.array([[2.0], [4.0]])
    assert metrics.wasserstein(x, y, 1) == pytest.approx(2.5)  # 0->2, 1->4
    assert metrics.wasserstein(x, y, 2) == pytest.approx(math.sqrt((4 + 9) / 2))
    a, b = np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]])
    assert metrics.wasserstein(a, b, 1) == pytest.approx(5.0)
    assert metrics.wasserstein(a, b, 2) == pytest.approx(5.0)
    # unequal sizes: the single point sends half its mass to each of 1 and 3
    assert metrics.wasserstein(np.array([[0.0]]), np.array([[1.0], [3.0]]), 1) == pytest.approx(2.0)
    assert metrics.wasserstein(np.array([[0.0]]), np.array([[1.0], [3.0]]), 2) == pytest.approx(math.sqrt(5.0))
    assert metrics.wasserstein(x, x, 2) == 0.0


def test_metrics_tell_same_from_shifted_gaussians():
    rng = np.random.default_rng(0)
    x, same, shifted = rng.normal(size=(400, 2)), rng.normal(size=(400, 2)), rng.normal(size=(400, 2)) + [3.0, 0.0]
    assert abs(metrics.mmd(x, same)) < 0.01 and metrics.mmd(x, shifted) > 0.3
    for p in (1, 2):
        assert metrics.wasserstein(x, same, p) < 0.4
        assert metrics.wasserstein(x, shifted, p) == pytest.approx(3.0, abs=0.3)  # the shift
    for kind in ("knn", "rf"):
        assert 0.42 < metrics.classifier_auc(x, same, kind, seed=0) < 0.58
        assert metrics.classifier_auc(x, shifted, kind, seed=0) > 0.95


def test_gene_metrics_by_hand():
    x = np.array([[0.0, 1.0, 2.0], [0.0, 3.0, 2.0], [1.0, 2.0, 2.0]])
    y = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    m = metrics.gene_metrics(x, y)
    # zero fractions per gene: x (2/3, 0, 0), y (1, 1, 0)
    assert m["zero_frac_mad"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert m["spearman_mean"] == pytest.approx(0.5)  # ranks of means (1/3, 2, 2) vs (0, 0, 2): 0.5 by ties
    assert m["cv_spearman"] is None  # only the third gene is expressed on both sides


def test_same_distribution_reads_as_the_floor(same_report):
    gen, floor = same_report.headline(), same_report.floor_headline()
    gaussian, resample = same_report.baseline_headline("gaussian"), same_report.baseline_headline("resample")
    assert abs(gen["mmd"]) < 0.02 and abs(floor["mmd"]) < 0.02
    assert 0.4 < gen["knn_auc"] < 0.6
    assert 0.4 < same_report.generated["overall"]["rf_auc"] < 0.6
    # W1/W2 are computed at the floor's sample size, so a perfect generator matches the floor
    for k in ("w1", "w2"):
        assert same_report.generated["overall"][k] == pytest.approx(same_report.floor["overall"][k], rel=0.1)
    assert gen["spearman_mean"] > 0.95 and gen["zero_frac_mad"] < 0.05
    assert gen["label_accuracy"] > 0.85 and gen["label_accuracy"] > floor["label_accuracy"] - 0.03
    # the per-gene Gaussian is told apart from real cells and has no zero inflation; resampling
    # each gene from its own real values keeps the zeros (it loses only gene-gene correlations)
    assert gaussian["knn_auc"] > 0.6 and gaussian["zero_frac_mad"] > 0.1
    assert resample["zero_frac_mad"] < 0.05 and resample["knn_auc"] < gaussian["knn_auc"]


def test_shifted_distribution_is_far(same_report, shifted_report):
    same, shifted = same_report.generated["overall"], shifted_report.generated["overall"]
    assert shifted["mmd"] > 0.1 and shifted["mmd"] > 20 * abs(same["mmd"])
    # In 30 PCs the empirical W of two samples of one distribution is far from 0 (the floor
    # column says how far, here ~13) and a shift adds to it in quadrature: read W against the floor.
    floor = same_report.floor["overall"]
    assert shifted["w1"] > 1.1 * floor["w1"] and shifted["w2"] > 1.1 * floor["w2"]
    assert shifted["knn_auc"] > 0.95 and shifted["rf_auc"] > 0.95
    assert shifted_report.floor is None and shifted_report.baselines == {}
    with pytest.raises(ValueError, match="baselines=False"):
        shifted_report.floor_headline()


def test_generated_metrics_do_not_depend_on_baselines():
    real = nb_cells({"A": 60, "B": 60}, seed=3)
    gen = nb_cells({"A": 60, "B": 40}, seed=3, shift=2.0, prefix="g")
    with_baselines = evaluate(real, gen, label_key="cell_type")
    without = evaluate(real, gen, label_key="cell_type", baselines=False)
    assert with_baselines.generated == without.generated
    assert set(without.headline()) == set(HEADLINE)


def test_per_cell_type_counts():
    real = nb_cells({"A": 50, "B": 90}, seed=4)
    gen = nb_cells({"A": 40, "B": 20, "C": 12}, seed=5, prefix="g")
    report = evaluate(real, gen, label_key="cell_type")
    per_type = report.generated["per_type"]
    assert {t: (m["n_real"], m["n_generated"]) for t, m in per_type.items()} == {
        "A": (50, 40),
        "B": (90, 20),
        "C": (0, 12),
    }
    assert report.generated["overall"]["n_real"] == 140 and report.generated["overall"]["n_generated"] == 72
    assert per_type["C"]["mmd"] is None and per_type["C"]["label_accuracy"] == 0.0  # a type real cells lack
    assert per_type["A"]["mmd"] is not None
    # floor: each type split in halves; trivial: as many cells of each type as generated
    floor = report.floor["per_type"]
    assert {t: (floor[t]["n_real"], floor[t]["n_generated"]) for t in floor} == {"A": (25, 25), "B": (45, 45)}
    for name in ("gaussian", "resample"):  # as many cells of each type as generated
        assert {t: m["n_generated"] for t, m in report.baselines[name]["per_type"].items()} == {
            "A": 40,
            "B": 20,
            "C": 12,
        }
    # label accuracy overall is the cell-weighted mean of the per-type accuracies
    acc = sum(per_type[t]["label_accuracy"] * per_type[t]["n_generated"] for t in per_type) / 72
    assert report.generated["overall"]["label_accuracy"] == pytest.approx(acc)
    assert "C" in report.table() and "label_accuracy" in report.table()


def test_counts_and_log_input_give_the_same_metrics():
    real = nb_cells({"A": 80, "B": 80}, seed=6)
    gen = nb_cells({"A": 60, "B": 60}, seed=6, shift=1.5, prefix="g")
    from_counts = evaluate(real, gen, label_key="cell_type", baselines=False)
    from_log = evaluate(log_normalized(real), log_normalized(gen), label_key="cell_type", baselines=False)
    assert from_counts.settings["input"] == {"real": "counts", "generated": "counts"}
    assert from_log.settings["input"] == {"real": "log-normalized", "generated": "log-normalized"}
    a, b = from_counts.generated["overall"], from_log.generated["overall"]
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


def test_generated_genes_may_be_a_reordered_subset(real):
    gen = nb_cells({"A": 50, "B": 50}, seed=7, prefix="g")
    subset = gen[:, [f"g{j}" for j in range(39, -1, -1)]].copy()  # 40 genes, reversed
    report = evaluate(real, subset, baselines=False)
    assert report.settings["n_genes"] == 40 and report.settings["n_real_genes_unused"] == 20
    assert report.headline()["label_accuracy"] is None  # no label_key: unconditional
    assert "label_accuracy" not in report.table()


def test_mismatched_genes_are_named(real):
    gen = nb_cells({"A": 50, "B": 50}, seed=8, prefix="g")
    gen.var_names = [f"g{j}" for j in range(N_GENES - 2)] + ["MYSTERY1", "MYSTERY2"]
    with pytest.raises(ValueError, match=r"2 of the 60 generated genes.*MYSTERY1"):
        evaluate(real, gen)


def test_missing_label_key_names_key_and_columns(real):
    gen = nb_cells({"A": 50, "B": 50}, seed=9, prefix="g")
    with pytest.raises(KeyError, match=r"'celltype'.*real.*cell_type"):
        evaluate(real, gen, label_key="celltype")
    gen.obs = gen.obs.rename(columns={"cell_type": "type"})
    with pytest.raises(KeyError, match=r"generated\.obs.*\['type'\]"):
        evaluate(real, gen, label_key="cell_type")


def test_bad_input_gives_clear_errors(real):
    gen = nb_cells({"A": 50, "B": 50}, seed=10, prefix="g")
    with pytest.raises(ValueError, match="generated has zero cells"):
        evaluate(real, gen[:0].copy())
    bad = gen.copy()
    bad.X = bad.X.toarray()
    bad.X[3, 4] = np.nan
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        evaluate(real, bad)
    bad.X[3, 4] = -1.0
    with pytest.raises(ValueError, match="negative values"):
        evaluate(real, bad)


def test_reference_fits_the_pca_and_the_floor_splits_real():
    train = nb_cells({"A": 100, "B": 100}, seed=11, prefix="t")
    held_out = nb_cells({"A": 40, "B": 40}, seed=11, prefix="h")
    gen = nb_cells({"A": 30, "B": 30}, seed=12, prefix="g")
    report = evaluate(held_out, gen, label_key="cell_type", reference=train)
    assert report.settings["space"] == "reference" and report.settings["n_reference"] == 200
    assert report._pca.n_samples_ == 200
    # the floor: halves of the held-out real cells, both projected like the generated cells
    assert report.floor["overall"]["n_real"] == 40 and report.floor["overall"]["n_generated"] == 40
    assert "comparison's PCA" in report.settings["floor"]
    assert all("reference" in text for text in report.settings["baselines"].values())
    # without a reference: one PCA per comparison, fit on both of its sides
    joint = evaluate(held_out, gen, label_key="cell_type", baselines=False)
    assert joint.settings["space"] == "joint" and joint._pca.n_samples_ == 80 + 60
    with pytest.raises(ValueError, match="needs reference"):
        evaluate(held_out, gen, space="reference")
    assert (
        report.generated == evaluate(held_out, gen, label_key="cell_type", reference=train, baselines=False).generated
    )
    assert report.settings["w_cells"] == 40  # min(n_real // 2, n_generated)


def test_report_is_json_and_cli_writes_files(real, tmp_path, monkeypatch, capsys):
    real_path, gen_path = tmp_path / "real.h5ad", tmp_path / "gen.h5ad"
    nb_cells({"A": 60, "B": 60}, seed=13).write_h5ad(real_path)
    log_normalized(nb_cells({"A": 60, "B": 60}, seed=14, prefix="g")).write_h5ad(gen_path)
    # Without umap-learn the picture falls back to t-SNE, loudly (and fast enough for CI).
    monkeypatch.setitem(sys.modules, "umap", None)
    with pytest.warns(UserWarning, match="t-SNE"):
        report = cli_evaluate(str(real_path), str(gen_path), str(tmp_path / "report"), label_key="cell_type")
    out = tmp_path / "report"
    assert sorted(p.name for p in out.iterdir()) == [
        "embedding.png",
        "gene_means.png",
        "histograms.png",
        "metrics.json",
        "table.txt",
    ]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["settings"]["input"] == {"real": "counts", "generated": "log-normalized"}
    assert saved["generated"]["overall"]["knn_auc"] == pytest.approx(report.headline()["knn_auc"])
    assert saved["metrics"]["mmd"]["space"] == "PCA" and saved["metrics"]["spearman_mean"]["space"] == "genes"
    json.dumps(report.to_dict(), allow_nan=False)
    assert (out / "table.txt").read_text().strip() == report.table()
    assert "real-vs-real" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="t-SNE"):
        with_ref = cli_evaluate(str(real_path), str(gen_path), str(tmp_path / "ref"), reference_path=str(real_path))
    assert with_ref.settings["space"] == "reference"
    with pytest.raises(FileNotFoundError, match="no such file"):
        cli_evaluate(str(tmp_path / "missing.h5ad"), str(gen_path), str(out))
    (tmp_path / "notes.h5ad").write_text("not hdf5")
    with pytest.raises(ValueError, match="not an .h5ad"):
        cli_evaluate(str(tmp_path / "notes.h5ad"), str(gen_path), str(out))
    # numbers only without the cells; pictures need both sides
    written = write_report(report, str(tmp_path / "numbers"))
    assert [p.rsplit("/", 1)[1] for p in written] == ["metrics.json", "table.txt"]
    with pytest.raises(ValueError, match="both"):
        write_report(report, str(tmp_path / "numbers"), real=ad.read_h5ad(real_path))


def test_training_curves(tmp_path):
    with pytest.raises(FileNotFoundError, match="log.jsonl"):
        plot_training_curves(tmp_path)
    lines = []
    for epoch in range(1, 7):
        record = dict(epoch=epoch, step=10 * epoch, loss=1.0 / epoch, epoch_time_s=2.0, cells_per_s=300.0 + epoch)
        if epoch % 2 == 0:
            record["eval"] = dict(
                knn_auc=1.0 - 0.05 * epoch,
                mmd=0.5 / epoch,
                w2=10.0 - epoch,
                spearman_mean=0.9,
                spearman_var=0.8,
                zero_frac_mad=0.1,
                label_accuracy=None,
            )
        lines.append(json.dumps(record))
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    paths = plot_training_curves(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["training_loss.png", "training_metrics.png"]
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # one column per x axis (epoch, optimizer step, training time) in both figures; loss adds throughput
    assert png_width(paths[0]) == int(4.5 * 4 * plots.DPI) and png_width(paths[1]) == int(4.5 * 3 * plots.DPI)
    (tmp_path / "log.jsonl").write_text(lines[0] + "\n")  # no eval records: the loss curve only
    assert [p.rsplit("/", 1)[1] for p in plot_training_curves(tmp_path)] == ["training_loss.png"]
    old = {k: v for k, v in json.loads(lines[0]).items() if k != "step"}  # a log without steps: epoch and time
    (tmp_path / "log.jsonl").write_text(json.dumps(old) + "\n")
    assert png_width(plot_training_curves(tmp_path)[0]) == int(4.5 * 3 * plots.DPI)


def png_width(path) -> int:
    return int.from_bytes(open(path, "rb").read(24)[16:20], "big")  # IHDR width


def gene_shuffled(adata: ad.AnnData, seed: int) -> ad.AnnData:
    """Each gene permuted across cells on its own: every per-gene marginal kept, every correlation gone."""
    X = adata.X.toarray()
    rng = np.random.default_rng(seed)
    X = np.stack([X[rng.permutation(len(X)), j] for j in range(X.shape[1])], axis=1)
    return ad.AnnData(sp.csr_matrix(X), obs=adata.obs.copy(), var=adata.var.copy())


@pytest.mark.parametrize("which", ["pbmc68k", "sparse_20k_genes"])
def test_default_space_scores_real_halves_as_indistinguishable(which):
    """Issue 15: without a reference, two halves of one real dataset score AUC ~0.5 (0.71-0.74 kNN and
    0.95-1.0 random forest when the PCA was fit on the real side alone), and gene-shuffled cells stay far."""
    if which == "pbmc68k":
        adata = datasets.pbmc68k()
    else:  # sparse counts, 8% non-zero; 5 types with 100 marker genes each
        adata = datasets.synthetic(n_cells=400, n_genes=20000, n_types=5, markers_per_type=100, seed=0)
    first, second = split_cells(adata, "cell_type", 0.5, seed=1)
    half_a, half_b = adata[first].copy(), adata[second].copy()
    same = evaluate(half_a, half_b, baselines=False)  # the generated metrics do not depend on baselines
    assert same.settings["space"] == "joint"
    assert same.generated["overall"]["knn_auc"] <= 0.55 and same.generated["overall"]["rf_auc"] <= 0.55
    shuffled = evaluate(half_a, gene_shuffled(half_b, seed=2), baselines=False).generated["overall"]
    assert shuffled["knn_auc"] > 0.9
    assert shuffled["mmd"] > 5 * abs(same.generated["overall"]["mmd"]) and shuffled["mmd"] > 0.05
    # the correlation structure is what shuffling destroys
    assert shuffled["gene_corr_mad"] > 2 * same.generated["overall"]["gene_corr_mad"]
    if which == "sparse_20k_genes":
        genes = same.settings["genes"]
        assert same.settings["n_genes"] == MAX_GENES == len(genes["names"]) and genes["selected"]
        assert "most highly variable of 20000" in same.table()


def test_highly_variable_genes_above_the_limit_and_all_genes():
    adata = datasets.synthetic(n_cells=120, n_genes=MAX_GENES + 400, n_types=3, markers_per_type=30, seed=4)
    first, second = split_cells(adata, "cell_type", 0.5, seed=0)
    real, gen = adata[first].copy(), adata[second].copy()
    report = evaluate(real, gen, label_key="cell_type", baselines=False)
    names = report.settings["genes"]["names"]
    assert len(names) == MAX_GENES == report._pca.n_features_in_ and len(set(names)) == MAX_GENES
    markers = {f"gene_{j}" for j in range(3 * 30)}  # the simulated markers vary most: all of them kept
    assert markers <= set(names) and set(report.settings["genes"]["correlation_genes"]) <= set(names)
    everything = evaluate(real, gen, label_key="cell_type", baselines=False, all_genes=True)
    assert everything.settings["n_genes"] == MAX_GENES + 400 and everything.settings["genes"]["names"] is None
    # with a reference the genes are ranked on it, whatever the compared cells
    ranked = evaluate(real, gen, label_key="cell_type", baselines=False, reference=gen)
    assert ranked.settings["genes"]["ranked_on"] == "reference cells"


@pytest.fixture(scope="module")
def biology_reports():
    """Training cells, held-out real cells, and 'generated' cells that are real cells of the same
    distribution (a perfect generator) or the same cells with their labels shuffled."""
    per_type = {"A": 100, "B": 100, "C": 100}
    train = nb_cells(per_type, seed=21, prefix="t")
    held_out = nb_cells({"A": 60, "B": 60, "C": 60}, seed=22, prefix="h")
    perfect = nb_cells(per_type, seed=23, prefix="g")
    shuffled = perfect.copy()
    shuffled.obs["cell_type"] = np.random.default_rng(0).permutation(shuffled.obs["cell_type"].to_numpy())
    return (
        evaluate(held_out, perfect, label_key="cell_type", reference=train),
        evaluate(held_out, shuffled, label_key="cell_type", reference=train, baselines=False),
    )


def test_marker_genes_real_near_floor_label_shuffled_far(biology_reports):
    perfect, shuffled = biology_reports
    gen, floor, bad = perfect.generated, perfect.floor, shuffled.generated
    # every column is scored against the same real half at the floor's size: a perfect generator reads as the floor
    assert abs(gen["overall"]["marker_recall"] - floor["overall"]["marker_recall"]) <= 0.1
    assert abs(gen["overall"]["marker_logfc_rho"] - floor["overall"]["marker_logfc_rho"]) <= 0.1
    assert floor["overall"]["marker_recall"] > 0.6 and floor["overall"]["marker_logfc_rho"] > 0.6
    # label-shuffled cells have no markers of their own: about the 20 / 60 genes a random ranking shares
    assert bad["overall"]["marker_recall"] < floor["overall"]["marker_recall"] - 0.3
    assert bad["overall"]["marker_logfc_rho"] < 0.3
    for t in ("A", "B", "C"):
        assert gen["per_type"][t]["marker_recall"] is not None and floor["per_type"][t]["marker_recall"] is not None
    assert bad["per_type"]["B"]["marker_recall"] < gen["per_type"]["B"]["marker_recall"] - 0.3


def test_gene_correlation_structure_real_near_floor_label_shuffled_far():
    # three types with 25 marker genes each (of 100): within a type markers are independent,
    # in a mix of types each type's markers rise and fall together
    adata = datasets.synthetic(n_cells=400, n_genes=100, n_types=3, markers_per_type=25, seed=0)
    first, second = split_cells(adata, "cell_type", 0.5, seed=0)
    real, perfect = adata[first].copy(), adata[second].copy()
    shuffled = perfect.copy()
    shuffled.obs["cell_type"] = np.random.default_rng(0).permutation(shuffled.obs["cell_type"].to_numpy())
    report = evaluate(real, perfect, label_key="cell_type")
    gen, floor = report.generated, report.floor
    bad = evaluate(real, shuffled, label_key="cell_type", baselines=False).generated
    assert gen["overall"]["gene_corr_mad"] == pytest.approx(floor["overall"]["gene_corr_mad"], rel=0.15)
    # the correlations over all cells do not depend on labels; those within a type do
    assert bad["overall"]["gene_corr_mad"] == pytest.approx(gen["overall"]["gene_corr_mad"], rel=0.25)
    for t in ("type_0", "type_1", "type_2"):
        assert gen["per_type"][t]["gene_corr_mad"] == pytest.approx(floor["per_type"][t]["gene_corr_mad"], rel=0.15)
        assert bad["per_type"][t]["gene_corr_mad"] > 2 * floor["per_type"][t]["gene_corr_mad"]


def test_downstream_utility_real_near_floor_label_shuffled_far(biology_reports):
    perfect, shuffled = biology_reports
    gen, floor, bad = perfect.generated["overall"], perfect.floor["overall"], shuffled.generated["overall"]
    # cutting a type to 5 training cells hurts; its real cells (the floor) or a perfect generator's restore it
    assert floor["utility_f1_cut"] < floor["utility_f1"] - 0.3
    assert abs(gen["utility_f1"] - floor["utility_f1"]) <= 0.05
    assert bad["utility_f1"] < floor["utility_f1"] - 0.1 and bad["utility_f1"] < gen["utility_f1"] - 0.1
    assert set(perfect.generated["per_type"]["C"]) >= {"utility_f1", "utility_f1_cut", "utility_f1_real"}
    for name in ("gaussian", "resample"):
        assert perfect.baselines[name]["overall"]["utility_f1"] is not None
    table = perfect.table()
    for key in ("marker_recall", "marker_logfc_rho", "gene_corr_mad", "utility_f1", "resample", "gaussian"):
        assert key in table
    saved = perfect.to_dict()
    assert saved["floor"]["overall"]["utility_f1"] == pytest.approx(floor["utility_f1"])
    assert saved["metrics"]["utility_f1"]["space"] == "PCA" and saved["metrics"]["marker_recall"]["space"] == "genes"
    # without training cells there is no utility, and the table says why
    no_train = evaluate(
        perfect_cells := nb_cells({"A": 60, "B": 60}, seed=24), perfect_cells, baselines=False, label_key="cell_type"
    )
    assert no_train.headline()["utility_f1"] is None and "needs training cells" in no_train.table()


def test_resample_baseline_keeps_each_genes_values_per_type():
    train = nb_cells({"A": 80, "B": 40}, seed=31, prefix="t")
    cells = baselines.baseline_cells("resample", train, cell_types={"A": 30, "B": 50}, seed=0)
    assert list(cells.var_names) == list(train.var_names) and cells.obs["cell_type"].value_counts().to_dict() == {
        "A": 30,
        "B": 50,
    }
    logx = log_normalized(train).X.toarray()
    types = train.obs["cell_type"].astype(str).to_numpy()
    for t in ("A", "B"):
        drawn = cells.X[cells.obs["cell_type"].to_numpy() == t]
        for j in range(0, N_GENES, 7):  # every drawn value is one of that gene's values in that type
            assert (np.abs(drawn[:, j, None] - logx[types == t, j][None]).min(axis=1) < 1e-5).all()
    gauss = baselines.baseline_cells("gaussian", train, n_cells=500, seed=0)
    assert gauss.X.min() >= 0 and np.abs(gauss.X.mean(0) - logx.mean(0)).max() < 0.5
    report = evaluate(train, cells, label_key="cell_type", baselines=False)  # an AnnData the evaluator takes
    assert report.headline()["zero_frac_mad"] < 0.1
    with pytest.raises(ValueError, match="unknown baseline"):
        baselines.baseline_cells("scvi", train, n_cells=5)


def test_baselines_as_generators_share_the_evaluator():
    train = nb_cells({"A": 80, "B": 80}, seed=41, prefix="t")
    held_out = nb_cells({"A": 40, "B": 40}, seed=42, prefix="h")
    rows = baseline_headlines(held_out, train, "cell_type", n_cells=80, seed=0)
    assert set(rows) == {"gaussian", "resample"} and all(set(r) == set(HEADLINE) for r in rows.values())
    # resampling keeps every gene's zeros; the Gaussian has none
    assert rows["resample"]["zero_frac_mad"] < rows["gaussian"]["zero_frac_mad"] / 3
    assert rows["resample"]["utility_f1"] is not None  # training cells given: the utility is measured
