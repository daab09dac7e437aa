"""Reading ``.h5ad`` files, the field's preprocessing, and batches for the trainer.

Pipeline (every choice is stored in ``Preprocessor`` and saved with the checkpoint):
counts -> normalize_total(1e4) + log1p -> optional highly-variable genes -> per-gene
scaling into the space the diffusion runs in. ``Preprocessor.inverse`` maps model
samples back to log-normalized values (and exact zeros) on the training genes.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Iterator

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from wbdit.atomic import atomic_path
from wbdit.profiling import nvtx_range

TARGET_SUM = 1e4
SCALINGS = ("minmax", "standard")
GENE_ORDERS = ("cluster", "input")  # model-space gene order: correlated genes adjacent, or as given
ORDER_CELLS, ORDER_BLOCK = 20000, 1000  # the clustering reads at most this many cells, in evenly spaced blocks
OPTIMAL_LEAF_GENES = 1000  # optimal leaf ordering is cubic in genes: above this, plain dendrogram order
CLUSTER_MAX_GENES = 8000  # the clustering holds g x g float64 (0.5 GiB at 8000): above, genes keep their order


def read_h5ad(path: str | os.PathLike, backed: bool = False) -> ad.AnnData:
    """Read an AnnData file with errors that name the file and the problem."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, expected an .h5ad file")
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic != b"\x89HDF\r\n\x1a\n":
        raise ValueError(f"{path}: not an .h5ad (HDF5) file")
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:
        raise ValueError(f"{path}: could not be read as AnnData: {exc}") from exc


def get_matrix(adata: ad.AnnData, layer: str | None = None):
    """``.X`` or ``.layers[layer]``, with a clear error for an unknown layer."""
    if layer is None:
        if adata.X is None:
            raise ValueError("the AnnData has no .X; pass layer= to use one of its layers")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"layer {layer!r} not found; available layers: {sorted(adata.layers)}")
    return adata.layers[layer]


def _values(X) -> np.ndarray:
    """The stored (non-implicit-zero) values of a dense or sparse matrix."""
    return X.data if sp.issparse(X) else np.asarray(X).ravel()


def validate_expression(X, what: str = ".X") -> str:
    """Check for NaN/inf/negatives and say whether X holds "counts" or "log-normalized" values."""
    if X.shape[0] == 0:
        raise ValueError(f"{what} has zero cells")
    if X.shape[1] == 0:
        raise ValueError(f"{what} has zero genes")
    v = _values(X)
    if v.size and not np.isfinite(v).all():
        bad = int((~np.isfinite(v)).sum())
        raise ValueError(f"{what} contains {bad} NaN or infinite values")
    if v.size and v.min() < 0:
        raise ValueError(
            f"{what} contains negative values (min {v.min():.3g}); wbdit expects raw counts or "
            "log1p-normalized expression, not scaled or centred data"
        )
    return "counts" if np.array_equal(v, np.round(v)) else "log-normalized"


def log_normalize(X, kind: str) -> tuple[sp.csr_matrix, np.ndarray]:
    """log1p(normalize_total(1e4)) as float32 CSR, and library sizes (counts input; else NaN)."""
    X = sp.csr_matrix(X, dtype=np.float32)
    if kind == "log-normalized":
        return X, np.full(X.shape[0], np.nan, dtype=np.float32)
    lib = np.asarray(X.sum(axis=1)).ravel()
    if (lib == 0).any():
        raise ValueError(f"{int((lib == 0).sum())} cells have zero total counts; filter them out first")
    X = sp.diags((TARGET_SUM / lib).astype(np.float32)) @ X
    X.data = np.log1p(X.data)
    return sp.csr_matrix(X), lib.astype(np.float32)


@dataclass
class Preprocessor:
    """Everything needed to map between an AnnData's genes and the model's space, and back.

    ``center``/``scale`` define ``z = (x - center) / scale`` per gene on log-normalized x;
    ``bounds()`` is the valid range of z (x in [0, max observed]). Real log-normalized
    values never fall in (0, smallest non-zero value): ``inverse`` maps model outputs below
    ``zero_threshold`` (half that gap) to exact zeros.
    """

    var_names: list[str]
    input_kind: str
    scaling: str = "minmax"
    layer: str | None = None
    n_top_genes: int | None = None
    label_key: str | None = None
    categories: list[str] = field(default_factory=list)
    class_counts: list[int] = field(default_factory=list)
    center: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    x_max: list[float] = field(default_factory=list)
    zero_threshold: float = 0.0
    log_library: dict[str, tuple[float, float]] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)  # model position -> gene index (empty: input order)

    @classmethod
    def fit(
        cls,
        adata: ad.AnnData,
        label_key: str | None = None,
        layer: str | None = None,
        n_top_genes: int | None = None,
        scaling: str = "minmax",
    ) -> tuple["Preprocessor", sp.csr_matrix, np.ndarray | None]:
        """Fit on ``adata``; return the preprocessor, log-normalized CSR (cells x kept genes), labels."""
        if scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {scaling!r}; choose from {SCALINGS}")
        X = get_matrix(adata, layer)
        kind = validate_expression(X, f".layers[{layer!r}]" if layer else ".X")
        labels, categories = encode_labels(adata, label_key)
        logx, lib = log_normalize(X, kind)
        genes = np.asarray(adata.var_names.astype(str))
        if n_top_genes is not None and n_top_genes < len(genes):
            keep = highly_variable(logx, n_top_genes)
            logx, genes = logx[:, keep], genes[keep]
        x_max = np.asarray(logx.max(axis=0).todense()).ravel().astype(np.float64)
        moments = None if scaling == "minmax" else (
            np.asarray(logx.mean(axis=0)).ravel(), np.asarray(logx.multiply(logx).mean(axis=0)).ravel())
        center, scale = scaling_parameters(scaling, x_max, moments)
        zero_threshold = 0.5 * float(logx.data[logx.data > 0].min()) if logx.nnz else 0.0
        log_library = {}
        if kind == "counts":
            groups = {c: labels == i for i, c in enumerate(categories)} if labels is not None else {}
            for name, mask in {"__all__": np.ones(len(lib), bool), **groups}.items():
                ll = np.log(lib[mask])
                log_library[name] = (float(ll.mean()), float(ll.std()))
        pre = cls(
            var_names=[str(g) for g in genes], input_kind=kind, scaling=scaling, layer=layer,
            n_top_genes=n_top_genes, label_key=label_key, categories=categories,
            class_counts=[] if labels is None else np.bincount(labels, minlength=len(categories)).tolist(),
            center=center.tolist(), scale=scale.tolist(), x_max=x_max.tolist(), zero_threshold=zero_threshold,
            log_library=log_library,
        )
        return pre, logx, labels

    @property
    def n_genes(self) -> int:
        return len(self.var_names)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessor":
        return cls(**{**d, "log_library": {k: tuple(v) for k, v in d["log_library"].items()}})

    def _vec(self, name: str, like: Tensor) -> Tensor:
        return torch.tensor(getattr(self, name), dtype=like.dtype, device=like.device)

    def transform(self, logx: Tensor) -> Tensor:
        """Log-normalized (B, G), genes in ``var_names`` order -> model space (genes in ``order``)."""
        z = (logx - self._vec("center", logx)) / self._vec("scale", logx)
        return z[..., torch.tensor(self.order, device=z.device)] if self.order else z

    def inverse(self, z: Tensor) -> Tensor:
        """Model space (B, G) -> log-normalized in [0, max observed], with exact zeros, in ``var_names`` order."""
        if self.order:
            z = z[..., torch.argsort(torch.tensor(self.order, device=z.device))]
        x = torch.minimum(z * self._vec("scale", z) + self._vec("center", z), self._vec("x_max", z))
        return torch.where(x < self.zero_threshold, torch.zeros_like(x), x)

    def bounds(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """Per-gene valid range of the model space, for clipping x0 predictions while sampling."""
        like = torch.empty(0, device=device)
        lo = self.transform(torch.zeros(self.n_genes, device=device))
        return lo, self.transform(self._vec("x_max", like))

    def label_index(self, cell_type: str) -> int:
        if cell_type not in self.categories:
            raise ValueError(f"unknown cell type {cell_type!r}; the model knows {self.categories}")
        return self.categories.index(cell_type)


def cluster_gene_order(logx, max_cells: int = ORDER_CELLS) -> list[int]:
    """Genes ordered so that correlated ones sit side by side, hence in the same patch (token).

    ``logx``: log-normalized cells x genes, CSR or any row-sliceable matrix (``BackedRows``).
    Average-linkage clustering on 1 - Pearson r over at most ``max_cells`` cells read in evenly
    spaced blocks, leaves in (optimal, up to ``OPTIMAL_LEAF_GENES`` genes) dendrogram order.
    Genes that never vary correlate with nothing (r = 0). Deterministic.
    """
    from scipy.cluster.hierarchy import leaves_list, linkage

    n, g = logx.shape
    if g < 3:
        return list(range(g))
    block = min(n, ORDER_BLOCK)
    starts = np.unique(np.linspace(0, n - block, max(1, min(n, max_cells) // block)).astype(np.int64))
    cells, total, cross = 0, np.zeros(g), np.zeros((g, g))  # one block dense at a time: O(g^2 + block g) memory
    for s in starts:
        X = logx[s : s + block]
        X = X.toarray() if sp.issparse(X) else np.asarray(X)
        X = X.astype(np.float64)
        cells, total, cross = cells + len(X), total + X.sum(axis=0), cross + X.T @ X
    mean = total / cells
    cov = cross / cells - np.outer(mean, mean)
    sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.nan_to_num(cov / np.outer(sd, sd), nan=0.0, posinf=0.0, neginf=0.0)
    dist = np.clip(1.0 - r[np.triu_indices(g, 1)], 0.0, 2.0)
    return leaves_list(linkage(dist, "average", optimal_ordering=g <= OPTIMAL_LEAF_GENES)).tolist()


def scaling_parameters(
    scaling: str, x_max: np.ndarray, moments: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene (center, scale) from the log-normalized max and, for "standard", (mean, mean square)."""
    if scaling == "minmax":
        half = np.maximum(x_max, 1e-3) / 2  # a gene never expressed keeps a finite scale
        return half, half
    mean, sq = moments
    return mean, np.sqrt(np.maximum(sq - mean**2, 1e-6))


def encode_labels(adata: ad.AnnData, label_key: str | None) -> tuple[np.ndarray | None, list[str]]:
    """Integer codes and category names of ``obs[label_key]`` (None, [] without a key)."""
    if label_key is None:
        return None, []
    if label_key not in adata.obs:
        raise KeyError(f"label key {label_key!r} not in obs; available columns: {list(adata.obs.columns)}")
    col = adata.obs[label_key]
    if col.isna().any():
        raise ValueError(f"obs[{label_key!r}] has {int(col.isna().sum())} missing labels")
    cat = col.astype(str).astype("category")
    return cat.cat.codes.to_numpy().astype(np.int64), [str(c) for c in cat.cat.categories]


def highly_variable(logx: sp.csr_matrix, n_top_genes: int) -> np.ndarray:
    """Indices (sorted) of the ``n_top_genes`` highly variable genes (scanpy, Seurat flavour)."""
    import scanpy as sc

    tmp = ad.AnnData(logx)
    sc.pp.highly_variable_genes(tmp, n_top_genes=n_top_genes, flavor="seurat")
    return top_genes(tmp.var["dispersions_norm"].to_numpy(), tmp.var["dispersions"].to_numpy(), n_top_genes)


def top_genes(dispersions_norm: np.ndarray, dispersions: np.ndarray, n_top_genes: int) -> np.ndarray:
    """Indices (sorted) of the ``n_top_genes`` genes with the highest normalized dispersion.

    scanpy keeps every gene tied with the n-th (e.g. genes alone in their mean bin all get
    dispersion_norm 1), so it can return more than asked: rank and cut at exactly n,
    ties broken by raw dispersion, then gene order. NaN ranks last.
    """
    norm = np.nan_to_num(np.asarray(dispersions_norm, np.float64), nan=-np.inf)
    raw = np.nan_to_num(np.asarray(dispersions, np.float64), nan=-np.inf)
    order = np.lexsort((np.arange(len(norm)), -raw, -norm))
    return np.sort(order[:n_top_genes])


CHUNK_CELLS = 2048  # consecutive cells read together: one contiguous block of a file
WINDOW_CHUNKS = 16  # chunks shuffled together: at most 32768 cells held at once


def epoch_windows(
    n_obs: int, seed: int, epoch: int, chunk_cells: int = CHUNK_CELLS, window_chunks: int = WINDOW_CHUNKS
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch's cell order as windows, a pure function of (n_obs, seed, epoch, chunk sizes).

    The cells are cut into chunks of ``chunk_cells`` consecutive cells; the chunks are put in
    random order and taken ``window_chunks`` at a time. Yields, per window, the chunk ids in
    reading order and a permutation of the window's cells (positions in the concatenation
    of those chunks): the order in which they are trained on.
    """
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    chunks = torch.randperm(-(-n_obs // chunk_cells), generator=g).numpy()
    for w in range(0, len(chunks), window_chunks):
        ids = chunks[w : w + window_chunks]
        size = sum(min(chunk_cells, n_obs - c * chunk_cells) for c in ids)
        yield ids, torch.randperm(size, generator=g).numpy()


class CellBatches:
    """Shuffled mini-batches of model-space tensors, densifying one sparse batch at a time.

    ``logx`` is the log-normalized cells x kept genes matrix: a CSR matrix in memory, or any
    object with ``.shape`` whose row slices ``logx[a:b]`` are CSR (``wbdit.streaming.BackedRows``
    reads them from an ``.h5ad`` file). Both are read in the order of ``epoch_windows``, so an
    in-memory and a backed run see identical batches, and only one window of cells (plus one
    batch) is held at a time.
    """

    def __init__(
        self, logx, labels: np.ndarray | None, pre: Preprocessor, batch_size: int,
        chunk_cells: int = CHUNK_CELLS, window_chunks: int = WINDOW_CHUNKS,
    ):
        if logx.shape[0] == 0:
            raise ValueError("no cells to train on")
        self.logx, self.labels, self.pre = logx, labels, pre
        self.batch_size = min(batch_size, logx.shape[0])
        self.chunk_cells, self.window_chunks = chunk_cells, window_chunks

    def __len__(self) -> int:
        return self.logx.shape[0] // self.batch_size  # drop the ragged last batch: stable batch shapes

    def epoch(
        self, seed: int, epoch: int, device: torch.device | str, start: int = 0, rows: slice = slice(None)
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Batches of one epoch in an order fixed by (seed, epoch), so a resumed run repeats it.

        ``start`` skips the epoch's first batches without reading them (resuming mid-epoch);
        ``rows`` keeps those rows of each batch (a distributed rank's share of the global batch).
        Yields x (rows, n_genes) float32 in model space and labels (rows,) int64 or None.
        """
        n, size, skip, c = self.logx.shape[0], self.batch_size, start * self.batch_size, self.chunk_cells
        ids, part = np.empty(0, np.int64), None  # the cells of a batch begun in the previous window
        end, b = 0, start
        for chunks, perm in epoch_windows(n, seed, epoch, c, self.window_chunks):
            begin, end = end, end + len(perm)
            if end <= skip:
                continue  # every cell of this window belongs to a batch already trained on
            if b >= len(self):
                break
            with nvtx_range("data_load"):
                window = sp.vstack([self.logx[k * c : min((k + 1) * c, n)] for k in chunks], format="csr")
                cells = np.concatenate([np.arange(k * c, min((k + 1) * c, n)) for k in chunks])
            perm = perm[max(skip - begin, 0):]
            while b < len(self) and len(perm):
                take, perm = perm[: size - len(ids)], perm[size - len(ids):]
                ids = np.concatenate([ids, cells[take]])
                part = window[take] if part is None else sp.vstack([part, window[take]], format="csr")
                if len(ids) == size:
                    with nvtx_range("data_load"):  # closed before the yield: the range covers loading only
                        x = torch.from_numpy(part[rows].toarray()).to(device)
                        y = None if self.labels is None else torch.from_numpy(self.labels[ids[rows]]).to(device)
                        batch = self.pre.transform(x), y
                    yield batch
                    ids, part, b = ids[:0], None, b + 1


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike) -> None:
    """Write ``adata`` atomically: a failed write leaves no partial file."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
