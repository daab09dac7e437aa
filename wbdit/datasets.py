"""Datasets available offline: real PBMC cells shipped with scanpy, and simulated counts."""

from __future__ import annotations

import os
from collections.abc import Iterator

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from wbdit.atomic import atomic_path


def pbmc68k() -> ad.AnnData:
    """700 real PBMC cells x 765 genes as integer counts, ``obs["cell_type"]`` (10 types).

    From scanpy's bundled ``10x_pbmc68k_reduced.h5ad``, whose ``.raw.X`` is
    ``log1p(counts / n_counts * 1e4)``: counts = round(expm1(raw.X) * n_counts / 1e4).
    """
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    raw = src.raw.X.toarray() if sp.issparse(src.raw.X) else np.asarray(src.raw.X)
    counts = np.round(np.expm1(raw.astype(np.float64)) * src.obs["n_counts"].to_numpy()[:, None] / 1e4)
    obs = pd.DataFrame({"cell_type": src.obs["bulk_labels"].astype(str).astype("category").values}, index=src.obs_names)
    var = pd.DataFrame(index=src.raw.var_names.astype(str))
    return ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)


SIM_CHUNK = 10000  # cells simulated together: part of the simulation's definition (its RNG order)


def synthetic(
    n_cells: int = 1000,
    n_genes: int = 200,
    n_types: int = 3,
    markers_per_type: int = 10,
    seed: int = 0,
    n_batches: int = 1,
) -> ad.AnnData:
    """Negative-binomial counts with cell types, each with its own disjoint marker genes.

    Gene base means are log-normal; type t's markers (genes ``t*m .. t*m + m - 1``) are
    expressed 20x higher in type t and silenced (1/50) elsewhere; library sizes are
    log-normal; dispersion 0.2 (variance = mu + 0.2 mu^2). Returns sparse CSR counts.
    ``n_batches`` > 1 adds a second attribute, ``obs["batch"]`` drawn independently of the
    type: batch b's markers are the m genes after the types' (from ``n_types*m + b*m``),
    20x up in batch b and 1/50 elsewhere.
    """
    obs, var, chunks = _simulate(n_cells, n_genes, n_types, markers_per_type, seed, n_batches)
    return ad.AnnData(sp.vstack(list(chunks)).tocsr(), obs=obs, var=var)


def write_synthetic_h5ad(
    path: str | os.PathLike,
    n_cells: int,
    n_genes: int = 2000,
    n_types: int = 3,
    markers_per_type: int = 10,
    seed: int = 0,
) -> None:
    """Write ``synthetic(...)``'s cells to a sparse (CSR) ``.h5ad`` without holding the matrix.

    The same cells as ``synthetic`` with the same arguments, simulated and appended
    ``SIM_CHUNK`` cells at a time (peak memory: a few dense chunks of SIM_CHUNK x n_genes
    float64, plus obs). Written atomically: a failed write leaves no file.
    """
    obs, var, chunks = _simulate(n_cells, n_genes, n_types, markers_per_type, seed)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ad.io.write_elem(f, "/", ad.AnnData(obs=obs, var=var))
        # anndata writes sparse datasets resizable (maxshape None), so chunks can be appended
        ad.io.write_elem(f, "X", next(chunks), dataset_kwargs=dict(chunks=(1 << 16,)))
        X = ad.io.sparse_dataset(f["X"])
        for chunk in chunks:
            X.append(chunk)


def _simulate(
    n_cells: int, n_genes: int, n_types: int, markers_per_type: int, seed: int, n_batches: int = 1
) -> tuple[pd.DataFrame, pd.DataFrame, Iterator[sp.csr_matrix]]:
    """obs (with ``cell_type``, and ``batch`` if n_batches > 1), var, and the counts as float32
    CSR chunks of SIM_CHUNK cells."""
    groups = n_types + (n_batches if n_batches > 1 else 0)
    if groups * markers_per_type > n_genes:
        raise ValueError(f"{groups} types and batches x {markers_per_type} markers exceed {n_genes} genes")
    rng = np.random.default_rng(seed)
    base = rng.lognormal(mean=-1.0, sigma=1.5, size=n_genes)
    types = rng.integers(0, n_types, size=n_cells)
    # Drawn only with batches: a one-batch simulation keeps the random stream of every earlier version.
    batches = rng.integers(0, n_batches, size=n_cells) if n_batches > 1 else None

    def chunks() -> Iterator[sp.csr_matrix]:
        for start in range(0, n_cells, SIM_CHUNK):  # chunks bound the dense working set
            t = types[start : start + SIM_CHUNK]
            mu = np.repeat(base[None], len(t), axis=0)
            for k in range(n_types):
                genes = slice(k * markers_per_type, (k + 1) * markers_per_type)
                mu[:, genes] *= np.where(t == k, 20.0, 1 / 50)[:, None]
            for k in range(n_batches if batches is not None else 0):
                genes = slice((n_types + k) * markers_per_type, (n_types + k + 1) * markers_per_type)
                mu[:, genes] *= np.where(batches[start : start + SIM_CHUNK] == k, 20.0, 1 / 50)[:, None]
            mu *= rng.lognormal(0.0, 0.3, size=(len(t), 1)) / base.sum() * 2000
            r = 1 / 0.2
            lam = rng.gamma(shape=r, scale=mu / r)
            yield sp.csr_matrix(rng.poisson(lam).astype(np.float32))

    names = [f"type_{k}" for k in range(n_types)]
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical.from_codes(types, categories=names)},
        index=pd.Index([f"cell_{i}" for i in range(n_cells)]),
    )
    if batches is not None:
        obs["batch"] = pd.Categorical.from_codes(batches, categories=[f"batch_{k}" for k in range(n_batches)])
    var = pd.DataFrame(index=[f"gene_{g}" for g in range(n_genes)])
    return obs, var, chunks()
