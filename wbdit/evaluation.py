"""The evaluator: how close generated cells are to real ones, in numbers and pictures.

One protocol for every model (DESIGN.md, "Evaluation protocol"):

1. Both AnnData objects are put in log-normalized gene space: ``.X`` holding raw counts
   (non-negative integers, detected) gets scanpy's ``normalize_total(1e4)`` + ``log1p``
   on all its genes; ``.X`` already log-normalized is used as is. The generated genes
   must equal the real genes or be a subset of them; the real cells are restricted to them.
2. A PCA (sklearn, ``n_pcs`` components) is fit on REAL cells only; generated cells
   are projected into it (centred on the real means).
3. Metrics (see ``METRICS`` for each one's space and formula), overall and per cell type.
4. Reference points, so no number is read alone: the same metrics for real cells against
   other real cells (the floor a perfect generator reaches) and for a trivial generator
   (per-gene Gaussian).

Which cells fit the PCA. A PCA fit on n cells of p genes with p ~ n (700 x 765 for PBMC)
fits those cells' own noise in its trailing components: on PBMC, cells that shaped the
PCA have 3-4x the variance of unseen real cells along PCs 10-30, and a random forest
tells the two apart with ROC-AUC ~0.96 although both are real. Generated cells are always
unseen, so a comparison with the very cells that fit the PCA is tilted against them.
Two remedies, both kept: pass ``reference`` (e.g. the training cells, with ``real``
held out) and the PCA is fit on it, so real and generated are both unseen (real vs real
AUC then ~0.5); and the real-vs-real floor always reproduces the situation of the real-vs-
generated comparison, so the tilt, when present, shows in the floor column too.

``evaluate`` returns an ``EvalReport``; ``write_report`` writes ``metrics.json``,
``table.txt`` and PNG pictures; ``cli_evaluate`` backs ``wbdit evaluate``;
``plot_training_curves`` backs ``wbdit report``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits

from wbdit import metrics as M
from wbdit import plots
from wbdit.atomic import atomic_path
from wbdit.data import read_h5ad
from wbdit.errors import MissingKeyError
from wbdit.plots import plot_training_curves
from wbdit.preprocessing import TARGET_SUM
from wbdit.run import Run
from wbdit.sampling import sample

MAX_CELLS_OT = 2000
MIN_GROUP_CELLS = 10  # below this many cells on a side, a cell type's distribution metrics are left empty
# The evaluation runs every BLAS/OpenMP pool on one thread. Its problems are small (at most a
# few thousand cells per pairwise metric), where thread start-up and spin-waiting dominate; on
# a busy 2-core machine threads made one kNN search 50x slower (110 ms vs 2 ms), a t-SNE of
# 240 cells 18x slower (36 s vs 2 s), and a whole PBMC evaluation 10.5 s instead of 6.8 s.
EVAL_THREADS = 1
HEADLINE = ("knn_auc", "mmd", "w2", "spearman_mean", "spearman_var", "zero_frac_mad", "label_accuracy")

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
    "label_accuracy": ("PCA", "floor", "5-NN cell-type classifier fit on real cells: accuracy on generated labels"),
}
PER_TYPE_COLUMNS = ("mmd", "w2", "knn_auc", "spearman_mean", "label_accuracy")


@dataclass
class _Cells:
    """One side of a comparison: log-normalized cells on the evaluated genes, their PCA coordinates, labels."""

    logx: np.ndarray  # cells x genes, float32
    pcs: np.ndarray | None  # cells x n_pcs, float64; None until projected
    labels: np.ndarray | None  # str per cell, or None
    kind: str  # "counts" or "log-normalized": what .X held
    total_counts: np.ndarray | None  # raw library size per cell when .X held counts

    def take(self, idx: np.ndarray) -> "_Cells":
        return _Cells(self.logx[idx], self.pcs[idx], None if self.labels is None else self.labels[idx],
                      self.kind, None if self.total_counts is None else self.total_counts[idx])


def _input_kind(X, what: str) -> str:
    """Reject a missing .X, NaN/inf or negative values; say whether .X holds raw counts or log-normalized values."""
    if X is None:
        raise ValueError(f"{what} has no .X")
    values = X.data if sp.issparse(X) else np.asarray(X).ravel()
    bad = int(values.size - np.isfinite(values).sum())
    if bad:
        raise ValueError(f"{what}.X contains {bad} NaN or infinite values")
    if values.size and values.min() < 0:
        raise ValueError(f"{what}.X has negative values (min {values.min():.3g}); expected raw counts or "
                         "log1p(normalize_total) values, not scaled or centred data")
    return "counts" if np.array_equal(values, np.round(values)) else "log-normalized"


def _prepare(adata: ad.AnnData, what: str, genes: pd.Index, label_key: str | None) -> _Cells:
    """Log-normalize ``adata`` (when it holds counts) on all its genes, then keep ``genes`` in that order."""
    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"{what} must be an AnnData, got {type(adata).__name__}")
    if adata.n_obs == 0:
        raise ValueError(f"{what} has zero cells")
    labels = None
    if label_key is not None:
        if label_key not in adata.obs.columns:
            raise MissingKeyError(f"label_key {label_key!r} is not a column of {what}.obs; "
                           f"available columns: {list(adata.obs.columns)}")
        column = adata.obs[label_key]
        if column.isna().any():
            raise ValueError(f"{what}.obs[{label_key!r}] has {int(column.isna().sum())} missing labels")
        labels = column.astype(str).to_numpy()
    kind = _input_kind(adata.X, what)
    # A float32 copy in a bare AnnData: scanpy normalizes in place and must not touch the caller's object.
    X = adata.X.astype(np.float32) if sp.issparse(adata.X) else np.array(adata.X, dtype=np.float32)
    work = ad.AnnData(X)
    total_counts = None
    if kind == "counts":
        import scanpy as sc  # scanpy takes seconds to import: only when counts need it

        total_counts = np.asarray(work.X.sum(axis=1), dtype=np.float64).ravel()
        if (total_counts == 0).any():
            raise ValueError(f"{what}: {int((total_counts == 0).sum())} cells have zero total counts; remove them first")
        sc.pp.normalize_total(work, target_sum=TARGET_SUM)
        sc.pp.log1p(work)
    logx = work.X[:, adata.var_names.get_indexer(genes)]
    logx = logx.toarray() if sp.issparse(logx) else np.asarray(logx)
    return _Cells(logx.astype(np.float32, copy=False), None, labels, kind, total_counts)


def _evaluated_genes(real: ad.AnnData, generated: ad.AnnData, reference: ad.AnnData | None) -> pd.Index:
    """The generated genes, after checking that the real (and reference) cells have all of them."""
    sides = [("real", real), ("generated", generated)] + ([("reference", reference)] if reference is not None else [])
    for what, adata in sides:
        if not isinstance(adata, ad.AnnData):
            raise TypeError(f"{what} must be an AnnData, got {type(adata).__name__}")
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
                f"(e.g. {list(missing[:10])}); the generated genes must equal the {what} genes or be a subset of them")
    return genes


def _half_split(cells: _Cells, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random halves of the cells, split within each cell type so both halves keep the composition."""
    groups = [np.arange(len(cells.logx))] if cells.labels is None else [
        np.flatnonzero(cells.labels == t) for t in np.unique(cells.labels)]
    first, second = [], []
    for idx in groups:
        idx = rng.permutation(idx)
        first.append(idx[: len(idx) // 2])
        second.append(idx[len(idx) // 2 :])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def _trivial(fit: _Cells, like: _Cells, rng: np.random.Generator) -> _Cells:
    """The trivial generator: independent per-gene Gaussians in log-normalized space, clipped at 0.

    Mean and standard deviation per gene come from the ``fit`` cells, per cell type when
    there are labels; it draws as many cells of each type as ``like`` has (a type absent
    from ``fit`` is drawn from the all-cells Gaussian). It knows every gene's mean and
    variance but no gene-gene correlation and no zero inflation.
    """
    def draw(x: np.ndarray, n: int) -> np.ndarray:
        return np.clip(rng.normal(x.mean(axis=0), x.std(axis=0), size=(n, x.shape[1])), 0, None)

    if like.labels is None or fit.labels is None:
        return _Cells(draw(fit.logx, len(like.logx)).astype(np.float32), None, None, "log-normalized", None)
    logx = np.empty_like(like.logx)
    for t in np.unique(like.labels):
        rows = like.labels == t
        source = fit.logx[fit.labels == t] if (fit.labels == t).any() else fit.logx
        logx[rows] = draw(source, int(rows.sum()))
    return _Cells(logx, None, like.labels, "log-normalized", None)


def _cap(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= n else x[rng.choice(len(x), n, replace=False)]


def _group_metrics(a: _Cells, b: _Cells, w_cells: int, max_cells: int, seed: int, rf: bool) -> dict:
    """Every metric except label accuracy for real side ``a`` against compared side ``b``.

    MMD and the classifiers use up to ``max_cells`` cells per side; W1/W2 use ``w_cells``
    per side (see ``_w_cells``) so the generated, floor and trivial values share one sample size.
    """
    out: dict = dict(n_real=len(a.logx), n_generated=len(b.logx))
    if min(len(a.logx), len(b.logx)) < MIN_GROUP_CELLS:
        return out | {k: None for k in METRICS if k != "label_accuracy" and (rf or k != "rf_auc")}
    rng = np.random.default_rng(seed)
    pa, pb = _cap(a.pcs, max_cells, rng), _cap(b.pcs, max_cells, rng)
    wa, wb = _cap(a.pcs, w_cells, rng), _cap(b.pcs, w_cells, rng)
    out.update(mmd=M.mmd(pa, pb), w1=M.wasserstein(wa, wb, 1), w2=M.wasserstein(wa, wb, 2),
               knn_auc=M.classifier_auc(pa, pb, "knn", seed))
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


def _compare(a: _Cells, b: _Cells, w_cells: dict, max_cells: int, seed: int) -> dict:
    """All metrics for real side ``a`` against ``b``: ``{"overall": {...}, "per_type": {type: {...}}}``.

    The random-forest AUC is computed overall only (it costs ~0.7 s per comparison).
    Label accuracy: a classifier fit on ``a``'s cells and labels labels ``b``'s cells;
    per type it is the fraction of ``b``'s cells of that type given that type (0 for a
    type ``a`` lacks: the classifier cannot name it).
    """
    overall = _group_metrics(a, b, w_cells[None], max_cells, seed, rf=True)
    per_type: dict = {}
    if a.labels is not None and b.labels is not None:
        correct = M.label_transfer(a.pcs, a.labels, b.pcs) == b.labels
        overall["label_accuracy"] = float(correct.mean())
        for t in sorted(set(a.labels) | set(b.labels)):
            ia, ib = np.flatnonzero(a.labels == t), np.flatnonzero(b.labels == t)
            group = _group_metrics(a.take(ia), b.take(ib), w_cells.get(t, 0), max_cells, seed, rf=False)
            group["label_accuracy"] = float(correct[ib].mean()) if len(ib) else None
            per_type[t] = group
    return dict(overall=overall, per_type=per_type)


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


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass
class EvalReport:
    """Result of ``evaluate``: metrics for the generated cells and for the two reference points.

    ``generated``, ``floor`` and ``trivial`` each hold ``{"overall": {...}, "per_type": {...}}``
    (``floor``/``trivial`` are None with ``baselines=False``); every metric dict carries
    ``n_real`` and ``n_generated``, the cells it used before any subsampling.
    """

    settings: dict
    generated: dict
    floor: dict | None = None
    trivial: dict | None = None
    _pca: PCA | None = field(default=None, repr=False, compare=False)  # for write_report's pictures
    _genes: pd.Index | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """Everything, JSON-serialisable; ``metrics`` documents each metric's space, ideal value and formula."""
        return _jsonable(dict(
            settings=self.settings,
            metrics={k: dict(space=s, ideal=i, definition=d) for k, (s, i, d) in METRICS.items()},
            generated=self.generated, floor=self.floor, trivial=self.trivial,
        ))

    @staticmethod
    def _pick(result: dict | None, which: str) -> dict:
        if result is None:
            raise ValueError(f"no {which} reference point: evaluate() was called with baselines=False")
        return {k: result["overall"].get(k) for k in HEADLINE}

    def headline(self) -> dict:
        """The key numbers for the generated cells (None where not applicable, e.g. label_accuracy without labels)."""
        return {k: self.generated["overall"].get(k) for k in HEADLINE}

    def floor_headline(self) -> dict:
        """The same numbers for real cells against real cells (what a perfect generator reaches)."""
        return self._pick(self.floor, "real-vs-real")

    def trivial_headline(self) -> dict:
        """The same numbers for the trivial per-gene Gaussian generator."""
        return self._pick(self.trivial, "trivial-generator")

    def table(self) -> str:
        """A one-screen text table: every metric against both reference points, then per cell type."""
        s = self.settings
        lines = [
            f"{s['n_real']} real ({s['input']['real']}) vs {s['n_generated']} generated ({s['input']['generated']}) "
            f"cells, {s['n_genes']} genes; PCA: {s['n_pcs']} PCs fit on {s['pca_fit_on']} "
            f"({100 * s['pca_variance_explained']:.0f}% of variance)",
            f"MMD: {s['mmd_estimator']}, up to {s['max_cells_ot']} cells per side; "
            f"W1/W2: {s['w_cells']} cells per side in every column (same sample size as the floor)",
        ]
        if s.get("floor"):
            lines.append(f"real-vs-real: {s['floor']}")
            lines.append(f"trivial: {s['trivial']}")
        lines.append("")
        header = f"{'metric':<15}{'space':<7}{'ideal':<7}{'generated':>11}{'real-vs-real':>14}{'trivial':>10}"
        lines += [header, "-" * len(header)]
        def ref(result: dict | None, k: str) -> str:
            return _fmt(result["overall"].get(k)) if result else "-"

        for k, (space, ideal, _) in METRICS.items():
            if k == "label_accuracy" and s["label_key"] is None:
                continue
            lines.append(f"{k:<15}{space:<7}{ideal:<7}{_fmt(self.generated['overall'].get(k)):>11}"
                         f"{ref(self.floor, k):>14}{ref(self.trivial, k):>10}")
        per_type = self.generated["per_type"]
        if per_type:
            lines += ["", f"per cell type ({s['label_key']!r}); in brackets: real-vs-real"]
            header = f"{'cell type':<22}{'n_real':>7}{'n_gen':>7}" + "".join(f"{c:>20}" for c in PER_TYPE_COLUMNS)
            lines += [header, "-" * len(header)]
            for t, m in per_type.items():
                floor = (self.floor or {}).get("per_type", {}).get(t, {})
                cells = "".join(f"{_fmt(m.get(c)) + (f' [{_fmt(floor.get(c))}]' if floor else ''):>20}"
                                for c in PER_TYPE_COLUMNS)
                lines.append(f"{t[:21]:<22}{m['n_real']:>7}{m['n_generated']:>7}{cells}")
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
) -> EvalReport:
    """Compare generated cells with real ones (protocol in the module docstring).

    real, generated: AnnData with raw counts or log1p(normalize_total(1e4)) values in ``.X``
        (detected per object, reported in ``settings["input"]``); the generated genes must
        equal or be a subset of the real ones.
    label_key: obs column with cell types in both objects; enables per-type metrics and
        label accuracy.
    max_cells_ot: at most this many cells per side (a seeded random subsample) enter the
        pairwise metrics (MMD, W1, W2) and the real-vs-generated classifiers; gene-space
        metrics and label accuracy use every cell. W1/W2 use min(max_cells_ot, n_real // 2,
        n_generated) cells per side (per type: the type's counts), in every comparison, so
        that they are read against a floor at the same sample size.
    baselines: also compute the real-vs-real floor and the trivial generator (set False
        during training, where only ``headline()`` is read).
    reference: optional other real cells of the same distribution, typically the cells the
        generator was trained on (``real`` then being held out). With it the PCA is fit on
        ``reference`` and both ``real`` and ``generated`` are projected into it, so neither
        side shaped it (see "Which cells fit the PCA" in the module docstring); the trivial
        generator is fit on ``reference``. Without it the PCA is fit on ``real`` and the
        trivial generator on ``real``.

    The floor is always one random half of ``real`` (split within each cell type) against
    the other half, in the same situation as the real-vs-generated comparison: with a
    reference, both halves projected into the reference PCA; without one, in a PCA refit on
    the first half, with the second half projected. Generated-cell metrics do not depend on
    ``baselines``.
    """
    with threadpool_limits(limits=EVAL_THREADS):
        return _evaluate(real, generated, label_key, n_pcs, max_cells_ot, seed, baselines, reference)


def _project(pca: PCA, *sides: _Cells) -> None:
    for cells in sides:
        cells.pcs = pca.transform(cells.logx).astype(np.float64)


def _evaluate(real, generated, label_key, n_pcs, max_cells_ot, seed, baselines, reference) -> EvalReport:
    if n_pcs < 1 or max_cells_ot < MIN_GROUP_CELLS:
        raise ValueError(f"need n_pcs >= 1 and max_cells_ot >= {MIN_GROUP_CELLS}, got {n_pcs} and {max_cells_ot}")
    genes = _evaluated_genes(real, generated, reference)
    r = _prepare(real, "real", genes, label_key)
    g = _prepare(generated, "generated", genes, label_key)
    ref = _prepare(reference, "reference", genes, label_key) if reference is not None else None
    for what, cells in (("real", r), ("generated", g), ("reference", ref)):
        if cells is not None and len(cells.logx) < MIN_GROUP_CELLS:
            raise ValueError(f"{what} has {len(cells.logx)} cells; the evaluation needs at least {MIN_GROUP_CELLS}")

    fit = ref if ref is not None else r
    n_comps = min(n_pcs, len(fit.logx) - 1, len(genes))
    pca = PCA(n_components=n_comps, random_state=seed).fit(fit.logx)
    _project(pca, r, g)
    settings = dict(
        n_real=len(r.logx), n_generated=len(g.logx), n_genes=len(genes),
        n_real_genes_unused=real.n_vars - len(genes), input=dict(real=r.kind, generated=g.kind),
        label_key=label_key, n_pcs=n_comps, pca_fit_on=f"{'reference' if ref is not None else 'real'} cells",
        n_reference=None if ref is None else len(ref.logx),
        pca_variance_explained=float(pca.explained_variance_ratio_.sum()),
        seed=seed, max_cells_ot=max_cells_ot, mmd_sigmas=list(M.SIGMAS), mmd_estimator="unbiased (U-statistic)",
        gene_space="log1p(normalize_total(1e4)) on the evaluated genes",
    )
    w_cells = _w_cells(r, g, max_cells_ot)
    settings["w_cells"] = w_cells[None]
    report = EvalReport(settings, _compare(r, g, w_cells, max_cells_ot, seed), _pca=pca, _genes=genes)
    if baselines:
        if len(r.logx) < 2 * MIN_GROUP_CELLS:
            raise ValueError(f"the real-vs-real floor splits the {len(r.logx)} real cells in halves and needs at "
                             f"least {2 * MIN_GROUP_CELLS}; pass baselines=False or more cells")
        rng = np.random.default_rng(seed)
        first, second = _half_split(r, rng)
        half_a, half_b = r.take(first), r.take(second)
        if ref is None:  # like real (fit) vs generated (projected): fit on one half, project the other
            half_pca = PCA(n_components=min(n_comps, len(first) - 1), random_state=seed).fit(half_a.logx)
            _project(half_pca, half_a, half_b)
        settings["floor"] = (f"one random half of the real cells ({len(first)}) against the other ({len(second)}), "
                             "split within each cell type, " + ("in the reference PCA" if ref is not None else
                                                                "in a PCA refit on the first half"))
        trivial = _trivial(fit, g, rng)
        _project(pca, trivial)
        settings["trivial"] = (f"per-gene Gaussian (mean, variance of the {settings['pca_fit_on']}"
                               + (", per cell type" if label_key else "")
                               + ") in log-normalized space, clipped at 0, as many cells as generated")
        report.floor = _compare(half_a, half_b, w_cells, max_cells_ot, seed)
        report.trivial = _compare(r, trivial, w_cells, max_cells_ot, seed)
    return report


def write_report(report: EvalReport, out_dir: str | os.PathLike, real: ad.AnnData | None = None,
                 generated: ad.AnnData | None = None) -> list[str]:
    """Write ``metrics.json`` and ``table.txt`` into ``out_dir``; with ``real`` and ``generated``, the pictures too.

    The pictures need the cells themselves (the report keeps only numbers and the fitted
    PCA): pass the same AnnData objects that were evaluated. They are
    ``embedding.png`` (UMAP of real + generated PCA coordinates, coloured by source and by
    cell type; t-SNE with a warning if umap-learn is missing), ``histograms.png`` (library
    size, per-cell and per-gene zero fraction) and ``gene_means.png`` (per-gene mean and
    variance, real vs generated, with y = x). Every file is written atomically. Returns the paths.
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
        r = _prepare(real, "real", report._genes, label_key)
        g = _prepare(generated, "generated", report._genes, label_key)
        r.pcs, g.pcs = report._pca.transform(r.logx), report._pca.transform(g.logx)
        both_counts = r.kind == g.kind == "counts"
        with threadpool_limits(limits=EVAL_THREADS):
            paths += plots.draw_report(out_dir, r, g, label_key, both_counts, report.settings["seed"])
    return paths


def cli_evaluate(real_path: str, generated_path: str, out_dir: str, label_key: str | None = None,
                 n_pcs: int = 30, seed: int = 0, reference_path: str | None = None) -> EvalReport:
    """``wbdit evaluate``: read the .h5ad files, evaluate, write the report into ``out_dir``, print the table.

    ``reference_path``: optional .h5ad of other real cells (e.g. the training cells), passed
    to ``evaluate`` as ``reference``: the PCA is then fit on them.
    """

    real, generated = read_h5ad(real_path), read_h5ad(generated_path)
    reference = read_h5ad(reference_path) if reference_path is not None else None
    report = evaluate(real, generated, label_key=label_key, n_pcs=n_pcs, seed=seed, reference=reference)
    paths = write_report(report, out_dir, real=real, generated=generated)
    print(report.table())
    print("\nwrote " + ", ".join(paths))
    return report


__all__ = ["EvalReport", "METRICS", "cli_evaluate", "evaluate", "plot_training_curves", "write_report"]


def during_training(real: ad.AnnData, reference: ad.AnnData | None = None, n_cells: int = 500,
                    seed: int = 0) -> Callable[[Run], dict]:
    """An evaluator for ``wbdit.train(evaluate=...)``: headline metrics of ``n_cells`` cells
    sampled from the EMA model against ``real``. Pass the held-out cells as ``real`` and the
    training cells as ``reference`` (the PCA is then fit on them), or the training cells alone."""

    def evaluate_run(run: Run) -> dict:
        device = next(run.model.parameters()).device
        gen = sample(run, n_cells=n_cells, seed=seed, device=device, progress=False)
        return evaluate(real, gen, label_key=run.preprocessor.label_key, baselines=False,
                        reference=reference).headline()

    return evaluate_run
