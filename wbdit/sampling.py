"""Generate cells from a trained run and return them as AnnData on the training genes."""
from __future__ import annotations

import os

import numpy as np
import torch

from wbdit.data import ad, sp
from wbdit.distributed import default_device
from wbdit.model import arch_name
from wbdit.preprocessing import Preprocessor, pd
from wbdit.run import Run

SPACE = "log1p(normalize_total(counts, 1e4))"


def plan_cell_types(pre: Preprocessor, n_cells: int, cell_types: dict[str, int] | None, seed: int) -> np.ndarray | None:
    """Label index per generated cell: the requested counts, the rest in training proportions."""
    if n_cells <= 0:
        raise ValueError(f"n_cells must be > 0, got {n_cells}")
    if not pre.categories:
        if cell_types:
            raise ValueError("this model is unconditional: it cannot generate given cell types")
        return None
    requested = []
    for name, count in (cell_types or {}).items():
        if count < 0:
            raise ValueError(f"cell type {name!r}: negative count {count}")
        requested += [pre.label_index(name)] * int(count)
    if len(requested) > n_cells:
        raise ValueError(f"cell_types ask for {len(requested)} cells but n_cells is {n_cells}")
    rng = np.random.default_rng(seed)
    p = np.asarray(pre.class_counts, dtype=np.float64)
    rest = rng.choice(len(p), size=n_cells - len(requested), p=p / p.sum())
    return np.concatenate([np.asarray(requested, dtype=np.int64), rest.astype(np.int64)])


def sample(
    run: Run | str | os.PathLike,
    n_cells: int = 1000,
    cell_types: dict[str, int] | None = None,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    cfg_scale: float = 1.0,
    counts: bool = False,
    seed: int = 0,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    fused: bool | None = None,
    progress: bool = True,
) -> ad.AnnData:
    """Generate ``n_cells`` cells; ``X`` holds log-normalized values (or integer counts).

    ``cell_types`` maps type name to count; cells not requested follow the training
    proportions. ``counts=True`` (a run trained on counts) turns each profile into integer
    counts at a library size drawn log-normal per cell type as fitted on the training data
    (``counts_on_lattice``); the log-normalized values then sit in ``layers["log_normalized"]``.
    """
    device = torch.device(device) if device is not None else default_device()
    if not isinstance(run, Run):
        run = Run.load(run, device=device)
    model, pre = run.model.to(device).eval(), run.preprocessor
    if fused is not None:
        model.fused = fused
    if counts and pre.input_kind != "counts":
        raise ValueError("counts=True needs a model trained on raw counts; this one was trained on log-normalized data")
    labels = plan_cell_types(pre, n_cells, cell_types, seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    clip = pre.bounds(device)
    chunks = []
    for start in range(0, n_cells, batch_size):
        n = min(batch_size, n_cells - start)
        y = None if labels is None else torch.from_numpy(labels[start : start + n]).to(device)
        z = run.diffusion.sample(model, n, pre.n_genes, y=y, sampler=sampler, steps=steps, eta=eta,
                                 cfg_scale=cfg_scale, clip=clip, generator=gen, device=device, progress=progress)
        chunks.append(pre.inverse(z).cpu().numpy())
    logx = np.concatenate(chunks).astype(np.float32)

    obs = pd.DataFrame(index=[f"gen_{i}" for i in range(n_cells)])
    if labels is not None:
        names = pd.Categorical.from_codes(labels, categories=pre.categories)
        obs["cell_type"] = names
        if pre.label_key and pre.label_key != "cell_type":
            obs[pre.label_key] = names
    adata = ad.AnnData(sp.csr_matrix(logx), obs=obs, var=pd.DataFrame(index=pd.Index(pre.var_names)))
    if counts:
        adata.layers["log_normalized"] = adata.X
        adata.X = sp.csr_matrix(_draw_counts(logx, labels, pre, seed))
    adata.uns["wbdit"] = dict(
        arch=arch_name(model), model_config={k: v for k, v in model.config.items() if v is not None},
        epoch=run.epoch, sampler=sampler, steps=run.diffusion.num_timesteps if sampler == "ddpm" else steps,
        eta=eta, cfg_scale=cfg_scale, seed=seed, X="counts" if counts else SPACE,
        prediction=run.diffusion.prediction, scaling=pre.scaling,
    )
    return adata


def _draw_counts(logx: np.ndarray, labels: np.ndarray | None, pre: Preprocessor, seed: int) -> np.ndarray:
    """Counts for generated profiles: library sizes L drawn log-normal per cell type as fitted
    on the real data, then ``counts_on_lattice(logx, L)``."""
    rng = np.random.default_rng(seed + 1)
    keys = ["__all__"] * len(logx) if labels is None else [pre.categories[i] for i in labels]
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
