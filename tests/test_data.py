"""Reading .h5ad files, preprocessing (and its inverse), and training batches."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from wbdit import datasets
from wbdit.batches import CellBatches
from wbdit.data import read_h5ad, write_h5ad
from wbdit.preprocessing import Preprocessor, cluster_gene_order, log_normalize, validate_expression


def counts_adata(n_cells=40, n_genes=30, sparse=True, seed=0) -> ad.AnnData:
    a = datasets.synthetic(n_cells, n_genes, n_types=3, markers_per_type=4, seed=seed)
    if not sparse:
        a.X = a.X.toarray()
    return a


def lognorm(counts: np.ndarray) -> np.ndarray:
    """log1p(normalize_total(1e4)) in float64 numpy: the expected values."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)


# ---------------------------------------------------------------- reading


def test_read_h5ad_errors_name_the_file_and_problem(tmp_path):
    missing = tmp_path / "nope.h5ad"
    with pytest.raises(FileNotFoundError, match="nope.h5ad: no such file"):
        read_h5ad(missing)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_h5ad(tmp_path)
    text = tmp_path / "cells.h5ad"
    text.write_text("gene,cell\nA,1\n")
    with pytest.raises(ValueError, match=r"cells.h5ad: not an .h5ad \(HDF5\) file"):
        read_h5ad(text)
    empty = tmp_path / "empty.h5ad"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="not an .h5ad"):
        read_h5ad(empty)
    import h5py

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["foo"] = np.arange(3)
    with pytest.raises(ValueError, match=r"other.h5: an HDF5 file but not AnnData \(it holds \['foo'\]"):
        read_h5ad(other)


def test_read_write_round_trip(tmp_path):
    a = counts_adata()
    write_h5ad(a, tmp_path / "sub" / "a.h5ad")  # creates the directory
    b = read_h5ad(tmp_path / "sub" / "a.h5ad")
    assert list(b.var_names) == list(a.var_names) and list(b.obs_names) == list(a.obs_names)
    assert (b.obs["cell_type"].astype(str) == a.obs["cell_type"].astype(str)).all()
    assert (b.X != a.X).nnz == 0
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.h5ad"]  # no temporary left


def test_write_h5ad_failure_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    a = counts_adata()
    path = tmp_path / "out.h5ad"

    def broken_write(self, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\x89HDF\r\n\x1a\n partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken_write)
    with pytest.raises(OSError, match="disk full"):
        write_h5ad(a, path)
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"old contents")
    with pytest.raises(OSError, match="disk full"):
        write_h5ad(a, path)
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == b"old contents"


# ---------------------------------------------------------------- validation


def test_counts_vs_log_normalized_detection():
    a = counts_adata(sparse=False)
    assert validate_expression(a.X) == "counts"
    assert validate_expression(sp.csr_matrix(a.X)) == "counts"
    assert validate_expression(lognorm(a.X)) == "log-normalized"
    assert validate_expression(a.X.astype(np.int64)) == "counts"


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize(
    "bad,match",
    [
        (np.nan, "1 NaN or infinite values"),
        (np.inf, "1 NaN or infinite values"),
        (-1.0, "negative values"),
    ],
)
def test_bad_values_are_rejected(sparse, bad, match):
    a = counts_adata(sparse=False)
    X = a.X.copy()
    X[3, 5] = bad
    a.X = sp.csr_matrix(X) if sparse else X
    with pytest.raises(ValueError, match=match):
        Preprocessor.fit(a, "cell_type")


def test_zero_cells_and_zero_genes():
    a = counts_adata()
    with pytest.raises(ValueError, match="zero cells"):
        Preprocessor.fit(a[:0].copy(), "cell_type")
    with pytest.raises(ValueError, match="zero genes"):
        Preprocessor.fit(a[:, :0].copy(), "cell_type")
    with pytest.raises(ValueError, match="no cells to train on"):
        CellBatches(sp.csr_matrix((0, 5), dtype=np.float32), None, None, 4)


def test_cells_with_zero_total_counts_are_named():
    a = counts_adata(sparse=False)
    a.X[[2, 7]] = 0
    with pytest.raises(ValueError, match="2 cells have zero total counts"):
        Preprocessor.fit(a)


def test_missing_label_key_names_the_key_and_lists_columns():
    a = counts_adata()
    a.obs["batch"] = "b1"
    with pytest.raises(KeyError) as err:
        Preprocessor.fit(a, label_key="celltype")
    msg = err.value.args[0]
    assert "'celltype'" in msg and "cell_type" in msg and "batch" in msg


def test_missing_labels_are_rejected():
    a = counts_adata()
    a.obs["cell_type"] = a.obs["cell_type"].astype(object)
    a.obs.iloc[4, 0] = None
    with pytest.raises(ValueError, match="1 missing labels"):
        Preprocessor.fit(a, label_key="cell_type")


def test_unknown_layer_lists_layers():
    a = counts_adata()
    a.layers["counts"] = a.X.copy()
    with pytest.raises(KeyError, match=r"layer 'raw' not found; available layers: \['counts'\]"):
        Preprocessor.fit(a, layer="raw")


# ---------------------------------------------------------------- preprocessing


def test_log_normalize_matches_formula():
    a = counts_adata(sparse=False)
    logx, lib = log_normalize(a.X, "counts")
    assert sp.issparse(logx) and logx.dtype == np.float32
    np.testing.assert_allclose(logx.toarray(), lognorm(a.X), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lib, a.X.sum(1), rtol=1e-6)


def test_dense_and_sparse_input_give_identical_results():
    dense, sparse = counts_adata(sparse=False), counts_adata(sparse=True)
    assert isinstance(dense.X, np.ndarray) and sp.issparse(sparse.X)
    pd_, xd, yd = Preprocessor.fit(dense, "cell_type")
    ps, xs, ys = Preprocessor.fit(sparse, "cell_type")
    assert pd_ == ps
    assert (xd != xs).nnz == 0 and np.array_equal(yd, ys)


def test_named_layer_and_log_normalized_input():
    a = counts_adata(sparse=False)
    counts = a.X.copy()
    a.layers["counts"] = counts
    a.X = lognorm(counts).astype(np.float32)  # .X already log-normalized, counts in a layer
    p_layer, x_layer, _ = Preprocessor.fit(a, "cell_type", layer="counts")
    assert p_layer.input_kind == "counts" and p_layer.layer == "counts"
    assert set(p_layer.log_library) == {"__all__", "type_0", "type_1", "type_2"}
    mu, sd = p_layer.log_library["__all__"]
    assert mu == pytest.approx(np.log(counts.sum(1)).mean(), rel=1e-5) and sd > 0
    p_x, x_x, _ = Preprocessor.fit(a, "cell_type")
    assert p_x.input_kind == "log-normalized" and p_x.log_library == {}
    np.testing.assert_allclose(x_x.toarray(), x_layer.toarray(), rtol=1e-5, atol=1e-6)


def test_labels_and_class_counts():
    a = counts_adata()
    pre, _, labels = Preprocessor.fit(a, "cell_type")
    assert pre.categories == ["type_0", "type_1", "type_2"] and pre.label_key == "cell_type"
    assert [pre.categories[i] for i in labels] == list(a.obs["cell_type"].astype(str))
    assert pre.class_counts == [int((a.obs["cell_type"] == c).sum()) for c in pre.categories]
    assert pre.label_index("type_2") == 2
    with pytest.raises(ValueError, match="unknown cell type 'B cell'"):
        pre.label_index("B cell")
    pre_u, _, labels_u = Preprocessor.fit(a)
    assert labels_u is None and pre_u.categories == [] and pre_u.class_counts == []


@pytest.mark.parametrize("n", [5, 12])
def test_highly_variable_selection_keeps_n_genes(n):
    a = counts_adata(n_cells=60, n_genes=40)
    pre, logx, _ = Preprocessor.fit(a, "cell_type", n_top_genes=n)
    assert pre.n_genes == n and logx.shape == (60, n) and pre.n_top_genes == n
    idx = [list(a.var_names).index(g) for g in pre.var_names]
    assert idx == sorted(idx)  # a subset in the original order
    full = lognorm(a.X.toarray())  # normalised on all genes, then subset
    np.testing.assert_allclose(logx.toarray(), full[:, idx], rtol=1e-5, atol=1e-6)
    assert len(pre.center) == len(pre.scale) == len(pre.x_max) == n
    pre_all, logx_all, _ = Preprocessor.fit(a, "cell_type", n_top_genes=100)  # more than there are: all
    assert pre_all.n_genes == 40


def test_highly_variable_genes_agree_with_scanpy_where_scanpy_has_no_ties():
    import scanpy as sc

    adata = datasets.pbmc68k()
    pre, _, _ = Preprocessor.fit(adata, n_top_genes=100)
    logx, _ = log_normalize(adata.X, "counts")
    tmp = ad.AnnData(logx, var=adata.var)
    sc.pp.highly_variable_genes(tmp, n_top_genes=100, flavor="seurat")
    assert pre.var_names == tmp.var_names[tmp.var["highly_variable"].to_numpy()].tolist()


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("scaling", ["minmax", "standard"])
def test_transform_inverse_round_trip_and_bounds(scaling, ordered):
    a = counts_adata(n_cells=50)
    pre, logx, _ = Preprocessor.fit(a, "cell_type", scaling=scaling)
    x = torch.from_numpy(logx.toarray())
    unordered = pre.transform(x)
    if ordered:
        pre.order = np.random.default_rng(0).permutation(pre.n_genes).tolist()
    z = pre.transform(x)
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z, unordered[:, pre.order] if ordered else unordered, rtol=0, atol=0)
    torch.testing.assert_close(pre.inverse(z), x, rtol=1e-5, atol=1e-5)
    lo, hi = pre.bounds()
    assert lo.shape == hi.shape == (pre.n_genes,) and (lo <= hi).all()
    assert (z >= lo - 1e-5).all() and (z <= hi + 1e-5).all()
    if scaling == "minmax":
        expressed = torch.tensor(pre.x_max) >= 1e-3
        torch.testing.assert_close(lo[expressed], torch.full_like(lo[expressed], -1.0))
        torch.testing.assert_close(hi[expressed], torch.full_like(hi[expressed], 1.0))
    else:
        torch.testing.assert_close(z.mean(0), torch.zeros(pre.n_genes), atol=1e-4, rtol=0)
    # The inverse clips to the observed range: exact zeros below, x_max above.
    out = pre.inverse(torch.stack([lo - 5, hi + 5]))
    assert (out[0] == 0).all()
    torch.testing.assert_close(out[1], torch.tensor(pre.x_max, dtype=torch.float32))


def test_cluster_gene_order_puts_each_types_markers_in_one_run():
    m, n_types = 8, 3
    a = datasets.synthetic(n_cells=600, n_genes=120, n_types=n_types, markers_per_type=m, seed=1)
    shuffle = np.random.default_rng(0).permutation(a.n_vars)
    a = a[:, shuffle].copy()  # markers scattered through the file
    _, logx, _ = Preprocessor.fit(a, "cell_type")
    order = cluster_gene_order(logx)
    assert sorted(order) == list(range(a.n_vars))
    position = np.argsort(order)  # gene index -> model position
    for t in range(n_types):
        markers = np.flatnonzero((shuffle >= t * m) & (shuffle < (t + 1) * m))
        assert np.ptp(position[markers]) == m - 1, f"type {t}'s markers sit at {sorted(position[markers])}"
    assert cluster_gene_order(logx) == order  # deterministic
    assert cluster_gene_order(logx, max_cells=100) != list(range(a.n_vars))  # a subsample still clusters


def test_unknown_scaling():
    with pytest.raises(ValueError, match="unknown scaling 'log'"):
        Preprocessor.fit(counts_adata(), scaling="log")


def test_to_dict_from_dict_round_trip(tmp_path):
    pre, _, _ = Preprocessor.fit(counts_adata(), "cell_type", n_top_genes=10)
    pre.order = list(range(pre.n_genes))[::-1]
    assert Preprocessor.from_dict(pre.to_dict()) == pre
    assert Preprocessor.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre  # lists back to tuples
    torch.save(pre.to_dict(), tmp_path / "p.pt")
    assert Preprocessor.from_dict(torch.load(tmp_path / "p.pt", weights_only=True)) == pre


def test_all_zero_gene_gets_a_finite_scale():
    a = counts_adata(sparse=False)
    a.X[:, 0] = 0
    a.X[:, 1] = a.X[:, 1] + 1  # keep every cell's library > 0 whatever gene 0 held
    for scaling in ("minmax", "standard"):
        pre, logx, _ = Preprocessor.fit(a, scaling=scaling)
        z = pre.transform(torch.from_numpy(logx.toarray()))
        assert torch.isfinite(z).all() and np.isfinite(pre.scale).all() and min(pre.scale) > 0


# ---------------------------------------------------------------- batches


def _batches(n_cells=20, batch_size=6, labels=True):
    a = counts_adata(n_cells=n_cells, n_genes=15)
    pre, logx, y = Preprocessor.fit(a, "cell_type" if labels else None)
    return CellBatches(logx, y, pre, batch_size), pre, logx, y


def _ids(batches, seed, epoch):
    """Row index of each yielded cell, recovered by matching rows (cells are distinct)."""
    rows = {
        tuple(np.round(r, 5)): i
        for i, r in enumerate(batches.pre.transform(torch.from_numpy(batches.logx.toarray())).numpy())
    }
    return [[rows[tuple(np.round(r, 5))] for r in x.numpy()] for x, _ in batches.epoch(seed, epoch, "cpu")]


def test_batches_deterministic_per_seed_and_epoch():
    b, _, _, _ = _batches()
    assert len(b) == 3  # 20 // 6: the ragged last batch is dropped
    e0 = _ids(b, seed=1, epoch=0)
    assert e0 == _ids(b, seed=1, epoch=0)
    assert e0 != _ids(b, seed=1, epoch=1)
    assert e0 != _ids(b, seed=2, epoch=0)


def test_batches_cover_cells_once_per_epoch():
    b, pre, logx, y = _batches(n_cells=24, batch_size=6)
    ids = _ids(b, seed=0, epoch=3)
    flat = [i for batch in ids for i in batch]
    assert sorted(flat) == list(range(24))  # every cell exactly once
    ragged, *_ = _batches(n_cells=20, batch_size=6)
    flat = [i for batch in _ids(ragged, 0, 0) for i in batch]
    assert len(flat) == len(set(flat)) == 18


def test_batches_are_dense_model_space_with_matching_labels():
    b, pre, logx, y = _batches(n_cells=24, batch_size=6)
    full = pre.transform(torch.from_numpy(logx.toarray()))
    for x, yy in b.epoch(0, 0, "cpu"):
        assert x.shape == (6, pre.n_genes) and x.dtype == torch.float32 and x.layout == torch.strided
        assert yy.dtype == torch.int64 and yy.shape == (6,)
        for row, label in zip(x, yy):
            i = int(torch.argmin((full - row).abs().sum(1)))
            assert torch.equal(full[i], row) and y[i] == label
    nolab, *_ = _batches(labels=False)
    assert all(yy is None for _, yy in nolab.epoch(0, 0, "cpu"))
    assert len(CellBatches(logx, y, pre, batch_size=1000)) == 1  # batch larger than the data: one batch


def test_batches_densify_only_one_batch_at_a_time(monkeypatch):
    b, pre, logx, y = _batches(n_cells=24, batch_size=6)
    shapes = []
    real = sp.csr_matrix.toarray

    def spy(self, *args, **kwargs):
        shapes.append(self.shape)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(sp.csr_matrix, "toarray", spy)
    n = sum(1 for _ in b.epoch(0, 0, "cpu"))
    assert n == 4 and shapes == [(6, pre.n_genes)] * 4


def test_pbmc68k_is_offline_counts_with_cell_types():
    a = datasets.pbmc68k()
    assert a.shape == (700, 765) and a.obs["cell_type"].nunique() == 10
    assert validate_expression(a.X) == "counts"
    assert (np.asarray(a.X.sum(1)).ravel() > 0).all()


def test_synthetic_dataset():
    a = datasets.synthetic(n_cells=30, n_genes=25, n_types=2, markers_per_type=5, seed=3)
    assert a.shape == (30, 25) and sp.issparse(a.X) and validate_expression(a.X) == "counts"
    assert isinstance(a.obs["cell_type"].dtype, pd.CategoricalDtype)
    b = datasets.synthetic(n_cells=30, n_genes=25, n_types=2, markers_per_type=5, seed=3)
    assert (a.X != b.X).nnz == 0
    X = a.X.toarray()
    t0 = (a.obs["cell_type"] == "type_0").to_numpy()
    assert X[t0, :5].mean() > 5 * X[~t0, :5].mean()  # markers of type 0 are higher in type 0
    with pytest.raises(ValueError, match="exceed 25 genes"):
        datasets.synthetic(n_genes=25, n_types=3, markers_per_type=10)
