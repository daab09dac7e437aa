"""Trivial generators: what a user gets without any model, scored by the same evaluator.

Each baseline is fit on real cells (log-normalized, cells x genes) and draws as many cells
of each cell type as a given label vector asks for. They know the real per-gene marginals
and nothing else, so a generative model is worth its training only where it beats them:

- ``gaussian``: per cell type, each gene an independent Gaussian with the real mean and
  standard deviation, clipped at 0 (no zero inflation, no gene-gene correlation).
- ``resample``: per cell type, each gene's value drawn (with replacement) from that gene's
  own real values in that type, independently per gene. It keeps every per-gene marginal
  exactly, zeros included, and loses only the correlations between genes within a type.
  It is the stronger of the two.

``baseline_cells`` wraps either as an AnnData, so it can be passed to ``wbdit.evaluate`` (or
any other tool) in place of generated cells.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from wbdit.preprocessing import TARGET_SUM

BASELINES = ("gaussian", "resample")
DESCRIPTIONS = {
    "gaussian": "per-gene Gaussian (per cell type: each gene's real mean and SD, independent genes, clipped at 0)",
    "resample": "per-gene resampling (per cell type: each gene drawn from its own real values, independent genes)",
}


def _gaussian(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.clip(rng.normal(x.mean(axis=0), x.std(axis=0), size=(n, x.shape[1])), 0, None)


def _resample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    rows = rng.integers(0, len(x), size=(n, x.shape[1]))
    return np.take_along_axis(x, rows, axis=0)


_DRAW = {"gaussian": _gaussian, "resample": _resample}


def draw(
    name: str,
    fit_x: np.ndarray,
    fit_labels: np.ndarray | None,
    like_labels: np.ndarray | None,
    n: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Cells (float32, len(like_labels) or n x genes) from baseline ``name`` fit on ``fit_x`` (cells x genes).

    With labels on both sides, each type of ``like_labels`` is drawn from the fit cells of
    that type (a type the fit cells lack: from all fit cells), row for row in
    ``like_labels``' order; otherwise ``n`` cells from all fit cells.
    """
    if name not in _DRAW:
        raise ValueError(f"unknown baseline {name!r}; choose from {list(BASELINES)}")
    fn = _DRAW[name]
    if like_labels is None or fit_labels is None:
        return fn(fit_x, n, rng).astype(np.float32)
    out = np.empty((len(like_labels), fit_x.shape[1]), dtype=np.float32)
    for t in np.unique(like_labels):
        rows = like_labels == t
        source = fit_x[fit_labels == t] if (fit_labels == t).any() else fit_x
        out[rows] = fn(source, int(rows.sum()), rng)
    return out


def baseline_cells(
    name: str,
    train: ad.AnnData,
    cell_types: dict[str, int] | None = None,
    n_cells: int | None = None,
    label_key: str = "cell_type",
    seed: int = 0,
) -> ad.AnnData:
    """Baseline ``name`` fit on ``train`` (raw counts or log-normalized ``.X``) as an AnnData.

    ``cell_types`` maps type -> count (fit per type on ``train.obs[label_key]``); else
    ``n_cells`` cells from all training cells. ``.X``: log1p(normalize_total(1e4)) values,
    dense float32, same ``var_names`` as ``train``; ``obs[label_key]`` holds the types.
    """
    X = train.X.toarray() if sp.issparse(train.X) else np.asarray(train.X, dtype=np.float64)
    if X.size and np.array_equal(X, np.round(X)):  # raw counts: log-normalize like the evaluator
        totals = X.sum(axis=1, keepdims=True)
        X = np.log1p(X / np.where(totals > 0, totals, 1.0) * TARGET_SUM)
    rng = np.random.default_rng(seed)
    if cell_types is not None:
        labels = np.repeat(np.array(list(cell_types), dtype=object), list(cell_types.values())).astype(str)
        fit_labels = train.obs[label_key].astype(str).to_numpy()
        x = draw(name, X, fit_labels, labels, len(labels), rng)
        obs = pd.DataFrame({label_key: pd.Categorical(labels)}, index=[f"{name}_{i}" for i in range(len(labels))])
    else:
        if n_cells is None:
            raise ValueError("pass cell_types or n_cells")
        x = draw(name, X, None, None, n_cells, rng)
        obs = pd.DataFrame(index=[f"{name}_{i}" for i in range(n_cells)])
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=train.var_names.copy()))
