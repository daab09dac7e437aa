"""Generate cells from a trained run and return them as AnnData on the training genes.

Which cells: ``plan_labels`` turns requests (cell types, or values of several label columns,
with counts) into one label combination per cell; ``like=`` mirrors a template dataset cell
for cell (its synthetic twin). Combinations never seen in training are refused unless allowed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from wbdit import ops
from wbdit.data import ad, sp
from wbdit.diffusion import DEFAULT_CFG_INTERVAL, DEFAULT_CFG_SCALE, DEFAULT_SAMPLER, DEFAULT_STEPS, guidance_terms
from wbdit.distributed import default_device
from wbdit.errors import InputError, MissingKeyError
from wbdit.model import arch_name
from wbdit.preprocessing import Preprocessor, pd
from wbdit.run import Run

SPACE = "log1p(normalize_total(counts, 1e4))"
DEFAULT_CELLS = 1000  # without requests or a template
Condition = tuple[dict[str, str], int]  # (label value per named column, number of cells)
# Cells per batch by device type. CPU: measured (benchmarks/RESULTS.md, "Sampling"), a batch
# whose activations stay in cache runs faster than a large one. CUDA: not measured yet, large
# enough to fill a GPU with the small preset.
BATCH_SIZES = {"cpu": 256, "cuda": 4096}


def describe(pre: Preprocessor, codes: dict[int, int]) -> str:
    """``col=value, ...`` for class indices by label column position."""
    return ", ".join(f"{pre.label_keys[k]}={pre.label_categories[k][c]!r}" for k, c in sorted(codes.items()))


def plan_labels(
    pre: Preprocessor, n_cells: int, conditions: Sequence[Condition] = (), seed: int = 0, allow_unseen: bool = False
) -> np.ndarray | None:
    """Class indices per generated cell: (n_cells,) for one label column, (n_cells, K) for K; None if unconditional.

    Each condition ``(values, count)`` asks for ``count`` cells with the named columns' values
    (``{"cell_type": "B", "donor": "d3"}``); columns it does not name follow their training
    frequencies among the cells with those values. The other cells follow the training
    frequencies of whole combinations. Requested cells come first, in the conditions' order.
    Named values never seen together in training are refused unless ``allow_unseen``; their
    unnamed columns then follow each column's own training frequencies.
    """
    if n_cells <= 0:
        raise ValueError(f"n_cells must be > 0, got {n_cells}")
    if not pre.label_keys:
        if any(values for values, _ in conditions):
            raise ValueError("this model is unconditional: it cannot generate given cell types")
        return None
    k = len(pre.label_keys)
    combos = np.asarray(pre.label_combinations, np.int64).reshape(-1, k)
    weights = np.asarray(pre.combination_counts, np.float64)
    rng = np.random.default_rng(seed)
    parts = []
    for values, count in conditions:
        codes = {}
        for key, value in values.items():
            index = pre.label_index(value, key)  # names an unknown column or value
            codes[pre.label_keys.index(key)] = index
        if count < 0:
            raise ValueError(f"{describe(pre, codes)}: negative count {count}")
        match = np.all([combos[:, j] == c for j, c in codes.items()], axis=0) if codes else np.ones(len(combos), bool)
        if not match.any():
            if not allow_unseen:
                raise InputError(
                    f"the combination {describe(pre, codes)} never occurs in the training data; "
                    "pass allow_unseen=True (--allow-unseen) to generate it anyway"
                )
            cells = np.empty((count, k), np.int64)
            for j in range(k):
                p = np.bincount(combos[:, j], weights, minlength=len(pre.label_categories[j]))
                cells[:, j] = codes[j] if j in codes else rng.choice(len(p), size=count, p=p / p.sum())
        elif match.sum() == 1:  # every column named (or only one combination fits): nothing to draw
            cells = np.repeat(combos[match], count, axis=0)
        else:
            p = weights[match]
            cells = combos[match][rng.choice(int(match.sum()), size=count, p=p / p.sum())]
        parts.append(cells)
    requested = sum(len(c) for c in parts)
    if requested > n_cells:
        raise ValueError(f"the requests ask for {requested} cells but n_cells is {n_cells}")
    parts.append(combos[rng.choice(len(combos), size=n_cells - requested, p=weights / weights.sum())])
    labels = np.concatenate(parts).astype(np.int64)
    return labels[:, 0] if k == 1 else labels


def unseen(pre: Preprocessor, labels: np.ndarray) -> np.ndarray:
    """Which rows of ``labels`` ((n,) or (n, K) class indices) hold a combination not seen in training."""
    k = len(pre.label_keys)
    seen = {tuple(c) for c in pre.label_combinations}
    return np.array([tuple(row) not in seen for row in labels.reshape(len(labels), k).tolist()], bool)


def column_scales(pre: Preprocessor, cfg_scale: float | dict[str, float]) -> float | list[float]:
    """The guidance scale, or one per label column from ``{column: scale}`` (columns not named:
    ``DEFAULT_CFG_SCALE``)."""
    if not isinstance(cfg_scale, dict):
        return float(cfg_scale)
    for key in cfg_scale:
        if key not in pre.label_keys:
            raise MissingKeyError(
                f"cfg_scale names {key!r}, not a label column of the run; its label columns: {pre.label_keys}"
            )
    return [float(cfg_scale.get(key, DEFAULT_CFG_SCALE)) for key in pre.label_keys]


def sample(
    run: Run | str | os.PathLike,
    n_cells: int | None = None,
    cell_types: dict[str, int] | None = None,
    sampler: str = DEFAULT_SAMPLER,
    steps: int | None = None,
    eta: float = 0.0,
    cfg_scale: float | dict[str, float] | None = None,
    counts: bool = False,
    seed: int = 0,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    fused: bool = True,
    progress: bool = True,
    conditions: Sequence[Condition] = (),
    like: ad.AnnData | None = None,
    allow_unseen: bool = False,
    guidance: str = "joint",
    cfg_interval: tuple[float, float] | None = DEFAULT_CFG_INTERVAL,
    compile: bool | str = False,
) -> ad.AnnData:
    """Generate ``n_cells`` cells; ``X`` holds log-normalized values (or integer counts).

    The defaults are the measured best (``DEFAULT_SAMPLER``, ``wbdit.diffusion.DEFAULT_STEPS``,
    ``DEFAULT_CFG_SCALE`` for a conditional run, 1.0 for an unconditional one, applied where
    t / T lies in ``cfg_interval``, None: at every step), in batches of ``BATCH_SIZES`` cells
    for the device, on the fast paths (``fused=False``: the reference). ``compile=True`` runs the
    model under ``torch.compile``: on a 2-core CPU 1.4x the cells/s for the demo model after a
    first compile of about 20 s, so it pays off from tens of thousands of cells
    (benchmarks/RESULTS.md, "Sampling"); a string names the backend (default inductor).

    ``cell_types`` maps a value of the primary label column (cell type) to a count;
    ``conditions`` lists ``({column: value, ...}, count)`` requests over the run's label columns
    (``plan_labels``). Cells not requested follow the training frequencies; ``n_cells``
    defaults to the requested total, or 1000. ``like``: a template AnnData whose synthetic twin
    to make, one generated cell per template cell with that cell's label values, its ``obs``
    copied and obs_names ``"<template cell>-twin"``. Combinations never seen in training are
    refused unless ``allow_unseen``. ``cfg_scale``: one guidance scale, or ``{column: scale}``
    (columns not named: ``DEFAULT_CFG_SCALE``), combined over columns as ``guidance`` says
    (``wbdit.diffusion.guidance_terms``). ``counts=True`` (a run trained on counts) turns each
    profile into integer counts at a library size drawn log-normal per cell type as fitted on
    the training data (``counts_on_lattice``); the log-normalized values then sit in
    ``layers["log_normalized"]``.
    """
    device = torch.device(device) if device is not None else default_device()
    if not isinstance(run, Run):
        run = Run.load(run, device=device)
    model, pre = run.model.to(device).eval(), run.preprocessor
    model.fused = fused
    if compile:
        ops.available()  # import the fast backends now: an import inside the graph would break it
    # Default dynamic shapes: the guided steps' doubled batch and a short last batch make one
    # more graph for all sizes instead of one per size.
    net = torch.compile(model, backend="inductor" if compile is True else compile) if compile else model
    T = run.diffusion.num_timesteps
    steps = min(DEFAULT_STEPS.get(sampler, T), T) if steps is None else steps
    cfg_scale = (DEFAULT_CFG_SCALE if pre.label_keys else 1.0) if cfg_scale is None else cfg_scale
    batch_size = batch_size or BATCH_SIZES.get(device.type, BATCH_SIZES["cuda"])
    if counts and pre.input_kind != "counts":
        raise ValueError(
            f"counts=True needs a model trained on raw counts; this one was trained on {pre.input_kind} data"
        )
    labels, obs = _cells(pre, n_cells, cell_types, conditions, like, seed, allow_unseen)
    scales = column_scales(pre, cfg_scale)
    guidance_terms([1.0, 1.0], guidance)  # an unknown guidance is refused before any generation
    n_cells = len(obs)
    gen = torch.Generator(device=device).manual_seed(seed)
    clip = pre.bounds(device)
    chunks = []
    for start in range(0, n_cells, batch_size):
        n = min(batch_size, n_cells - start)
        y = None if labels is None else torch.from_numpy(labels[start : start + n]).to(device)
        z = run.diffusion.sample(
            net,
            n,
            pre.n_genes,
            y=y,
            sampler=sampler,
            steps=steps,
            eta=eta,
            cfg_scale=scales,
            clip=clip,
            generator=gen,
            device=device,
            progress=progress,
            guidance=guidance,
            cfg_interval=cfg_interval,
        )
        chunks.append(pre.inverse(z).cpu().numpy())
    logx = np.concatenate(chunks).astype(np.float32)
    bad = int((~np.isfinite(logx)).any(axis=1).sum())
    if bad:  # NaN cells are no data: refuse rather than hand them on
        raise ValueError(
            f"{bad} of {len(logx)} generated cells have non-finite values (NaN or inf); nothing was "
            f"written. The model's weights or the sampling settings (cfg_scale={cfg_scale}, "
            f"sampler={sampler!r}) produce them"
        )

    adata = ad.AnnData(sp.csr_matrix(logx), obs=obs, var=pd.DataFrame(index=pd.Index(pre.var_names)))
    if counts:
        adata.layers["log_normalized"] = adata.X
        adata.X = sp.csr_matrix(_draw_counts(logx, labels, pre, seed))
    adata.uns["wbdit"] = dict(
        arch=arch_name(model),
        model_config={k: v for k, v in model.config.items() if v is not None},
        epoch=run.epoch,
        sampler=sampler,
        steps=run.diffusion.num_timesteps if sampler == "ddpm" else steps,
        eta=eta,
        cfg_scale=scales
        if isinstance(scales, float) and len(pre.label_keys) < 2
        else dict(zip(pre.label_keys, [scales] * len(pre.label_keys) if isinstance(scales, float) else scales)),
        guidance=guidance,
        cfg_interval=None if cfg_interval is None else list(cfg_interval),
        seed=seed,
        X="counts" if counts else SPACE,
        prediction=run.diffusion.prediction,
        scaling=pre.scaling,
    )
    return adata


def _cells(
    pre: Preprocessor,
    n_cells: int | None,
    cell_types: dict[str, int] | None,
    conditions: Sequence[Condition],
    like: ad.AnnData | None,
    seed: int,
    allow_unseen: bool,
) -> tuple[np.ndarray | None, pd.DataFrame]:
    """Class indices per generated cell (``plan_labels``'s shape) and the generated cells' obs."""
    if like is not None:
        if n_cells is not None or cell_types or conditions:
            raise InputError(
                "like= makes one cell per template cell: give it without n_cells, cell types or conditions"
            )
        codes = pre.encode(like.obs, "the template's obs") if pre.label_keys else None
        bad = unseen(pre, codes) if codes is not None and not allow_unseen else np.zeros(like.n_obs, bool)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise InputError(
                f"{int(bad.sum())} template cells hold label combinations never seen in training, "
                f"e.g. {describe(pre, dict(enumerate(codes[first].tolist())))} (cell "
                f"{like.obs_names[first]!r}); pass allow_unseen=True (--allow-unseen) to generate them "
                "anyway"
            )
        obs = like.obs.copy()
        obs.index = pd.Index([f"{name}-twin" for name in like.obs_names])
        return (None if codes is None else codes[:, 0] if codes.shape[1] == 1 else codes), obs
    requests = [*(({pre.label_key: name}, count) for name, count in (cell_types or {}).items()), *conditions]
    if n_cells is None:
        n_cells = sum(count for _, count in requests) or DEFAULT_CELLS
    labels = plan_labels(pre, n_cells, requests, seed, allow_unseen)
    obs = pd.DataFrame(index=[f"gen_{i}" for i in range(n_cells)])
    if labels is not None:
        cols = labels.reshape(n_cells, -1)
        if "cell_type" not in pre.label_keys:  # the primary label is always also "cell_type"
            obs["cell_type"] = pd.Categorical.from_codes(cols[:, 0], categories=pre.categories)
        for k, key in enumerate(pre.label_keys):
            obs[key] = pd.Categorical.from_codes(cols[:, k], categories=pre.label_categories[k])
    return labels, obs


def _draw_counts(logx: np.ndarray, labels: np.ndarray | None, pre: Preprocessor, seed: int) -> np.ndarray:
    """Counts for generated profiles: library sizes L drawn log-normal per cell type (the primary
    label) as fitted on the real data, then ``counts_on_lattice(logx, L)``."""
    rng = np.random.default_rng(seed + 1)
    primary = None if labels is None else labels.reshape(len(logx), -1)[:, 0]
    keys = ["__all__"] * len(logx) if primary is None else [pre.categories[i] for i in primary]
    mu = np.array([pre.log_library[k][0] for k in keys])
    sd = np.array([pre.log_library[k][1] for k in keys])
    return counts_on_lattice(logx, np.exp(rng.normal(mu, sd)))


def counts_on_lattice(logx: np.ndarray, library: np.ndarray) -> np.ndarray:
    """Integer counts (B, G) whose profile is ``logx`` (B, G, log-normalized) at library sizes (B,).

    ``round(L * p_g)`` with ``p = expm1(x) / sum(expm1(x))``, and at least one count wherever
    x > 0, so zeros stay zeros and expressed genes stay expressed. A real cell's log-normalized
    profile and its own library give back its counts exactly. No Poisson draw: the generated
    profile already carries the measurement noise, and a second draw doubles it (measured:
    kNN AUC 0.996 with Poisson against 0.811 on the lattice, benchmarks/QUALITY.md).
    """
    rate = np.expm1(logx.astype(np.float64))
    total = rate.sum(axis=1, keepdims=True)
    rate = np.divide(rate, total, out=np.zeros_like(rate), where=total > 0)
    counts = np.round(rate * library[:, None])
    return np.where(logx > 0, np.maximum(counts, 1.0), 0.0).astype(np.float32)
