"""Out-of-core training data: an ``.h5ad`` matrix read in row chunks, preprocessing fitted in one pass.

Open the file backed (``wbdit.read_h5ad(path, backed=True)``, CLI ``wbdit train --backed``)
and ``train`` calls ``fit_backed`` instead of ``Preprocessor.fit``:

- ``fit_backed`` reads the matrix once, ``CHUNK_CELLS`` rows at a time, and accumulates per
  gene the max, smallest non-zero value, sums and sums of squares of the log-normalized
  values (and of ``expm1`` of them, for highly variable genes), and per cell type the
  log library sizes. Memory is O(genes) plus one chunk, whatever the number of cells.
- ``BackedRows`` is the log-normalized, gene-selected matrix read on demand:
  ``rows[a:b]`` reads, normalizes and subsets one row block. ``wbdit.data.CellBatches``
  takes it in place of an in-memory CSR matrix and reads it in the same chunked order
  (``wbdit.data.epoch_windows``), so backed and in-memory runs see identical batches.

Differences from the in-memory ``Preprocessor.fit``, all within float rounding:

- Highly variable genes: scanpy's ``highly_variable_genes`` needs the whole matrix, so the
  Seurat rule is re-implemented on streamed moments (``seurat_dispersions``): per-gene mean
  and unbiased variance of ``expm1(logx)``, dispersion ``log(var / mean)``, 20 equal-width
  bins of ``log1p(mean)``, z-scored within bins, a gene alone in its bin gets 1, top genes
  ranked by ``wbdit.data.top_genes``. The moments are float64 sums in another order than
  scanpy's, so a gene tied at the cut-off to the last bit could be chosen differently.
- "standard" scaling's mean and variance are float64 sums here and float32 in scipy's
  ``mean``; the minmax scaling (per-gene max) and ``zero_threshold`` are bit-identical.

Each chunk costs one contiguous read. obs (cell names, labels) is still held in memory, as
anndata does for backed files: about 100 bytes per cell against kilobytes for its expression.
anndata also loads every layer when it opens a file backed: streamed training saves memory
when the counts are in ``X``.
"""
from __future__ import annotations

import os

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from wbdit.data import (
    CHUNK_CELLS,
    SCALINGS,
    Preprocessor,
    encode_labels,
    log_normalize,
    scaling_parameters,
    top_genes,
    validate_expression,
)

HVG_BINS = 20


class H5Matrix:
    """Row blocks of an ``.h5ad`` file's ``X`` or ``layers[layer]`` (dense or CSR), read on demand.

    ``matrix[a:b]`` is the rows a..b-1 as a float32 CSR matrix (b - a, n_vars): for CSR, one
    contiguous read of ``data`` and ``indices`` between the rows' ``indptr`` bounds.
    """

    def __init__(self, path: str | os.PathLike, layer: str | None = None):
        self.file = h5py.File(path, "r")
        if layer is not None and layer not in self.file.get("layers", {}):
            raise KeyError(f"layer {layer!r} not found; available layers: {sorted(self.file.get('layers', {}))}")
        elem = self.file["X"] if layer is None else self.file["layers"][layer]
        self.sparse = isinstance(elem, h5py.Group)
        if self.sparse and elem.attrs.get("encoding-type") != "csr_matrix":
            raise ValueError(f"{path}: backed training reads rows and needs a CSR or dense matrix, "
                             f"not {elem.attrs.get('encoding-type')}; convert with adata.X = adata.X.tocsr()")
        self.elem = elem
        self.shape = tuple(int(d) for d in elem.attrs["shape"]) if self.sparse else elem.shape

    def __getitem__(self, rows: slice) -> sp.csr_matrix:
        start, stop, _ = rows.indices(self.shape[0])
        if not self.sparse:
            return sp.csr_matrix(self.elem[start:stop], dtype=np.float32)
        ptr = self.elem["indptr"][start : stop + 1].astype(np.int64)
        data = self.elem["data"][ptr[0] : ptr[-1]].astype(np.float32, copy=False)
        return sp.csr_matrix((data, self.elem["indices"][ptr[0] : ptr[-1]], ptr - ptr[0]),
                             shape=(stop - start, self.shape[1]))


class BackedRows:
    """The log-normalized matrix (cells x ``pre``'s genes) of a backed AnnData, read on demand.

    ``rows[a:b]`` reads rows a..b-1 of the counts, applies ``log_normalize`` and keeps
    ``pre.var_names``: float32 CSR (b - a, pre.n_genes), the same values as the in-memory path.
    """

    def __init__(self, adata: ad.AnnData, pre: Preprocessor):
        self.matrix = H5Matrix(adata.filename, pre.layer)
        self.kind = pre.input_kind
        keep = pd.Index(adata.var_names.astype(str)).get_indexer(pre.var_names)
        if (keep < 0).any():
            raise ValueError(f"{int((keep < 0).sum())} of the preprocessor's genes are not in {adata.filename}")
        self.keep = None if np.array_equal(keep, np.arange(self.matrix.shape[1])) else keep
        self.shape = (self.matrix.shape[0], pre.n_genes)

    def __getitem__(self, rows: slice) -> sp.csr_matrix:
        logx, _ = log_normalize(self.matrix[rows], self.kind)
        return logx if self.keep is None else logx[:, self.keep]


class GeneMoments:
    """Per-gene statistics of log-normalized cells, accumulated one chunk at a time (float64)."""

    def __init__(self, n_genes: int, hvg: bool):
        self.n, self.hvg = 0, hvg
        self.x_max = np.zeros(n_genes)
        self.min_pos = np.full(n_genes, np.inf)  # smallest non-zero value
        self.sum, self.sumsq = np.zeros(n_genes), np.zeros(n_genes)
        self.sum_e, self.sumsq_e = np.zeros(n_genes), np.zeros(n_genes)  # of expm1(x): Seurat HVG

    def add(self, logx: sp.csr_matrix) -> None:
        """Add a chunk of cells (float32 CSR, cells x genes, non-negative)."""
        self.n += logx.shape[0]
        csc = logx.tocsc()  # each gene's values contiguous: one reduceat per statistic
        filled = np.diff(csc.indptr) > 0
        if not filled.any():
            return
        starts, v = csc.indptr[:-1][filled], csc.data.astype(np.float64)
        self.x_max[filled] = np.maximum(self.x_max[filled], np.maximum.reduceat(v, starts))
        positive = np.where(v > 0, v, np.inf)  # stored zeros are not the smallest non-zero value
        self.min_pos[filled] = np.minimum(self.min_pos[filled], np.minimum.reduceat(positive, starts))
        self.sum[filled] += np.add.reduceat(v, starts)
        self.sumsq[filled] += np.add.reduceat(v * v, starts)
        if self.hvg:
            e = np.expm1(csc.data).astype(np.float64)  # expm1 in float32, as scanpy on a float32 matrix
            self.sum_e[filled] += np.add.reduceat(e, starts)
            self.sumsq_e[filled] += np.add.reduceat(e * e, starts)

    def mean_var_expm1(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased variance of expm1(x) per gene (scanpy's ``_get_mean_var``)."""
        mean = self.sum_e / self.n
        var = (self.sumsq_e / self.n - mean**2) * (self.n / max(self.n - 1, 1))
        return mean, np.maximum(var, 0.0)


def seurat_dispersions(mean: np.ndarray, var: np.ndarray, n_bins: int = HVG_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Seurat-flavour (dispersions, dispersions_norm) per gene from the mean and variance of expm1(logx).

    Follows scanpy's ``highly_variable_genes(flavor="seurat")``: dispersion log(var / mean)
    (NaN where it is 0), bins of log1p(mean) cut into ``n_bins`` equal widths, z-score of the
    dispersion within its bin; a gene alone in its bin gets normalized dispersion 1.
    """
    mean = np.where(mean == 0, 1e-12, mean)
    disp = var / mean
    disp[disp == 0] = np.nan
    disp = np.log(disp)
    bins = pd.cut(np.log1p(mean), bins=n_bins, labels=False)
    stats = pd.Series(disp).groupby(bins).agg(["mean", "std"])
    alone = stats["std"].isna()
    stats.loc[alone, "std"] = stats.loc[alone, "mean"]
    stats.loc[alone, "mean"] = 0.0
    avg, dev = stats["mean"].reindex(bins).to_numpy(), stats["std"].reindex(bins).to_numpy()
    return disp, (disp - avg) / dev


def fit_backed(
    adata: ad.AnnData,
    label_key: str | None = None,
    layer: str | None = None,
    n_top_genes: int | None = None,
    scaling: str = "minmax",
    chunk_cells: int = CHUNK_CELLS,
) -> tuple[Preprocessor, BackedRows, np.ndarray | None]:
    """``Preprocessor.fit`` for an AnnData opened with ``backed=True``, in one streaming pass.

    Returns the preprocessor, the log-normalized cells as ``BackedRows`` (read on demand) and
    the labels (n_cells,) int64 or None. Peak memory: O(genes) plus one chunk of ``chunk_cells``.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; choose from {SCALINGS}")
    if not adata.isbacked:
        raise ValueError("fit_backed needs an AnnData opened with backed=True (wbdit.read_h5ad(path, backed=True))")
    what = f".layers[{layer!r}]" if layer else ".X"
    matrix = H5Matrix(adata.filename, layer)
    n, g = matrix.shape
    if n == 0:
        validate_expression(sp.csr_matrix((0, g)), what)  # raises "has zero cells"
    labels, categories = encode_labels(adata, label_key)
    groups = labels if labels is not None else np.zeros(n, np.int64)
    n_groups = max(len(categories), 1)
    hvg = n_top_genes is not None and n_top_genes < g
    # Integer values mean counts. A non-integer value makes the input log-normalized: the pass
    # starts again reading it so (re-reading only chunks already seen, usually none).
    kind, stats = "counts", _moments(matrix, "counts", groups, n_groups, hvg, chunk_cells, what)
    if stats is None:
        kind, stats = "log-normalized", _moments(matrix, "log-normalized", groups, n_groups, hvg, chunk_cells, what)
    m, log_lib = stats
    keep = np.arange(g)
    if hvg:
        disp, disp_norm = seurat_dispersions(*m.mean_var_expm1())
        keep = top_genes(disp_norm, disp, n_top_genes)
    mean, sq = m.sum[keep] / n, m.sumsq[keep] / n
    center, scale = scaling_parameters(scaling, m.x_max[keep], (mean, sq))
    min_pos = m.min_pos[keep].min() if len(keep) else np.inf
    log_library = {}
    if kind == "counts":
        summaries = {"__all__": log_lib.sum(axis=1)}
        summaries.update({c: log_lib[:, i] for i, c in enumerate(categories)})
        for name, (cells, s, s2) in summaries.items():
            mu = s / cells
            log_library[name] = (float(mu), float(np.sqrt(max(s2 / cells - mu * mu, 0.0))))
    genes = np.asarray(adata.var_names.astype(str))[keep]
    pre = Preprocessor(
        var_names=[str(x) for x in genes], input_kind=kind, scaling=scaling, layer=layer,
        n_top_genes=n_top_genes, label_key=label_key, categories=categories,
        class_counts=[] if labels is None else np.bincount(labels, minlength=len(categories)).tolist(),
        center=np.asarray(center).tolist(), scale=np.asarray(scale).tolist(), x_max=m.x_max[keep].tolist(),
        zero_threshold=0.5 * float(min_pos) if np.isfinite(min_pos) else 0.0, log_library=log_library,
    )
    return pre, BackedRows(adata, pre), labels


def _moments(
    matrix: H5Matrix, kind: str, groups: np.ndarray, n_groups: int, hvg: bool, chunk_cells: int, what: str
) -> tuple[GeneMoments, np.ndarray] | None:
    """One pass: gene moments of the log-normalized cells and per-group log library sums (3, n_groups).

    Returns None if ``kind`` is "counts" and a non-integer value shows up. Raises on invalid
    values and, for counts, on cells with zero total counts (all of them counted).
    """
    n, g = matrix.shape
    moments, log_lib, zero_lib = GeneMoments(g, hvg), np.zeros((3, n_groups)), 0
    for start in range(0, n, chunk_cells):
        X = matrix[start : start + chunk_cells]
        if validate_expression(X, what) == "log-normalized" and kind == "counts":
            return None
        if kind == "log-normalized":
            moments.add(X)
            continue
        lib = np.asarray(X.sum(axis=1)).ravel()
        zero_lib += int((lib == 0).sum())
        if zero_lib:
            continue  # an error unless a later chunk shows the input is log-normalized
        logx, lib = log_normalize(X, kind)
        moments.add(logx)
        ll = np.log(lib).astype(np.float64)
        for row, w in enumerate((np.ones_like(ll), ll, ll * ll)):
            log_lib[row] += np.bincount(groups[start : start + chunk_cells], weights=w, minlength=n_groups)
    if zero_lib:
        raise ValueError(f"{zero_lib} cells have zero total counts; filter them out first")
    return moments, log_lib
