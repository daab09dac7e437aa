"""The evaluator: how close generated cells are to real ones, in numbers and pictures.

One protocol for every model (DESIGN.md, "Evaluation protocol"):

1. Gene space. Both AnnData objects are put in log-normalized space: ``.X`` holding raw
   counts (non-negative integers, detected) gets normalize_total(1e4) + log1p on all its
   genes (``wbdit.preprocessing.log_normalize``); ``.X`` already log-normalized is used as
   is. The generated genes must equal the real genes or be a subset of them. Above
   ``MAX_GENES`` genes the evaluation keeps the ``MAX_GENES`` most highly variable ones
   (Seurat rule, as scanpy's ``highly_variable_genes(flavor="seurat")`` and as training's
   ``--n-top-genes``), unless ``all_genes``; ``settings["genes"]`` names them.
2. Cell space: a PCA with ``n_pcs`` components (see "Which cells fit the space").
3. Metrics (``METRICS`` gives each one's space and formula), overall and per cell type:
   distances and classifiers in PCA space, per-gene statistics, marker genes
   (``wbdit.markers``), gene-gene correlation structure, label accuracy and, with training
   cells, downstream utility (``wbdit.utility``).
4. Reference points, so no number is read alone: the same metrics for one half of the real
   cells against the other half (the floor a perfect generator reaches) and for trivial
   generators (``wbdit.baselines``: per-gene Gaussian and per-gene resampling).

Which cells fit the space. A PCA fit on n cells of p genes with p ~ n (700 x 765 for PBMC)
fits those cells' own noise in its trailing components: cells that shaped the PCA have
3-4x the variance of unseen cells of the same distribution along PCs 10-30. Fit on the real
cells alone and compared with unseen generated cells, two halves of PBMC68k scored kNN AUC
0.71 and random-forest AUC 0.96 against each other (0.75 on a 10x sample of 559 cells x
32,786 genes, issue 15). So the space is never fit on the compared real cells alone:

- ``space="reference"`` (the default when ``reference`` is given, e.g. the training cells
  with ``real`` held out): genes and PCA are fit on the reference; real and generated
  cells are both unseen. One space for every column.
- ``space="joint"`` (the default without a reference): the highly variable genes are
  ranked on real + generated cells together, and each comparison fits its PCA on both of
  its sides, so each side shaped it equally: real + generated (the floor's two real halves
  are compared in this same PCA, where both shaped it too), real + each baseline.

Chosen by measuring (benchmarks/QUALITY.md, "Evaluation protocol"; 8 random half splits of
PBMC68k, kNN / RF AUC): real vs real 0.48 / 0.49 joint, 0.47 / 0.50 with the PCA fit on a
held-out half of the real cells (the other unbiased choice, i.e. ``reference`` = that half);
cells with each type's spread shrunk to 0.8x, the mode collapse seen in our models, 0.73 /
0.87 joint but 0.57 / 0.67 held-out, which also compares only half of the real cells. On a
20,000-gene simulation, the same: 0.47 / 0.49 vs 0.48 / 0.50 under the null, 0.82 / 0.94 vs
0.55 / 0.59 at 0.8x. Ranking the genes on the real cells alone would tilt the gene statistics:
on the simulation the unseen side then had 0.91x the real variance on the selected genes
(0.99x when ranked on both sides).

``evaluate`` returns an ``EvalReport``; ``write_report`` writes ``metrics.json``,
``table.txt`` and PNG pictures; ``cli_evaluate`` backs ``wbdit evaluate``;
``during_training`` is the trainer's periodic evaluation; ``plot_training_curves`` backs
``wbdit report``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Callable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits

from wbdit import baselines as B
from wbdit import markers as K
from wbdit import metrics as M
from wbdit import plots
from wbdit.atomic import atomic_path
from wbdit.data import read_h5ad
from wbdit.errors import MissingKeyError
from wbdit.plots import plot_training_curves
from wbdit.preprocessing import GeneMoments, log_normalize, seurat_dispersions, top_genes, validate_expression
from wbdit.run import Run
from wbdit.sampling import sample
from wbdit.tables import format_value
from wbdit.utility import UTILITY_FEW, UTILITY_MIN_TEST, UTILITY_MIN_TRAIN, DownstreamUtility

MAX_CELLS_OT = 2000
MAX_GENES = 2000  # above this many genes, evaluate on this many highly variable ones
CORR_GENES = 100  # the gene-gene correlation structure uses this many top highly variable genes
MIN_GROUP_CELLS = 10  # below this many cells on a side, a cell type's distribution metrics are left empty
SPACES = ("auto", "joint", "reference")
# The evaluation runs every BLAS/OpenMP pool on one thread. Its problems are small (at most a
# few thousand cells per pairwise metric), where thread start-up and spin-waiting dominate; on
# a busy 2-core machine threads made one kNN search 50x slower (110 ms vs 2 ms), a t-SNE of
# 240 cells 18x slower (36 s vs 2 s), and a whole PBMC evaluation 10.5 s instead of 6.8 s.
EVAL_THREADS = 1
HEADLINE = (
    "knn_auc",
    "mmd",
    "w2",
    "spearman_mean",
    "spearman_var",
    "zero_frac_mad",
    "label_accuracy",
    "marker_recall",
    "gene_corr_mad",
    "utility_f1",
)

# metric -> (space, ideal value, definition). "floor" means: compare with the real-vs-real column.
METRICS: dict[str, tuple[str, str, str]] = {
    "mmd": ("PCA", "0", "unbiased MMD^2, RBF kernels summed over sigma in {0.01,0.1,1,10,100}"),
    "w1": ("PCA", "floor", "Wasserstein-1, exact EMD (POT), Euclidean cost"),
    "w2": ("PCA", "floor", "Wasserstein-2, exact EMD (POT), squared Euclidean cost, square-rooted"),
    "knn_auc": ("PCA", "0.5", "real-vs-generated 10-NN ROC-AUC, 5-fold held out, balanced classes"),
    "rf_auc": ("PCA", "0.5", "real-vs-generated random-forest ROC-AUC, 2-fold held out, balanced classes"),
    "pearson_mean": ("genes", "1", "Pearson r of per-gene means"),
    "spearman_mean": ("genes", "1", "Spearman rho of per-gene means"),
    "pearson_var": ("genes", "1", "Pearson r of per-gene variances"),
    "spearman_var": ("genes", "1", "Spearman rho of per-gene variances"),
    "zero_frac_mad": ("genes", "0", "mean over genes of |zero fraction real - generated|"),
    "cv_spearman": ("genes", "1", "Spearman rho of per-gene CV (std/mean), genes expressed on both sides"),
    "gene_corr_mad": (
        "genes",
        "floor",
        f"mean over pairs of the top {CORR_GENES} HVGs of |Pearson r real - r generated| (within each type per type)",
    ),
    "label_accuracy": ("PCA", "floor", "5-NN cell-type classifier fit on real cells: accuracy on generated labels"),
    "marker_recall": (
        "genes",
        "floor",
        f"fraction of the real top-{K.MARKER_TOP_K} Wilcoxon markers of a type "
        "(scanpy, type vs rest) also top in generated; mean over types",
    ),
    "marker_logfc_rho": (
        "genes",
        "floor",
        f"Spearman rho of log2 fold changes over the real top-{K.MARKER_TOP_K} markers; mean over types",
    ),
    "utility_f1": (
        "PCA",
        "floor",
        f"F1 on held-out real cells of a logistic-regression classifier trained on "
        f"the training cells with the type cut to {UTILITY_FEW} cells plus this "
        "column's cells of the type (floor: its real cells); mean over types",
    ),
    "utility_f1_cut": ("PCA", "-", "the same F1 with nothing added (one value, repeated in every column)"),
}
DISTRIBUTION = (
    "mmd",
    "w1",
    "w2",
    "knn_auc",
    "rf_auc",
    "pearson_mean",
    "spearman_mean",
    "pearson_var",
    "spearman_var",
    "zero_frac_mad",
    "cv_spearman",
)
PER_TYPE_COLUMNS = ("mmd", "w2", "knn_auc", "spearman_mean", "label_accuracy")
PER_TYPE_BIOLOGY = ("marker_recall", "marker_logfc_rho", "gene_corr_mad", "utility_f1", "utility_f1_cut")


@dataclass
class _Cells:
    """One side of a comparison: log-normalized cells on the evaluated genes, labels, PCA coordinates once projected."""

    logx: np.ndarray  # cells x evaluated genes, float32
    labels: np.ndarray | None  # str per cell, or None
    kind: str  # "counts" or "log-normalized": what .X held
    total_counts: np.ndarray | None  # raw library size per cell when .X held counts
    pcs: np.ndarray | None = None  # cells x n_pcs, float64, in the comparison's PCA

    def take(self, idx: np.ndarray) -> "_Cells":
        return _Cells(
            self.logx[idx],
            None if self.labels is None else self.labels[idx],
            self.kind,
            None if self.total_counts is None else self.total_counts[idx],
            None if self.pcs is None else self.pcs[idx],
        )

    def projected(self, pca: PCA) -> "_Cells":
        return replace(self, pcs=pca.transform(self.logx).astype(np.float64))


@dataclass
class _LogCells:
    """A side log-normalized on the evaluated genes, before gene selection (CSR float32, cells x genes)."""

    logx: sp.csr_matrix
    labels: np.ndarray | None
    kind: str
    total_counts: np.ndarray | None

    def dense(self, keep: np.ndarray) -> _Cells:
        return _Cells(self.logx[:, keep].toarray(), self.labels, self.kind, self.total_counts)


def _labels(adata: ad.AnnData, what: str, label_key: str | None) -> np.ndarray | None:
    if label_key is None:
        return None
    if label_key not in adata.obs.columns:
        raise MissingKeyError(
            f"label_key {label_key!r} is not a column of {what}.obs; available columns: {list(adata.obs.columns)}"
        )
    column = adata.obs[label_key]
    if column.isna().any():
        raise ValueError(f"{what}.obs[{label_key!r}] has {int(column.isna().sum())} missing labels")
    return column.astype(str).to_numpy()


def _log_cells(adata: ad.AnnData, what: str, genes: pd.Index, label_key: str | None) -> _LogCells:
    """Log-normalize ``adata`` (when it holds counts) on all its genes, then keep ``genes`` in that order."""
    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"{what} must be an AnnData, got {type(adata).__name__}")
    if adata.X is None:
        raise ValueError(f"{what} has no .X")
    labels = _labels(adata, what, label_key)
    kind = validate_expression(adata.X, what)
    try:
        logx, lib = log_normalize(adata.X, kind)
    except ValueError as exc:  # zero-count cells: say which side
        raise ValueError(f"{what}: {exc}") from exc
    logx = logx[:, adata.var_names.get_indexer(genes)]
    return _LogCells(sp.csr_matrix(logx), labels, kind, lib.astype(np.float64) if kind == "counts" else None)


def _evaluated_genes(real: ad.AnnData, generated: ad.AnnData, reference: ad.AnnData | None) -> pd.Index:
    """The generated genes, after checking that the real (and reference) cells have all of them."""
    sides = [("real", real), ("generated", generated)] + ([("reference", reference)] if reference is not None else [])
    for what, adata in sides:
        if not isinstance(adata, ad.AnnData):
            raise TypeError(f"{what} must be an AnnData, got {type(adata).__name__}")
        if adata.n_obs == 0:
            raise ValueError(f"{what} has zero cells")
        if adata.n_vars == 0:
            raise ValueError(f"{what} has zero genes")
        if not adata.var_names.is_unique:
            dup = adata.var_names[adata.var_names.duplicated()].unique()
            raise ValueError(f"{what} has {len(dup)} duplicated gene names, e.g. {list(dup[:5])}")
    genes = generated.var_names
    for what, adata in sides:
        missing = genes.difference(adata.var_names, sort=False)
        if len(missing):
            raise ValueError(
                f"{len(missing)} of the {len(genes)} generated genes are not in the {what} cells' var_names "
                f"(e.g. {list(missing[:10])}); the generated genes must equal the {what} genes or be a subset of them"
            )
    return genes


def _gene_dispersions(*sides: _LogCells) -> tuple[np.ndarray, np.ndarray]:
    """Seurat (dispersions, normalized dispersions) per gene over the cells of all ``sides`` together."""
    moments = GeneMoments(sides[0].logx.shape[1], hvg=True)
    for cells in sides:
        moments.add(cells.logx)
    return seurat_dispersions(*moments.mean_var_expm1())


def _half_split(cells: _Cells, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random halves of the cells, split within each cell type so both halves keep the composition."""
    groups = (
        [np.arange(len(cells.logx))]
        if cells.labels is None
        else [np.flatnonzero(cells.labels == t) for t in np.unique(cells.labels)]
    )
    first, second = [], []
    for idx in groups:
        idx = rng.permutation(idx)
        first.append(idx[: len(idx) // 2])
        second.append(idx[len(idx) // 2 :])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def _baseline(name: str, fit: _Cells, like: _Cells, rng: np.random.Generator) -> _Cells:
    """Baseline ``name`` fit on ``fit``: as many cells of each type as ``like`` (``wbdit.baselines.draw``)."""
    logx = B.draw(name, fit.logx, fit.labels, like.labels, len(like.logx), rng)
    return _Cells(logx, like.labels if fit.labels is not None else None, "log-normalized", None)


def _cap(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= n else x[rng.choice(len(x), n, replace=False)]


def _group_metrics(a: _Cells, b: _Cells, w_cells: int, max_cells: int, seed: int, rf: bool) -> dict:
    """The distribution metrics (``DISTRIBUTION``) for real side ``a`` against compared side ``b``.

    MMD and the classifiers use up to ``max_cells`` cells per side; W1/W2 use ``w_cells``
    per side (see ``_w_cells``) so the generated, floor and baseline values share one sample size.
    """
    out: dict = dict(n_real=len(a.logx), n_generated=len(b.logx))
    if min(len(a.logx), len(b.logx)) < MIN_GROUP_CELLS:
        return out | {k: None for k in DISTRIBUTION if rf or k != "rf_auc"}
    rng = np.random.default_rng(seed)
    pa, pb = _cap(a.pcs, max_cells, rng), _cap(b.pcs, max_cells, rng)
    wa, wb = _cap(a.pcs, w_cells, rng), _cap(b.pcs, w_cells, rng)
    out.update(
        mmd=M.mmd(pa, pb),
        w1=M.wasserstein(wa, wb, 1),
        w2=M.wasserstein(wa, wb, 2),
        knn_auc=M.classifier_auc(pa, pb, "knn", seed),
    )
    if rf:
        out["rf_auc"] = M.classifier_auc(pa, pb, "rf", seed)
    out.update(M.gene_metrics(a.logx, b.logx))
    return out


def _w_cells(real: _Cells, generated: _Cells, max_cells: int) -> dict:
    """Cells per side for W1/W2, overall (key None) and per cell type: min(max_cells, n_real // 2, n_generated).

    The empirical Wasserstein distance between two samples of one distribution shrinks
    slowly as the samples grow (about n^(-1/d) in d dimensions), so values are comparable
    only at equal sample sizes. The real-vs-real floor has half the real cells on each
    side; every comparison therefore uses at most n_real // 2 cells per side.
    """
    sizes = {None: min(max_cells, len(real.logx) // 2, len(generated.logx))}
    if real.labels is not None and generated.labels is not None:
        for t in set(real.labels) | set(generated.labels):
            sizes[t] = min(max_cells, int((real.labels == t).sum()) // 2, int((generated.labels == t).sum()))
    return sizes


def _matched(side: _Cells, like: _Cells, seed: int) -> _Cells:
    """A random subsample of ``side`` with as many cells of each type as ``like`` has (at most; overall without labels).

    Types ``like`` lacks are dropped: the compared side then has the floor's composition.
    """
    rng = np.random.default_rng(seed)
    if side.labels is None or like.labels is None:
        return side.take(np.sort(rng.choice(len(side.logx), min(len(side.logx), len(like.logx)), replace=False)))
    idx = [
        rng.choice(rows, min(len(rows), int((like.labels == t).sum())), replace=False)
        for t in np.unique(side.labels)
        for rows in [np.flatnonzero(side.labels == t)]
    ]
    return side.take(np.sort(np.concatenate(idx)))


def _biology(real_half: _Cells, real_markers: K.MarkerRanking | None, other: _Cells, corr_genes: np.ndarray) -> dict:
    """Marker agreement and gene-gene correlation structure of ``other`` against one half of the real cells.

    Every column (generated, floor, baselines) is scored against the same real half, with
    ``other`` cut to the other half's per-type counts (``_matched``), so that these
    sample-size-sensitive numbers read directly against the floor (the other real half).
    Correlations use the ``corr_genes`` columns; per type, the type's cells on both sides.
    Returns ``{"overall": {...}, "per_type": {...}}``.
    """
    a, b = real_half, other
    overall = dict(gene_corr_mad=M.correlation_distance(a.logx[:, corr_genes], b.logx[:, corr_genes]))
    per_type: dict = {}
    if a.labels is not None and b.labels is not None:
        agreement = K.marker_agreement(real_markers, K.rank_markers(b.logx, b.labels, MIN_GROUP_CELLS))
        for t in sorted(set(a.labels) | set(b.labels)):
            xa, xb = a.logx[a.labels == t][:, corr_genes], b.logx[b.labels == t][:, corr_genes]
            enough = min(len(xa), len(xb)) >= MIN_GROUP_CELLS
            per_type[t] = dict(
                gene_corr_mad=M.correlation_distance(xa, xb) if enough else None,
                **agreement.get(t, dict(marker_recall=None, marker_logfc_rho=None)),
            )
        for key in ("marker_recall", "marker_logfc_rho"):
            overall[key] = K.mean_over_types(agreement, key)
    return dict(overall=overall, per_type=per_type)


@dataclass
class _Protocol:
    """What every comparison of one evaluation shares: the space, sample sizes, genes, seed, the real halves."""

    n_pcs: int
    seed: int
    max_cells: int
    w_cells: dict
    corr_genes: np.ndarray  # column indices into the evaluated genes
    pca: PCA | None  # the reference PCA; None: each comparison fits its own on both sides
    half_a: _Cells  # the real half every column's biology metrics are scored against
    half_b: _Cells  # the other half: the floor's compared side, and the per-type counts the others are cut to
    half_a_markers: K.MarkerRanking | None

    def space(self, a: _Cells, b: _Cells) -> PCA:
        """The PCA a comparison of ``a`` with ``b`` is made in."""
        return self.pca if self.pca is not None else _fit_pca(np.vstack([a.logx, b.logx]), self.n_pcs, self.seed)


def _fit_pca(x: np.ndarray, n_pcs: int, seed: int) -> PCA:
    return PCA(n_components=min(n_pcs, len(x) - 1, x.shape[1]), random_state=seed).fit(x)


def _compare(a: _Cells, b: _Cells, protocol: _Protocol, pca: PCA | None = None, floor: bool = False) -> dict:
    """All metrics but utility for real side ``a`` against ``b``: ``{"overall": {...}, "per_type": {type: {...}}}``.

    ``a`` and ``b`` are projected into ``pca`` (default ``protocol.space(a, b)``). The
    random-forest AUC is computed overall only (it costs ~0.7 s per comparison). Label
    accuracy: a classifier fit on ``a``'s cells and labels labels ``b``'s cells; per type it
    is the fraction of ``b``'s cells of that type given that type (0 for a type ``a`` lacks:
    the classifier cannot name it). Markers and correlation structure: ``_biology``, with
    ``b`` itself when it is the floor's half, else ``b`` cut to the floor's counts.
    """
    pca = pca if pca is not None else protocol.space(a, b)
    a, b = a.projected(pca), b.projected(pca)
    p = protocol
    overall = _group_metrics(a, b, p.w_cells[None], p.max_cells, p.seed, rf=True)
    per_type: dict = {}
    if a.labels is not None and b.labels is not None:
        correct = M.label_transfer(a.pcs, a.labels, b.pcs) == b.labels
        overall["label_accuracy"] = float(correct.mean())
        for t in sorted(set(a.labels) | set(b.labels)):
            ia, ib = np.flatnonzero(a.labels == t), np.flatnonzero(b.labels == t)
            group = _group_metrics(a.take(ia), b.take(ib), p.w_cells.get(t, 0), p.max_cells, p.seed, rf=False)
            group["label_accuracy"] = float(correct[ib].mean()) if len(ib) else None
            per_type[t] = group
    other = b if floor else _matched(b, p.half_b, p.seed)
    bio = _biology(p.half_a, p.half_a_markers, other, p.corr_genes)
    overall.update(bio["overall"])
    for t, values in bio["per_type"].items():
        per_type.setdefault(t, dict(n_real=0, n_generated=0)).update(values)
    return dict(overall=overall, per_type=per_type)


def _add_utility(result: dict, per_type: dict[str, dict]) -> None:
    """Merge utility F1s (per scored type) into a comparison's result; overall: means over the scored types."""
    for t, values in per_type.items():
        result["per_type"].setdefault(t, {}).update(values)
    for key in ("utility_f1", "utility_f1_cut"):
        result["overall"][key] = K.mean_over_types(per_type, key)


def _jsonable(obj):
    """Plain Python for json.dumps: numpy scalars unwrapped, NaN/inf as None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


@dataclass
class EvalReport:
    """Result of ``evaluate``: metrics for the generated cells and for the reference points.

    ``generated``, ``floor`` and each entry of ``baselines`` (``"gaussian"``, ``"resample"``)
    hold ``{"overall": {...}, "per_type": {...}}`` (``floor`` None and ``baselines`` empty
    with ``baselines=False``); every metric dict carries ``n_real`` and ``n_generated``, the
    cells it used before any subsampling.
    """

    settings: dict
    generated: dict
    floor: dict | None = None
    baselines: dict[str, dict] = field(default_factory=dict)
    _pca: PCA | None = field(default=None, repr=False, compare=False)  # the generated comparison's, for pictures
    _genes: pd.Index | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """Everything, JSON-serialisable; ``metrics`` documents each metric's space, ideal value and formula."""
        return _jsonable(
            dict(
                settings=self.settings,
                metrics={k: dict(space=s, ideal=i, definition=d) for k, (s, i, d) in METRICS.items()},
                generated=self.generated,
                floor=self.floor,
                baselines=self.baselines,
            )
        )

    def headline(self) -> dict:
        """The key numbers for the generated cells (None where not applicable, e.g. label_accuracy without labels)."""
        return {k: self.generated["overall"].get(k) for k in HEADLINE}

    def floor_headline(self) -> dict:
        """The same numbers for real cells against real cells (what a perfect generator reaches)."""
        if self.floor is None:
            raise ValueError("no real-vs-real reference point: evaluate() was called with baselines=False")
        return {k: self.floor["overall"].get(k) for k in HEADLINE}

    def baseline_headline(self, name: str) -> dict:
        """The same numbers for baseline ``name`` ("gaussian" or "resample")."""
        if name not in self.baselines:
            raise ValueError(
                f"no {name!r} baseline: evaluate() was called with baselines=False"
                if not self.baselines
                else f"unknown baseline {name!r}; have {list(self.baselines)}"
            )
        return {k: self.baselines[name]["overall"].get(k) for k in HEADLINE}

    def table(self) -> str:
        """A one-screen text table: every metric against the reference points, then per cell type."""
        s = self.settings
        lines = [
            f"{s['n_real']} real ({s['input']['real']}) vs {s['n_generated']} generated ({s['input']['generated']}) "
            f"cells; genes: {s['genes']['description']}",
            f"space: {s['space_description']}",
            f"MMD: {s['mmd_estimator']}, up to {s['max_cells_ot']} cells per side; "
            f"W1/W2: {s['w_cells']} cells per side in every column (same sample size as the floor)",
            f"biology: {s['biology']}",
            f"utility: {s['utility']}",
        ]
        if s.get("floor"):
            lines.append(f"real-vs-real: {s['floor']}")
            lines += [f"{name}: {text}" for name, text in s["baselines"].items()]
        lines.append("")
        columns = [("generated", self.generated), ("real-vs-real", self.floor)] + list(self.baselines.items())
        header = f"{'metric':<17}{'space':<7}{'ideal':<7}" + "".join(f"{c:>13}" for c, _ in columns)
        lines += [header, "-" * len(header)]
        for k, (space, ideal, _) in METRICS.items():
            values = [(result or {}).get("overall", {}).get(k) for _, result in columns]
            if s["label_key"] is None and k in ("label_accuracy", "marker_recall", "marker_logfc_rho"):
                continue
            if k.startswith("utility") and all(v is None for v in values):
                continue
            lines.append(f"{k:<17}{space:<7}{ideal:<7}" + "".join(f"{format_value(v):>13}" for v in values))
        per_type = self.generated["per_type"]
        floor = (self.floor or {}).get("per_type", {})
        for title, cols in (("distributions", PER_TYPE_COLUMNS), ("biology", PER_TYPE_BIOLOGY)):
            if not per_type:
                break
            lines += ["", f"per cell type ({s['label_key']!r}), {title}; in brackets: real-vs-real"]
            header = f"{'cell type':<22}{'n_real':>7}{'n_gen':>7}" + "".join(f"{c:>20}" for c in cols)
            lines += [header, "-" * len(header)]
            for t, m in per_type.items():
                f = floor.get(t, {})
                cells = "".join(
                    f"{format_value(m.get(c)) + (f' [{format_value(f.get(c))}]' if f else ''):>20}" for c in cols
                )
                lines.append(f"{t[:21]:<22}{m.get('n_real', 0):>7}{m.get('n_generated', 0):>7}{cells}")
        return "\n".join(lines)


def evaluate(
    real: ad.AnnData,
    generated: ad.AnnData,
    label_key: str | None = None,
    n_pcs: int = 30,
    max_cells_ot: int = MAX_CELLS_OT,
    seed: int = 0,
    baselines: bool = True,
    reference: ad.AnnData | None = None,
    all_genes: bool = False,
    space: str = "auto",
) -> EvalReport:
    """Compare generated cells with real ones (protocol in the module docstring).

    real, generated: AnnData with raw counts or log1p(normalize_total(1e4)) values in ``.X``
        (detected per object, reported in ``settings["input"]``); the generated genes must
        equal or be a subset of the real ones.
    label_key: obs column with cell types in both objects; enables per-type metrics, label
        accuracy, marker genes and (with ``reference``) downstream utility.
    max_cells_ot: at most this many cells per side (a seeded random subsample) enter the
        pairwise metrics (MMD, W1, W2) and the real-vs-generated classifiers; gene-space
        metrics and label accuracy use every cell. W1/W2 use min(max_cells_ot, n_real // 2,
        n_generated) cells per side (per type: the type's counts), in every comparison, so
        that they are read against a floor at the same sample size.
    baselines: also compute the real-vs-real floor and the baselines (set False during
        training, where only ``headline()`` is read).
    reference: optional other real cells of the same distribution, typically the cells the
        generator was trained on (``real`` then being held out). The highly variable genes
        are ranked on it, the baselines are fit on it, and it is the training set of the
        downstream-utility experiment; with ``space="auto"`` the PCA is fit on it too.
        Without it the genes are ranked on real + generated cells, the baselines are fit on
        ``real`` itself (so they are a little optimistic), and there is no utility.
    all_genes: keep every evaluated gene even above ``MAX_GENES``.
    space: "auto" (reference when given, else joint), "joint" or "reference"; see "Which
        cells fit the space" in the module docstring.

    The floor is one random half of ``real`` (split within each cell type) against the
    other half, in the real-vs-generated comparison's PCA (the reference's, or the one fit on
    real + generated cells). Marker and correlation metrics of every column are scored
    against the first half, the compared cells cut to the second half's per-type counts
    (``_biology``). Generated-cell metrics do not depend on ``baselines``.
    """
    with threadpool_limits(limits=EVAL_THREADS):
        return _evaluate(real, generated, label_key, n_pcs, max_cells_ot, seed, baselines, reference, all_genes, space)


def _evaluate(
    real, generated, label_key, n_pcs, max_cells_ot, seed, baselines, reference, all_genes, space
) -> EvalReport:
    if n_pcs < 1 or max_cells_ot < MIN_GROUP_CELLS:
        raise ValueError(f"need n_pcs >= 1 and max_cells_ot >= {MIN_GROUP_CELLS}, got {n_pcs} and {max_cells_ot}")
    if space not in SPACES:
        raise ValueError(f"unknown space {space!r}; choose from {list(SPACES)}")
    if space == "auto":
        space = "reference" if reference is not None else "joint"
    if space == "reference" and reference is None:
        raise ValueError('space="reference" needs reference cells (e.g. the training cells)')
    genes = _evaluated_genes(real, generated, reference)
    lr, lg = _log_cells(real, "real", genes, label_key), _log_cells(generated, "generated", genes, label_key)
    lref = _log_cells(reference, "reference", genes, label_key) if reference is not None else None
    for what, cells in (("real", lr), ("generated", lg), ("reference", lref)):
        if cells is not None and cells.logx.shape[0] < MIN_GROUP_CELLS:
            raise ValueError(f"{what} has {cells.logx.shape[0]} cells; the evaluation needs at least {MIN_GROUP_CELLS}")

    # Genes: rank by Seurat dispersion on cells that no comparison favours (module docstring).
    rank_on = "reference cells" if lref is not None else "real + generated cells"
    disp, disp_norm = _gene_dispersions(lref) if lref is not None else _gene_dispersions(lr, lg)
    select = len(genes) > MAX_GENES and not all_genes
    keep = top_genes(disp_norm, disp, MAX_GENES) if select else np.arange(len(genes))
    corr_genes = top_genes(disp_norm[keep], disp[keep], min(CORR_GENES, len(keep)))
    r, g = lr.dense(keep), lg.dense(keep)
    ref = lref.dense(keep) if lref is not None else None
    kept = genes[keep]
    gene_text = (
        f"the {MAX_GENES} most highly variable of {len(genes)} (Seurat dispersion, ranked on the {rank_on}; "
        "names in metrics.json)"
        if select
        else f"all {len(genes)}" + (" (all_genes)" if all_genes and len(genes) > MAX_GENES else "")
    )

    if len(r.logx) < 2 * MIN_GROUP_CELLS:
        raise ValueError(
            f"the real-vs-real floor splits the {len(r.logx)} real cells in halves and needs at "
            f"least {2 * MIN_GROUP_CELLS}"
        )
    pca = _fit_pca(ref.logx, n_pcs, seed) if space == "reference" else None
    w_cells = _w_cells(r, g, max_cells_ot)
    rng = np.random.default_rng(seed)
    first, second = _half_split(r, rng)
    half_a, half_b = r.take(first), r.take(second)
    half_a_markers = (
        K.rank_markers(half_a.logx, half_a.labels, MIN_GROUP_CELLS)
        if half_a.labels is not None and g.labels is not None
        else None
    )
    protocol = _Protocol(n_pcs, seed, max_cells_ot, w_cells, corr_genes, pca, half_a, half_b, half_a_markers)
    space_text = (
        f"PCA with {pca.n_components_} PCs fit on the {len(ref.logx)} reference cells "
        f"({100 * pca.explained_variance_ratio_.sum():.0f}% of their variance), one space for every column"
        if pca is not None
        else f"PCA with up to {n_pcs} PCs fit on both sides of each comparison: real + generated cells "
        "(the floor's two real halves are compared in this one too), real + baseline cells"
    )
    utility = None
    if ref is not None and label_key is not None:
        upca = pca if pca is not None else _fit_pca(ref.logx, n_pcs, seed)
        utility = (DownstreamUtility(ref.projected(upca).pcs, ref.labels, r.projected(upca).pcs, r.labels, seed), upca)
    settings = dict(
        n_real=len(r.logx),
        n_generated=len(g.logx),
        n_genes=len(kept),
        n_real_genes_unused=real.n_vars - len(kept),
        genes=dict(
            description=gene_text,
            n_evaluated=len(kept),
            n_input=len(genes),
            selected=select,
            ranked_on=rank_on,
            correlation_genes=list(kept[corr_genes]),
            names=list(kept) if select else None,
        ),
        input=dict(real=r.kind, generated=g.kind),
        label_key=label_key,
        n_pcs=n_pcs,
        space=space,
        space_description=space_text,
        n_reference=None if ref is None else len(ref.logx),
        utility=_utility_text(utility, label_key, reference),
        biology=(
            f"marker genes (scanpy Wilcoxon, top {K.MARKER_TOP_K}) and gene-gene correlations (top "
            f"{len(corr_genes)} HVGs) of every column against one real half ({len(first)} cells), each column "
            f"cut to the other half's per-type counts ({len(second)} cells at most), i.e. at the floor's size"
        ),
        seed=seed,
        max_cells_ot=max_cells_ot,
        w_cells=w_cells[None],
        mmd_sigmas=list(M.SIGMAS),
        mmd_estimator="unbiased (U-statistic)",
        gene_space="log1p(normalize_total(1e4)) on the evaluated genes",
    )
    generated_pca = protocol.space(r, g)
    generated_result = _compare(r, g, protocol, generated_pca)
    if utility is not None:
        _add_utility(generated_result, utility[0].score(g.projected(utility[1]).pcs, g.labels))
    report = EvalReport(settings, generated_result, _pca=generated_pca, _genes=kept)
    if baselines:
        settings["floor"] = (
            f"one random half of the real cells ({len(first)}) against the other ({len(second)}), "
            "split within each cell type, in the real-vs-generated comparison's PCA"
        )
        report.floor = _compare(half_a, half_b, protocol, generated_pca, floor=True)
        if utility is not None:
            _add_utility(report.floor, utility[0].floor())
        fit, fit_text = (ref, "reference cells") if ref is not None else (r, "real cells themselves (optimistic)")
        settings["baselines"] = {}
        for name in B.BASELINES:
            cells = _baseline(name, fit, g, rng)
            report.baselines[name] = _compare(r, cells, protocol)
            if utility is not None:
                _add_utility(report.baselines[name], utility[0].score(cells.projected(utility[1]).pcs, cells.labels))
            settings["baselines"][name] = (
                f"{B.DESCRIPTIONS[name]}, fit on the {fit_text}, in log-normalized space, "
                "as many cells of each type as generated"
            )
    return report


def _utility_text(utility, label_key: str | None, reference) -> str:
    if label_key is None:
        return "needs cell types (label_key)"
    if reference is None:
        return "needs training cells (reference)"
    u = utility[0]
    return (
        (
            f"{len(u.types)} types with >= {UTILITY_MIN_TRAIN} training and >= {UTILITY_MIN_TEST} held-out cells, "
            f"each cut to {u.few} training "
            "cells; PCA fit on the reference; F1 on the real cells"
        )
        if u.types
        else "no type has enough cells"
    )


def write_report(
    report: EvalReport, out_dir: str | os.PathLike, real: ad.AnnData | None = None, generated: ad.AnnData | None = None
) -> list[str]:
    """Write ``metrics.json`` and ``table.txt`` into ``out_dir``; with ``real`` and ``generated``, the pictures too.

    The pictures need the cells themselves (the report keeps only numbers and the fitted
    PCA of the real-vs-generated comparison): pass the same AnnData objects that were
    evaluated. They are ``embedding.png`` (UMAP of real + generated PCA coordinates,
    coloured by source and by cell type; t-SNE with a warning if umap-learn is missing),
    ``histograms.png`` (library size, per-cell and per-gene zero fraction) and
    ``gene_means.png`` (per-gene mean and variance, real vs generated, with y = x). Every
    file is written atomically. Returns the paths.
    """
    if (real is None) != (generated is None):
        raise ValueError("pass both real and generated to draw the pictures, or neither")
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "metrics.json"), os.path.join(out_dir, "table.txt")]
    with atomic_path(paths[0]) as tmp, open(tmp, "w") as f:
        json.dump(report.to_dict(), f, indent=2)
    with atomic_path(paths[1]) as tmp, open(tmp, "w") as f:
        f.write(report.table() + "\n")
    if real is not None:
        if report._pca is None:
            raise ValueError("this report carries no fitted PCA (it was not made by evaluate()); cannot draw pictures")
        label_key = report.settings["label_key"]
        all_genes = np.arange(len(report._genes))
        r = _log_cells(real, "real", report._genes, label_key).dense(all_genes).projected(report._pca)
        g = _log_cells(generated, "generated", report._genes, label_key).dense(all_genes).projected(report._pca)
        both_counts = r.kind == g.kind == "counts"
        with threadpool_limits(limits=EVAL_THREADS):
            paths += plots.draw_report(out_dir, r, g, label_key, both_counts, report.settings["seed"])
    return paths


def cli_evaluate(
    real_path: str,
    generated_path: str,
    out_dir: str,
    label_key: str | None = None,
    n_pcs: int = 30,
    seed: int = 0,
    reference_path: str | None = None,
    all_genes: bool = False,
    space: str = "auto",
) -> EvalReport:
    """``wbdit evaluate``: read the .h5ad files, evaluate, write the report into ``out_dir``, print the table.

    ``reference_path``: optional .h5ad of other real cells (e.g. the training cells), passed
    to ``evaluate`` as ``reference``: genes, PCA and baselines are then fit on them, and
    the downstream utility trains on them.
    """
    real, generated = read_h5ad(real_path), read_h5ad(generated_path)
    reference = read_h5ad(reference_path) if reference_path is not None else None
    report = evaluate(
        real,
        generated,
        label_key=label_key,
        n_pcs=n_pcs,
        seed=seed,
        reference=reference,
        all_genes=all_genes,
        space=space,
    )
    paths = write_report(report, out_dir, real=real, generated=generated)
    print(report.table())
    print("\nwrote " + ", ".join(paths))
    return report


def baseline_headlines(
    real: ad.AnnData, reference: ad.AnnData, label_key: str | None, n_cells: int, seed: int = 0
) -> dict[str, dict]:
    """Each baseline run as a generator: ``n_cells`` cells fit on ``reference`` (per type in its
    proportions when ``label_key``), evaluated against ``real`` exactly as generated cells are
    (``evaluate(real, cells, reference=reference, baselines=False).headline()``). For tables that
    put models and baselines side by side (``wbdit compare --baselines``)."""
    cell_types = None
    if label_key is not None:
        counts = reference.obs[label_key].astype(str).value_counts()
        cell_types = {t: int(c) for t, c in (counts / counts.sum() * n_cells).round().astype(int).items() if c > 0}
    out = {}
    for name in B.BASELINES:
        cells = B.baseline_cells(
            name, reference, cell_types=cell_types, n_cells=n_cells, label_key=label_key or "", seed=seed
        )
        out[name] = evaluate(
            real, cells, label_key=label_key, seed=seed, baselines=False, reference=reference
        ).headline()
    return out


def during_training(
    real: ad.AnnData, reference: ad.AnnData | None = None, n_cells: int = 500, seed: int = 0
) -> Callable[[Run], dict]:
    """An evaluator for ``wbdit.train(evaluate=...)``: headline metrics of ``n_cells`` cells
    sampled from the EMA model against ``real``. Pass the held-out cells as ``real`` and the
    training cells as ``reference`` (genes and PCA are then fit on them), or the training cells alone."""

    def evaluate_run(run: Run) -> dict:
        device = next(run.model.parameters()).device
        gen = sample(run, n_cells=n_cells, seed=seed, device=device, progress=False, fused=run.model.fused)
        return evaluate(
            real, gen, label_key=run.preprocessor.label_key, baselines=False, reference=reference
        ).headline()

    return evaluate_run


__all__ = [
    "EvalReport",
    "METRICS",
    "baseline_headlines",
    "cli_evaluate",
    "during_training",
    "evaluate",
    "plot_training_curves",
    "write_report",
]
