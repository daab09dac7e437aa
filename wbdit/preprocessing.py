"""The field's preprocessing, one pipeline for cells in memory and cells streamed from a file.

counts (or TPM-like values) -> normalize_total(1e4) + log1p -> optional highly-variable genes (Seurat rule) ->
per-gene scaling into the space the diffusion runs in -> optional gene order (correlated
genes in one patch). Every choice is stored in ``Preprocessor`` and saved with the checkpoint;
``Preprocessor.inverse`` maps model samples back to log-normalized values on the training genes.

``Preprocessor.fit`` reads the matrix in row chunks (``wbdit.data.matrix_rows``) and
accumulates per gene the max, smallest non-zero value, sums and sums of squares of the
log-normalized values (and of ``expm1`` of them, for highly variable genes), and per cell
type the log library sizes. Cells in memory are one chunk; a backed AnnData is read
``chunk_cells`` rows at a time, so memory is O(genes) plus one chunk whatever the number of
cells, and both give the same preprocessor. Highly variable genes follow scanpy's
``highly_variable_genes(flavor="seurat")`` on these streamed moments (``seurat_dispersions``),
with an exact cut at n (``top_genes``).

What the input holds is told from its values (``kind_of_values``; ``INPUT_KINDS`` says what is
done with each): integers are raw counts; non-integer values up to ``LOG_MAX`` are log1p-
normalized and used as they are; non-integer values above are un-logged (TPM, CPM, RSEM
expected counts) and are normalized and logged like counts, but have no count library.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from wbdit.batches import CHUNK_CELLS
from wbdit.data import H5Matrix, MatrixRows, ad, matrix_rows, sp
from wbdit.errors import InputError, MissingKeyError
from wbdit.extras import require

pd = require("pandas", "preprocessing")
hierarchy = require("scipy.cluster.hierarchy", "ordering genes by correlation")

TARGET_SUM = 1e4
SCALINGS = ("minmax", "standard")
GENE_ORDERS = ("cluster", "input")  # model-space gene order: correlated genes adjacent, or as given
ORDER_CELLS, ORDER_BLOCK = 20000, 1000  # the clustering reads at most this many cells, in evenly spaced blocks
OPTIMAL_LEAF_GENES = 1000  # optimal leaf ordering is cubic in genes: above this, plain dendrogram order
CLUSTER_MAX_GENES = 8000  # the clustering holds g x g float64 (0.5 GiB at 8000): above, genes keep their order
HVG_BINS = 20
# log1p(normalize_total(x, s)) <= log1p(s): 9.2 for the usual s = 1e4, 13.8 for s = 1e6 (log CPM);
# no normalization reaches 20 (s = 4.9e8). Un-logged TPM/CPM lie far above: in a cell whose
# values sum to T over G genes the largest is at least T / G (50 for T = 1e6, G = 20,000).
LOG_MAX = 20.0
INPUT_KINDS = {  # what each kind of input gets
    "counts": "raw counts (integers): normalize_total(1e4) + log1p",
    "log-normalized": f"log1p-normalized values (non-integer, at most {LOG_MAX:g}): used as they are",
    "tpm-like": f"non-integer values above {LOG_MAX:g}, not logged (TPM, CPM, RSEM expected counts): "
    "normalize_total(1e4) + log1p, no count library (no --counts output)",
}


def _values(X) -> np.ndarray:
    """The stored (non-implicit-zero) values of a dense or sparse matrix."""
    return X.data if sp.issparse(X) else np.asarray(X).ravel()


def kind_of_values(integer: bool, max_value: float) -> str:
    """The kind (a key of ``INPUT_KINDS``) of values that are all integers or not, with this maximum."""
    if integer:
        return "counts"
    return "log-normalized" if max_value <= LOG_MAX else "tpm-like"


def validate_expression(X, what: str = ".X") -> str:
    """Check for NaN/inf/negatives and say which of ``INPUT_KINDS`` X holds (``kind_of_values``)."""
    return kind_of_values(*_check_values(X, what))


def _check_values(X, what: str) -> tuple[bool, float]:
    """Raise on no cells, no genes, NaN/inf or negative values; else (all values integer, max value)."""
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
    return bool(np.array_equal(v, np.round(v))), float(v.max()) if v.size else 0.0


def log_normalize(X, kind: str) -> tuple[sp.csr_matrix, np.ndarray]:
    """log1p(normalize_total(1e4)) as float32 CSR, and the row sums before it (log-normalized input: NaN)."""
    if kind not in INPUT_KINDS:
        raise ValueError(f"unknown input kind {kind!r}; choose from {tuple(INPUT_KINDS)}")
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

    Labels: the model is conditioned on the obs columns ``label_keys`` (none: unconditional),
    the first one primary (cell type: per-type library sizes, ``categories``, ``class_counts``).
    Column k's value ``label_categories[k][code]`` is class ``code`` of the model's table k;
    ``label_combinations`` lists every combination of codes seen in training (one code per
    column, sorted) with its number of cells in ``combination_counts``.
    """

    var_names: list[str]
    input_kind: str
    scaling: str = "minmax"
    layer: str | None = None
    n_top_genes: int | None = None
    label_keys: list[str] = field(default_factory=list)
    label_categories: list[list[str]] = field(default_factory=list)
    label_combinations: list[list[int]] = field(default_factory=list)
    combination_counts: list[int] = field(default_factory=list)
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
        label_key: str | Sequence[str] | None = None,
        layer: str | None = None,
        n_top_genes: int | None = None,
        scaling: str = "minmax",
        gene_order: str = "input",
        chunk_cells: int = CHUNK_CELLS,
        input_kind: str | None = None,
    ) -> tuple["Preprocessor", "sp.csr_matrix | LogRows", np.ndarray | None]:
        """Fit on ``adata``; return the preprocessor, its log-normalized cells x kept genes and the labels.

        The cells come back as float32 CSR for an AnnData in memory, as ``LogRows`` (read on
        demand) for one opened with ``backed=True``. ``label_key`` names one obs column or
        several; labels are (n_cells,) int64 for one, (n_cells, K) for K columns, or None.
        ``gene_order="cluster"`` sets ``order`` (``cluster_gene_order``) up to
        ``CLUSTER_MAX_GENES`` genes, and warns and keeps the file's order above.
        ``input_kind`` (a key of ``INPUT_KINDS``) overrides the kind read from the values; values
        that kind cannot hold (non-integer counts, log values above ``LOG_MAX``) are refused.
        """
        if scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {scaling!r}; choose from {SCALINGS}")
        if gene_order not in GENE_ORDERS:
            raise ValueError(f"unknown gene_order {gene_order!r}; choose from {GENE_ORDERS}")
        if input_kind is not None and input_kind not in INPUT_KINDS:
            raise ValueError(f"unknown input_kind {input_kind!r}; choose from {tuple(INPUT_KINDS)}")
        if not adata.var_names.is_unique:  # genes are matched by name when sampling and evaluating
            repeated = adata.var_names[adata.var_names.duplicated()].unique()
            raise InputError(
                f"var_names has {len(repeated)} repeated gene names (e.g. {list(repeated[:3])}); make "
                "them unique first (adata.var_names_make_unique())"
            )
        what = f".layers[{layer!r}]" if layer else ".X"
        matrix = matrix_rows(adata, layer)
        n, g = matrix.shape
        if n == 0:
            validate_expression(sp.csr_matrix((0, g)), what)  # raises "has zero cells"
        chunk = chunk_cells if adata.isbacked else n  # in memory: the whole matrix is one chunk
        keys = as_label_keys(label_key)
        encoded = [encode_labels(adata, key) for key in keys]
        codes = np.stack([c for c, _ in encoded], axis=1) if keys else np.zeros((n, 0), np.int64)  # (n, K)
        combos, combo_counts = np.unique(codes, axis=0, return_counts=True) if keys else (codes[:0], np.zeros(0))
        categories = encoded[0][1] if keys else []
        groups = codes[:, 0] if keys else np.zeros(n, np.int64)
        n_groups = max(len(categories), 1)
        hvg = n_top_genes is not None and n_top_genes < g
        # The pass reads the values as counts until one shows a later kind (a non-integer value, one
        # above LOG_MAX), then starts again reading them so (re-reading only chunks already seen).
        kind = input_kind or "counts"
        stats = _moments(matrix, kind, groups, n_groups, hvg, chunk, what, forced=input_kind is not None)
        while isinstance(stats, str):
            kind = stats
            stats = _moments(matrix, kind, groups, n_groups, hvg, chunk, what)
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
        pre = cls(
            var_names=[str(x) for x in genes],
            input_kind=kind,
            scaling=scaling,
            layer=layer,
            n_top_genes=n_top_genes,
            label_keys=keys,
            label_categories=[c for _, c in encoded],
            label_combinations=combos.tolist(),
            combination_counts=combo_counts.tolist(),
            center=np.asarray(center).tolist(),
            scale=np.asarray(scale).tolist(),
            x_max=m.x_max[keep].tolist(),
            zero_threshold=0.5 * float(min_pos) if np.isfinite(min_pos) else 0.0,
            log_library=log_library,
        )
        rows = LogRows(matrix, kind, None if len(keep) == g else keep)
        logx = rows if adata.isbacked else rows[0:n]
        if gene_order == "cluster" and pre.n_genes > CLUSTER_MAX_GENES:
            warnings.warn(
                f"{pre.n_genes} genes: too many to cluster (limit {CLUSTER_MAX_GENES}); genes keep the "
                "file's order. Select genes (n_top_genes / --n-top-genes 2000) to get the cluster order.",
                stacklevel=2,
            )
        elif gene_order == "cluster":
            pre.order = cluster_gene_order(logx)
        return pre, logx, (None if not keys else codes[:, 0] if len(keys) == 1 else codes)

    @property
    def n_genes(self) -> int:
        return len(self.var_names)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessor":
        """Inverse of ``to_dict``; also reads the one-label layout of earlier runs (``label_key``,
        ``categories``, ``class_counts``)."""
        d = {**d, "log_library": {k: tuple(v) for k, v in d["log_library"].items()}}
        if "label_key" in d:
            key, categories, counts = d.pop("label_key"), d.pop("categories"), d.pop("class_counts")
            d.update(
                label_keys=[key] if key else [],
                label_categories=[categories] if key else [],
                label_combinations=[[k] for k in range(len(counts))],
                combination_counts=counts,
            )
        return cls(**d)

    @property
    def label_key(self) -> str | None:
        """The primary label column (None: unconditional)."""
        return self.label_keys[0] if self.label_keys else None

    @property
    def categories(self) -> list[str]:
        """The primary label column's values, by class index."""
        return self.label_categories[0] if self.label_keys else []

    @property
    def class_counts(self) -> list[int]:
        """Training cells per value of the primary label column."""
        if not self.label_keys:
            return []
        combos = np.asarray(self.label_combinations, np.int64).reshape(-1, len(self.label_keys))
        return (
            np.bincount(combos[:, 0], weights=self.combination_counts, minlength=len(self.categories))
            .astype(np.int64)
            .tolist()
        )

    @property
    def num_classes(self) -> int | list[int] | None:
        """The model's ``num_classes`` for these labels: an int for one column, a list for several."""
        sizes = [len(c) for c in self.label_categories]
        return None if not sizes else sizes[0] if len(sizes) == 1 else sizes

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

    def label_index(self, value: str, key: str | None = None) -> int:
        """Class index of ``value`` in label column ``key`` (default: the primary one)."""
        key = self.label_key if key is None else key
        if key not in self.label_keys:
            raise MissingKeyError(
                f"the run was not trained on label column {key!r}; its label columns: {self.label_keys}"
            )
        categories = self.label_categories[self.label_keys.index(key)]
        if value not in categories:
            what = "cell type" if len(self.label_keys) == 1 else f"value of label column {key!r}"
            raise InputError(f"unknown {what} {value!r}; the model knows {categories}")
        return categories.index(value)

    def encode(self, obs: pd.DataFrame, what: str = "obs") -> np.ndarray:
        """Class indices (n, K) of the values in ``obs``'s label columns, the run's categories.

        Raises, naming the column (and value), for a label column missing from ``obs``, a
        missing (NaN) label, or a value the run was not trained on.
        """
        missing = [k for k in self.label_keys if k not in obs.columns]
        if missing:
            raise MissingKeyError(
                f"{what} has no column {missing[0]!r}; the run is conditioned on "
                f"{self.label_keys}, and {what} has {list(obs.columns)}"
            )
        codes = np.empty((len(obs), len(self.label_keys)), np.int64)
        for k, (key, categories) in enumerate(zip(self.label_keys, self.label_categories)):
            col = obs[key]
            if col.isna().any():
                raise InputError(f"{what}[{key!r}] has {int(col.isna().sum())} missing (NaN) labels")
            values = col.astype(str).to_numpy()
            codes[:, k] = pd.Categorical(values, categories=categories).codes
            unknown = sorted(set(values[codes[:, k] < 0]))
            if unknown:
                raise InputError(
                    f"{what}[{key!r}] has values the run was not trained on: {unknown[:5]}"
                    f"{' ...' if len(unknown) > 5 else ''}; the model knows {categories}"
                )
        return codes


def cluster_gene_order(logx, max_cells: int = ORDER_CELLS) -> list[int]:
    """Genes ordered so that correlated ones sit side by side, hence in the same patch (token).

    ``logx``: log-normalized cells x genes, CSR or any row-sliceable matrix (``LogRows``).
    Average-linkage clustering on 1 - Pearson r over at most ``max_cells`` cells read in evenly
    spaced blocks, leaves in (optimal, up to ``OPTIMAL_LEAF_GENES`` genes) dendrogram order.
    Genes that never vary correlate with nothing (r = 0). Deterministic.
    """
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
    return hierarchy.leaves_list(hierarchy.linkage(dist, "average", optimal_ordering=g <= OPTIMAL_LEAF_GENES)).tolist()


def scaling_parameters(
    scaling: str, x_max: np.ndarray, moments: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene (center, scale) from the log-normalized max and, for "standard", (mean, mean square)."""
    if scaling == "minmax":
        half = np.maximum(x_max, 1e-3) / 2  # a gene never expressed keeps a finite scale
        return half, half
    mean, sq = moments
    return mean, np.sqrt(np.maximum(sq - mean**2, 1e-6))


def as_label_keys(label_key: str | Sequence[str] | None) -> list[str]:
    """Label columns as a list: one name, several names, or none."""
    keys = [label_key] if isinstance(label_key, str) else list(label_key or [])
    if not all(isinstance(k, str) for k in keys):
        raise InputError(f"label keys must be obs column names, got {label_key!r}")
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise InputError(f"label key {repeated[0]!r} given more than once")
    return keys


def label_candidates(obs: pd.DataFrame) -> dict[str, int]:
    """obs columns that look like cell-type labels, with their number of distinct values.

    Categorical or text columns with 2 to min(500, cells / 2) values, named like a cell-type
    annotation (cell type, label, annotation, cluster, leiden, louvain) first.
    """
    named = re.compile(r"type|label|annot|cluster|leiden|louvain", re.IGNORECASE)
    found = {}
    for name in obs.columns:
        col = obs[name]
        if isinstance(col.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(col):
            n = col.nunique(dropna=True)
            if 2 <= n <= min(500, len(obs) // 2):
                found[str(name)] = int(n)
    return dict(sorted(found.items(), key=lambda kv: named.search(kv[0]) is None))


def encode_labels(adata: ad.AnnData, label_key: str | None) -> tuple[np.ndarray | None, list[str]]:
    """Integer codes and category names of ``obs[label_key]`` (None, [] without a key).

    Text, categorical, integer and boolean columns are labels; missing (NaN) or empty labels
    and non-integer numbers (a measurement such as ``n_counts``, not a label) are refused.
    """
    if label_key is None:
        return None, []
    if label_key not in adata.obs:
        raise MissingKeyError(f"label key {label_key!r} not in obs; available columns: {list(adata.obs.columns)}")
    col = adata.obs[label_key]
    if col.isna().any():
        raise ValueError(f"obs[{label_key!r}] has {int(col.isna().sum())} missing labels")
    fractional = col[col != np.round(col)] if pd.api.types.is_float_dtype(col.dtype) else col[:0]
    if len(fractional):
        raise InputError(
            f"obs[{label_key!r}] holds non-integer numbers (e.g. {fractional.iloc[0]:g}), not labels; "
            "pass a column of cell types or other categories"
        )
    text = col.astype(str)
    empty = int((text.str.strip() == "").sum())
    if empty:
        raise InputError(f"obs[{label_key!r}] has {empty} empty labels; give those cells a label or drop them")
    cat = text.astype("category")
    return cat.cat.codes.to_numpy().astype(np.int64), [str(c) for c in cat.cat.categories]


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


class LogRows:
    """Log-normalized cells x kept genes of a row-block reader, read on demand.

    ``rows[a:b]`` reads rows a..b-1 (``wbdit.data.H5Matrix`` or ``MatrixRows``), applies
    ``log_normalize`` and keeps the genes ``keep`` (None: all): float32 CSR (b - a, kept genes).
    """

    def __init__(self, matrix, kind: str, keep: np.ndarray | None):
        self.matrix, self.kind, self.keep = matrix, kind, keep
        self.shape = (matrix.shape[0], matrix.shape[1] if keep is None else len(keep))

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


def _moments(
    matrix: MatrixRows | H5Matrix,
    kind: str,
    groups: np.ndarray,
    n_groups: int,
    hvg: bool,
    chunk_cells: int,
    what: str,
    forced: bool = False,
) -> tuple[GeneMoments, np.ndarray] | str:
    """One pass reading the values as ``kind``: gene moments of the log-normalized cells and, for
    counts, per-group log library sums (3, n_groups).

    Kinds come in the order of ``INPUT_KINDS``, and the kind of the cells read so far can only
    move forward: when it passes ``kind``, returns it (read the input again as that). With
    ``forced`` (the user named the kind) values that kind cannot hold raise instead. Raises on
    invalid values and on cells with zero total (all of them counted).
    """
    n, g = matrix.shape
    moments, log_lib, zero_lib = GeneMoments(g, hvg), np.zeros((3, n_groups)), 0
    integer, top, order = True, 0.0, list(INPUT_KINDS)
    for start in range(0, n, chunk_cells):
        X = matrix[start : start + chunk_cells]
        chunk_integer, chunk_max = _check_values(X, what)
        integer, top = integer and chunk_integer, max(top, chunk_max)
        if forced:
            _check_forced(kind, integer, top, what)
        elif order.index(kind_of_values(integer, top)) > order.index(kind):
            return kind_of_values(integer, top)
        if kind == "log-normalized":
            moments.add(X)
            continue
        lib = np.asarray(X.sum(axis=1)).ravel()
        zero_lib += int((lib == 0).sum())
        if zero_lib:
            continue  # an error unless a later chunk shows the input is log-normalized
        logx, lib = log_normalize(X, kind)
        moments.add(logx)
        if kind != "counts":
            continue  # TPM-like sums are no library sizes
        ll = np.log(lib).astype(np.float64)
        for row, w in enumerate((np.ones_like(ll), ll, ll * ll)):
            log_lib[row] += np.bincount(groups[start : start + chunk_cells], weights=w, minlength=n_groups)
    if zero_lib:
        raise ValueError(f"{zero_lib} cells have zero total counts; filter them out first")
    return moments, log_lib


def _check_forced(kind: str, integer: bool, top: float, what: str) -> None:
    """Refuse values that the input kind the user named cannot hold."""
    if kind == "counts" and not integer:
        raise InputError(
            f"{what}: input kind 'counts' was given but it holds non-integer values; for "
            "un-logged non-integer values (TPM, CPM, expected counts) give 'tpm-like'"
        )
    if kind == "log-normalized" and top > LOG_MAX:
        raise InputError(
            f"{what}: input kind 'log-normalized' was given but it holds values up to {top:.6g}, "
            f"above any log1p-normalized value ({LOG_MAX:g}); give 'tpm-like' or 'counts'"
        )
