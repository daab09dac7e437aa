"""Files and pictures of white-box inspections (``wbdit.whitebox``): JSON, tables, heat maps, training curves.

``write_report`` backs ``wbdit inspect``: ``whitebox.json`` (every measure, mean and std over
cells, per block and noise level, with the definitions), ``whitebox.txt`` (the same as
tables) and two PNG heat maps (block x t, one column per model, one colour scale per measure
shared by the models): ``whitebox_coding_rate.png`` and ``whitebox_sparsity.png``.
``plot_training_whitebox`` draws the measures logged by ``wbdit train --inspect-every``.
Figures are drawn as in ``wbdit.plots``: ``matplotlib.figure.Figure``, saved by ``plots.save_figure``.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from wbdit.atomic import atomic_path
from wbdit.checkpoint import read_log
from wbdit.plots import save_figure
from wbdit.whitebox import DEFINITIONS, MEASURES, Inspection

JSON_NAME, TEXT_NAME = "whitebox.json", "whitebox.txt"
CODING_RATE_MAPS = ("R_before", "R_after", "Rc_before", "Rc_after", "Rc_delta")
SPARSITY_MAPS = ("zero_frac", "nonpositive_frac", "l1_l2", "hoyer", "srr")
DIVERGING = ("Rc_delta",)  # drawn around 0
TRAINING_CURVES = ("R_after", "Rc_after", "Rc_delta", "zero_frac", "hoyer", "srr")
ARCH_NAMES = {"wbdit": "WB-DiT", "dit": "DiT"}


def _limits(grids: list[np.ndarray], diverging: bool) -> tuple[float, float]:
    """One colour range for a measure over every model's grid; symmetric around 0 when ``diverging``."""
    values = np.concatenate([g[np.isfinite(g)] for g in grids]) if grids else np.empty(0)
    if not len(values):
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    if diverging:
        lo, hi = -max(abs(lo), abs(hi)), max(abs(lo), abs(hi))
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):  # constant (a fresh model's zero change): centre it in a unit range
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def draw_heatmaps(path: str, inspections: Sequence[Inspection], names: Sequence[str], title: str) -> str:
    """Heat maps (rows: blocks, columns: noise level t), a row of panels per measure, a column per model."""
    cols, rows = len(inspections), len(names)
    n_t = max(len(i.t) for i in inspections)
    depth = max(i.depth for i in inspections)
    fig = Figure(figsize=(cols * (2.2 + 0.62 * n_t), rows * (1.5 + 0.42 * depth) + 0.6))
    for r, name in enumerate(names):
        measure = MEASURES[name]
        diverging = name in DIVERGING
        lo, hi = _limits([i.grid(name) for i in inspections], diverging)
        cmap = colormaps["coolwarm" if diverging else "viridis"]
        for c, ins in enumerate(inspections):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1)
            who = f"{ARCH_NAMES.get(ins.arch, ins.arch)} ({ins.label})"
            if ins.arch not in measure.archs:
                ax.set_axis_off()
                ax.text(
                    0.5,
                    0.5,
                    f"{name}: not defined for {ARCH_NAMES.get(ins.arch, ins.arch)}\n"
                    "(no shared subspace projection U / no ISTA step)",
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="0.4",
                    transform=ax.transAxes,
                )
                ax.set_title(f"{who}\n{measure.title}", fontsize=9)
                continue
            grid = ins.grid(name)
            im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            for b in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    v = grid[b, j]
                    shade = (v - lo) / (hi - lo) if np.isfinite(v) else 0.5
                    dark = shade > 0.6 if not diverging else abs(shade - 0.5) < 0.3
                    ax.text(
                        j,
                        b,
                        "n/a" if not np.isfinite(v) else f"{v:.3g}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black" if dark else "white",
                    )
            ax.set_xticks(range(len(ins.t)), [str(t) for t in ins.t], fontsize=8)
            ax.set_yticks(range(grid.shape[0]), [f"block {b + 1}" for b in range(grid.shape[0])], fontsize=8)
            ax.set_xlabel("noise level t (0: clean cells)", fontsize=8)
            ax.set_title(f"{who}\n{measure.title}", fontsize=9)
            cbar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
            cbar.set_label(measure.unit, fontsize=8)
            cbar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def write_report(inspections: Sequence[Inspection], out_dir: str | os.PathLike) -> list[str]:
    """Write ``whitebox.json``, ``whitebox.txt`` and the two heat maps into ``out_dir``; return the paths."""
    if not inspections:
        raise ValueError("no inspections to write")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    doc = dict(definitions=DEFINITIONS, eps=inspections[0].eps, models=[i.to_dict() for i in inspections])
    json_path, text_path = os.path.join(out_dir, JSON_NAME), os.path.join(out_dir, TEXT_NAME)
    with atomic_path(json_path) as tmp, open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    with atomic_path(text_path) as tmp, open(tmp, "w") as f:
        f.write("\n\n".join(i.table() for i in inspections) + "\n")
    cells = ", ".join(f"{i.label}: {i.n_cells} cells ({i.conditioning})" for i in inspections)
    eps = f"eps = {inspections[0].eps}, tokens of unit norm"
    return [
        json_path,
        text_path,
        draw_heatmaps(
            os.path.join(out_dir, "whitebox_coding_rate.png"),
            inspections,
            CODING_RATE_MAPS,
            f"Coding rate and compression per block and noise level ({eps}; {cells})",
        ),
        draw_heatmaps(
            os.path.join(out_dir, "whitebox_sparsity.png"),
            inspections,
            SPARSITY_MAPS,
            f"Sparsity of the sparse code (WB-DiT: ISTA output; DiT: MLP hidden units) ({cells})",
        ),
    ]


def plot_training_whitebox(run_dir: str | os.PathLike) -> list[str]:
    """``training_whitebox.png`` in ``run_dir``: each logged measure (mean over its noise levels) per block
    against epoch, from the ``"whitebox"`` entries of ``log.jsonl``; [] when no epoch has one."""
    run_dir = os.fspath(run_dir)
    by_epoch = {r["epoch"]: r for r in read_log(run_dir)}  # a resumed run's last record of an epoch wins
    logged = [(e, by_epoch[e]["whitebox"]) for e in sorted(by_epoch) if by_epoch[e].get("whitebox")]
    names = [k for k in TRAINING_CURVES if any(k in w for _, w in logged)]
    if not names:
        return []
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(5 * cols, 3.8 * rows))
    t = logged[-1][1]["t"]
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        points = [(e, np.asarray(w[name], dtype=np.float64)) for e, w in logged if name in w]
        depth = points[-1][1].shape[0]
        for b in range(depth):
            color = colormaps["viridis"](0.8 * b / max(depth - 1, 1))  # 0.8: not the pale yellow end
            ax.plot(
                [e for e, _ in points],
                [np.nanmean(g[b]) if g.shape[0] > b else np.nan for _, g in points],
                marker="o" if len(points) < 30 else None,
                color=color,
                label=f"block {b + 1}",
            )
        if name in DIVERGING:
            ax.axhline(0.0, color="black", lw=1, ls="--")
        ax.set(xlabel="epoch", ylabel=f"{name} ({MEASURES[name].unit})", title=MEASURES[name].title)
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8, loc="best")
    cells = logged[-1][1]["n_cells"]
    fig.suptitle(f"white-box measures during training: mean over t = {t}, {cells} cells", fontsize=10)
    return [save_figure(fig, os.path.join(run_dir, "training_whitebox.png"))]
