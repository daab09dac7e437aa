"""Distances between two sets of cells, on plain arrays (cells x features).

Each function states the space it expects; ``wbdit.evaluation`` decides which space
(the real cells' PCA, or log-normalized genes) each one is applied to.
"""

from __future__ import annotations

import numpy as np
import ot
from scipy import stats
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier

SIGMAS = (0.01, 0.1, 1.0, 10.0, 100.0)
KNN_NEIGHBORS = 10  # real-vs-generated classifier
KNN_FOLDS = 5
RF_TREES = 100
RF_MIN_LEAF = 5  # shallower trees: 3x faster than fully grown ones, same AUC on separable data
RF_FOLDS = 2  # a random forest costs ~0.3 s per fit on 1400 cells: two fits, not five
LABEL_NEIGHBORS = 5  # cell-type classifier
EMD_MAX_ITER = 10_000_000  # POT's default (1e5) stops early on 2000 x 2000 problems


def mmd(x: np.ndarray, y: np.ndarray, sigmas: tuple[float, ...] = SIGMAS) -> float:
    """Unbiased estimate of the squared maximum mean discrepancy between the samples x and y.

    Kernel ``k(a, b) = sum over sigma of exp(-||a - b||^2 / (2 sigma^2))`` (the RBF kernel
    with ``gamma = 1 / (2 sigma^2)``). With m = len(x), n = len(y):

        MMD^2 = sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (n (n-1))
                - 2 sum_{i, j} k(x_i, y_j) / (m n)

    The U-statistic drops the k(x_i, x_i) terms, so it is centred on 0 for two samples of
    one distribution whatever their sizes (it can be slightly negative), whereas the
    biased estimator adds about ``len(sigmas) * (1/m + 1/n)`` once sigma is below the
    typical distance between cells. That matters here: the real-vs-real floor compares
    half-size samples.
    """
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"MMD needs at least 2 cells on each side, got {m} and {n}")
    # Squared distances once, then one exp per sigma.
    dxx, dyy = euclidean_distances(x, squared=True), euclidean_distances(y, squared=True)
    dxy = euclidean_distances(x, y, squared=True)
    total = 0.0
    for sigma in sigmas:
        kxx, kyy, kxy = (np.exp(-d / (2.0 * sigma**2)) for d in (dxx, dyy, dxy))
        total += (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        total -= 2.0 * kxy.mean()
    return float(total)


def wasserstein(x: np.ndarray, y: np.ndarray, p: int) -> float:
    """Exact Wasserstein-p distance (p = 1 or 2) between the empirical distributions of x and y.

    Uniform weights on the cells, ground cost ``||x_i - y_j||^p`` (Euclidean), optimal
    transport solved exactly by POT (``ot.emd2``): ``W_p = (min_T sum T_ij ||x_i - y_j||^p)^(1/p)``.
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    metric = "euclidean" if p == 1 else "sqeuclidean"
    cost = ot.dist(np.asarray(x, np.float64), np.asarray(y, np.float64), metric=metric)
    value = ot.emd2(ot.unif(len(x)), ot.unif(len(y)), cost, numItermax=EMD_MAX_ITER)
    return float(max(value, 0.0)) ** (1.0 / p)


def classifier_auc(x: np.ndarray, y: np.ndarray, kind: str, seed: int) -> float:
    """Held-out ROC-AUC of a classifier that tells the cells of x (class 0) from those of y (class 1).

    The larger side is first subsampled to the smaller's size so both classes are balanced.
    Every cell is scored by a model that did not see it: stratified K-fold cross-validated
    ``predict_proba`` (``kind="knn"``: 10-nearest-neighbour vote, 5 folds; ``kind="rf"``:
    random forest, 100 trees, min 5 cells per leaf, 2 folds). 0.5 means the classifier
    cannot tell the sides apart; 1.0 means it separates them perfectly.
    """
    rng = np.random.default_rng(seed)
    n = min(len(x), len(y))
    x = x[rng.choice(len(x), n, replace=False)]
    y = y[rng.choice(len(y), n, replace=False)]
    target = np.r_[np.zeros(n), np.ones(n)]
    if kind == "knn":
        folds = KNN_FOLDS
        model = KNeighborsClassifier(n_neighbors=min(KNN_NEIGHBORS, 2 * n - 2 * n // folds - 1))
    elif kind == "rf":
        folds = RF_FOLDS
        model = RandomForestClassifier(n_estimators=RF_TREES, min_samples_leaf=RF_MIN_LEAF, n_jobs=1, random_state=seed)
    else:
        raise ValueError(f"unknown classifier {kind!r}; choose 'knn' or 'rf'")
    if n < folds:
        raise ValueError(f"a {folds}-fold classifier AUC needs at least {folds} cells per side, got {n}")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    score = cross_val_predict(model, np.vstack([x, y]), target, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(target, score))


def _correlation(fn, a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson or Spearman correlation; None where it is undefined (fewer than 3 values or a constant side)."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(fn(a, b).statistic)


def gene_statistics(x: np.ndarray) -> dict[str, np.ndarray]:
    """Per-gene mean, variance (ddof=1), zero fraction and CV = std / mean (NaN where the mean is 0)."""
    mean = x.mean(axis=0, dtype=np.float64)
    var = x.var(axis=0, ddof=1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cv = np.where(mean > 0, np.sqrt(var) / mean, np.nan)
    return dict(mean=mean, var=var, zero_frac=(x == 0).mean(axis=0), cv=cv)


def gene_metrics(x: np.ndarray, y: np.ndarray) -> dict[str, float | None]:
    """Agreement of per-gene statistics between x and y, both cells x genes in the same gene space.

    ``pearson_mean``/``spearman_mean``: correlation over genes of the per-gene means;
    ``pearson_var``/``spearman_var``: the same for per-gene variances;
    ``zero_frac_mad``: mean over genes of |zero fraction in x - zero fraction in y|;
    ``cv_spearman``: Spearman correlation over genes of CV = std / mean, on the genes
    expressed (mean > 0) on both sides (Spearman because CVs of rare genes are heavy-tailed).
    """
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"per-gene variances need at least 2 cells on each side, got {len(x)} and {len(y)}")
    a, b = gene_statistics(x), gene_statistics(y)
    both = np.isfinite(a["cv"]) & np.isfinite(b["cv"])
    return dict(
        pearson_mean=_correlation(stats.pearsonr, a["mean"], b["mean"]),
        spearman_mean=_correlation(stats.spearmanr, a["mean"], b["mean"]),
        pearson_var=_correlation(stats.pearsonr, a["var"], b["var"]),
        spearman_var=_correlation(stats.spearmanr, a["var"], b["var"]),
        zero_frac_mad=float(np.abs(a["zero_frac"] - b["zero_frac"]).mean()),
        cv_spearman=_correlation(stats.spearmanr, a["cv"][both], b["cv"][both]),
    )


def gene_correlations(x: np.ndarray) -> np.ndarray:
    """Pearson correlation matrix (genes x genes) of the columns of x (cells x genes); a constant gene correlates 0."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(axis=0, ddof=1)
    z = np.divide(x - x.mean(axis=0), sd, out=np.zeros_like(x), where=sd > 0)
    return z.T @ z / (len(x) - 1)


def correlation_distance(x: np.ndarray, y: np.ndarray) -> float | None:
    """Gene-gene correlation structure: mean over gene pairs i < j of |r_x(i, j) - r_y(i, j)|.

    x, y: cells x genes in one gene space (the evaluator passes log-normalized values of
    its top highly variable genes); r: Pearson correlation over each side's cells
    (``gene_correlations``). 0 when the two sides correlate genes identically, up to 2;
    None with fewer than 2 genes or 3 cells on a side.
    """
    if x.shape[1] < 2 or min(len(x), len(y)) < 3:
        return None
    upper = np.triu_indices(x.shape[1], k=1)
    return float(np.abs(gene_correlations(x)[upper] - gene_correlations(y)[upper]).mean())


def label_transfer(x_train: np.ndarray, labels_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Cell types predicted for x_test by a 5-nearest-neighbour classifier fit on (x_train, labels_train)."""
    model = KNeighborsClassifier(n_neighbors=min(LABEL_NEIGHBORS, len(x_train)))
    return model.fit(x_train, labels_train).predict(x_test)
