"""Pictures for the evaluation report and for training runs (PNG, matplotlib).

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas,
never through pyplot: importing wbdit does not switch a notebook's backend, and no
global figure state leaks between calls.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from wbdit.atomic import atomic_path
from wbdit.checkpoint import LOG, read_log
from wbdit.metrics import gene_statistics

REAL_COLOR, GENERATED_COLOR = "#4C72B0", "#DD8452"
DPI = 120
CURVE_METRICS = {  # headline metric -> (axis label, reference line or None)
    "knn_auc": ("kNN real-vs-generated AUC (0.5 ideal)", 0.5),
    "mmd": ("MMD^2 (PCA space, 0 ideal)", 0.0),
    "w2": ("Wasserstein-2 (PCA space)", None),
    "spearman_mean": ("Spearman of gene means (1 ideal)", 1.0),
    "spearman_var": ("Spearman of gene variances (1 ideal)", 1.0),
    "zero_frac_mad": ("mean |zero-fraction difference| (0 ideal)", 0.0),
    "label_accuracy": ("cell-type accuracy of generated cells", None),
    "marker_recall": ("recall of the real top marker genes", None),
    "gene_corr_mad": ("mean |gene-gene correlation difference|", 0.0),
    "utility_f1": ("rare-type F1 with generated cells added", None),
}
# x axes of the training curves: log.jsonl key -> axis label; "train_time_s" is the running sum of epoch_time_s
CURVE_AXES = {"epoch": "epoch", "step": "optimizer steps", "train_time_s": "training time (s, evaluation excluded)"}


def save_figure(fig: Figure, path: str) -> str:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI)
    return path


def _embed(x: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """2-D UMAP of x (umap-learn); t-SNE, with a warning, when umap-learn cannot be imported."""
    try:
        import umap
    except ImportError as exc:
        from sklearn.manifold import TSNE

        warnings.warn(f"umap-learn is unavailable ({exc}); drawing a t-SNE embedding instead", stacklevel=3)
        return TSNE(random_state=seed, perplexity=min(30.0, (len(x) - 1) / 3), init="pca").fit_transform(x), "t-SNE"
    # n_jobs=1: a fixed random_state forces it anyway, and saying so silences umap's warning.
    model = umap.UMAP(n_neighbors=min(15, len(x) - 1), random_state=seed, n_jobs=1)
    return model.fit_transform(x), "UMAP"


def plot_embedding(path: str, real, generated, label_key: str | None, seed: int) -> str:
    """Real and generated cells in one 2-D embedding of their PCA coordinates: by source | by cell type."""
    emb, method = _embed(np.vstack([real.pcs, generated.pcs]), seed)
    er, eg = emb[: len(real.pcs)], emb[len(real.pcs) :]
    panels = 2 if label_key is not None else 1
    fig = Figure(figsize=(6.5 * panels + (2.5 if panels == 2 else 0), 5.5))
    ax = fig.add_subplot(1, panels, 1)
    ax.scatter(er[:, 0], er[:, 1], s=6, c=REAL_COLOR, alpha=0.6, label=f"real ({len(er)})", linewidths=0)
    ax.scatter(eg[:, 0], eg[:, 1], s=6, c=GENERATED_COLOR, alpha=0.6, label=f"generated ({len(eg)})", linewidths=0)
    ax.set(title=f"{method} of real + generated cells (PCA space)", xlabel=f"{method} 1", ylabel=f"{method} 2")
    ax.legend(markerscale=3, loc="best")
    if label_key is not None:
        ax = fig.add_subplot(1, 2, 2)
        types = sorted(set(real.labels) | set(generated.labels))
        colors = [_color(i, len(types)) for i in range(len(types))]
        for t, color in zip(types, colors):
            mr, mg = real.labels == t, generated.labels == t
            ax.scatter(er[mr, 0], er[mr, 1], s=8, color=color, marker="o", alpha=0.6, linewidths=0, label=t)
            ax.scatter(eg[mg, 0], eg[mg, 1], s=12, color=color, marker="x", alpha=0.8, linewidths=0.8)
        ax.set(title=f"by {label_key}: o real, x generated", xlabel=f"{method} 1", ylabel=f"{method} 2")
        ax.legend(markerscale=2.5, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title=label_key)
    return save_figure(fig, path)


def _color(i: int, n: int):
    """Distinct colours: tab10 up to 10 categories, tab20 up to 20, then a continuous map."""
    from matplotlib import colormaps

    if n <= 10:
        return colormaps["tab10"](i)
    if n <= 20:
        return colormaps["tab20"](i)
    return colormaps["gist_ncar"](i / n)


def _bins(values: np.ndarray, n: int = 40) -> np.ndarray:
    """n equal bins over the values' range, widened when the values (nearly) coincide, e.g. normalized library sizes."""
    lo, hi = float(np.min(values)), float(np.max(values))
    span = max(hi - lo, 1e-3 * max(abs(hi), 1.0))
    return np.linspace(lo - (span - (hi - lo)) / 2, lo - (span - (hi - lo)) / 2 + span, n + 1)


def plot_histograms(path: str, real, generated, both_counts: bool) -> str:
    """Library size, per-cell zero fraction and per-gene zero fraction, real vs generated.

    Library size is the total raw count per cell when both inputs held counts; otherwise
    the sum of expm1(log-normalized values) over the evaluated genes, for both sides alike.
    """
    if both_counts:
        lib_r, lib_g, lib_label = real.total_counts, generated.total_counts, "total counts per cell"
    else:
        lib_r, lib_g = np.expm1(real.logx).sum(axis=1), np.expm1(generated.logx).sum(axis=1)
        lib_label = "sum of expm1(log-normalized) per cell"
    panels = [
        (lib_r, lib_g, lib_label, "library size"),
        ((real.logx == 0).mean(axis=1), (generated.logx == 0).mean(axis=1), "zero fraction per cell", "per-cell zeros"),
        ((real.logx == 0).mean(axis=0), (generated.logx == 0).mean(axis=0), "zero fraction per gene", "per-gene zeros"),
    ]
    fig = Figure(figsize=(15, 4.5))
    for k, (a, b, xlabel, title) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        bins = _bins(np.r_[a, b])
        ax.hist(a, bins=bins, density=True, histtype="stepfilled", alpha=0.45, color=REAL_COLOR, label="real")
        ax.hist(b, bins=bins, density=True, histtype="stepfilled", alpha=0.45, color=GENERATED_COLOR, label="generated")
        ax.set(xlabel=xlabel, ylabel="density", title=title)
        ax.legend()
    return save_figure(fig, path)


def plot_gene_means(path: str, real, generated) -> str:
    """Per-gene mean and variance (log-normalized space), real vs generated, with y = x and correlations."""
    a, b = gene_statistics(real.logx), gene_statistics(generated.logx)
    fig = Figure(figsize=(11, 5))
    for k, (key, name) in enumerate((("mean", "mean"), ("var", "variance"))):
        ax = fig.add_subplot(1, 2, k + 1)
        x, y = a[key], b[key]
        ax.scatter(x, y, s=6, alpha=0.6, color=GENERATED_COLOR, linewidths=0)
        hi = float(max(x.max(), y.max(), 1e-9)) * 1.05
        ax.plot([0, hi], [0, hi], color="black", lw=1, ls="--", label="y = x")
        r, rho = stats.pearsonr(x, y).statistic, stats.spearmanr(x, y).statistic
        ax.set(
            xlim=(0, hi),
            ylim=(0, hi),
            xlabel=f"real per-gene {name}",
            ylabel=f"generated per-gene {name}",
            title=f"per-gene {name} (log-normalized)\nPearson {r:.3f}, Spearman {rho:.3f}",
        )
        ax.legend(loc="upper left")
    return save_figure(fig, path)


def draw_report(out_dir: str, real, generated, label_key: str | None, both_counts: bool, seed: int) -> list[str]:
    """The report's three pictures; ``real``/``generated`` are prepared cells with PCA coordinates."""
    return [
        plot_embedding(os.path.join(out_dir, "embedding.png"), real, generated, label_key, seed),
        plot_histograms(os.path.join(out_dir, "histograms.png"), real, generated, both_counts),
        plot_gene_means(os.path.join(out_dir, "gene_means.png"), real, generated),
    ]


def _with_time(records: list[dict]) -> list[dict]:
    """The records (one per epoch, in order) with ``train_time_s``: the running sum of ``epoch_time_s``."""
    total, out = 0.0, []
    for r in records:
        total += r.get("epoch_time_s", np.nan)
        out.append({**r, "train_time_s": total})
    return out


def plot_training_curves(run_dir: str | os.PathLike) -> list[str]:
    """Draw ``run_dir/log.jsonl`` against epoch, optimizer steps and training time; return the PNG paths.

    ``training_loss.png``: loss against each x axis (``CURVE_AXES``: epoch, ``step``, and the
    running sum of ``epoch_time_s``, i.e. training wall-clock time without evaluation and
    checkpointing) and throughput (cells/s) per epoch. ``training_metrics.png`` (only when
    some epochs carry an ``"eval"`` headline dict, from ``--eval-every``): one row per
    headline metric, one column per x axis, with the metric's ideal value as a dashed line
    where it has one. A resumed run may log an epoch twice: the last record of each epoch wins.
    """
    run_dir = os.fspath(run_dir)
    if not os.path.isfile(os.path.join(run_dir, LOG)):
        raise FileNotFoundError(
            f"{os.path.join(run_dir, LOG)}: no training log; is {run_dir} a run directory written by 'wbdit train'?"
        )
    by_epoch = {r["epoch"]: r for r in read_log(run_dir)}
    if not by_epoch:
        raise ValueError(f"{os.path.join(run_dir, LOG)} has no records yet")
    records = _with_time([by_epoch[e] for e in sorted(by_epoch)])
    axes = [k for k in CURVE_AXES if all(r.get(k) is not None for r in records)]
    marker = "o" if len(records) < 30 else None
    fig = Figure(figsize=(4.5 * (len(axes) + 1), 4.2))
    for i, key in enumerate(axes):
        ax = fig.add_subplot(1, len(axes) + 1, i + 1)
        ax.plot([r[key] for r in records], [r["loss"] for r in records], marker=marker, color=REAL_COLOR)
        ax.set(xlabel=CURVE_AXES[key], ylabel="training loss (mean per cell)", title=f"loss by {CURVE_AXES[key]}")
    ax = fig.add_subplot(1, len(axes) + 1, len(axes) + 1)
    ax.plot([r["epoch"] for r in records], [r.get("cells_per_s", np.nan) for r in records], color=GENERATED_COLOR)
    ax.set(xlabel="epoch", ylabel="cells / s", title="throughput")
    paths = [save_figure(fig, os.path.join(run_dir, "training_loss.png"))]

    evals = [r for r in records if r.get("eval")]
    shown = [k for k in CURVE_METRICS if any(r["eval"].get(k) is not None for r in evals)]
    if shown:
        fig = Figure(figsize=(4.5 * len(axes), 3.4 * len(shown)))
        for row, key in enumerate(shown):
            label, ideal = CURVE_METRICS[key]
            points = [r for r in evals if r["eval"].get(key) is not None]
            for col, x in enumerate(axes):
                ax = fig.add_subplot(len(shown), len(axes), row * len(axes) + col + 1)
                ax.plot([r[x] for r in points], [r["eval"][key] for r in points], marker="o", color=REAL_COLOR)
                if ideal is not None:
                    ax.axhline(ideal, color="black", lw=1, ls="--", label="ideal")
                    ax.legend(loc="best")
                ax.set(xlabel=CURVE_AXES[x], ylabel=key, title=label)
        paths.append(save_figure(fig, os.path.join(run_dir, "training_metrics.png")))
    return paths
