"""The white box, measured: coding rate, compression and sparsity of every block, per noise level.

CRATE (Yu et al. 2023, "White-Box Transformers via Sparse Rate Reduction") derives MSSA as a
gradient step that compresses the tokens against the heads' subspaces U_[K], and ISTA as a
proximal step that sparsifies them against a dictionary D. ``inspect`` runs real cells noised
to a set of diffusion timesteps t through a model and measures, block by block, whether the
blocks of a trained WB-DiT still do that, and the same quantities, where they are defined,
for the DiT baseline.

Definitions (CRATE's, written for tokens as rows). One cell's tokens are Z (N, d), N tokens
(gene patches) of d = hidden_size channels; eps is the coding precision (``EPS`` = 0.5):

    R(Z)            = 1/2 logdet(I + d / (N eps^2) Z Z^T)                         (nats)
    R^c(Z; U_[K])   = sum_k 1/2 logdet(I + p / (N eps^2) (Z U_k)(Z U_k)^T)        (nats)
    SRR(Z)          = R(Z) - R^c(Z; U_[K]) - lambda ||Z||_1

with U_k (d, p) an orthonormal basis (CRATE's U_k in O(d, p)) of the k-th head's subspace: the
span of the p = d / K columns of the block's shared projection as MSSA applies it (``w = Z U^T``
in ``nn.Linear`` terms: span of U.weight[k p:(k+1) p].T), by QR. So R^c measures the subspaces,
not the scale U learned; ``orthonormal=False`` uses the learned columns as they are (then R^c
grows with U's norm and can exceed R). Z Z^T is CRATE's Z^T Z for column tokens; each logdet is taken
in float64 by Cholesky on the smaller of the two Gram matrices (N x N or d x d: Sylvester).

Which tokens. The residual stream is measured after the model's own LayerNorm (no affine) and
divided by sqrt(d), so every token has unit norm and eps is relative to it:
"before MSSA" is norm1(x) / sqrt(d) of the block input x, "after MSSA" is norm2(x') / sqrt(d)
of x' = x + gate1 * MSSA(...), the residual after the attention branch (for DiT: after
attention). The sparse code is the ISTA output a (B, N, d) (for DiT: the MLP's GELU hidden
units, (B, N, 4d)); its SRR uses A = a / sqrt(d), the same units, the block's U_[K] and
lambda = the ISTA step's lambda unless given. Measures are per cell, then averaged over cells.

A freshly initialised model is adaLN-Zero: every gate is 0, so the residual stream does not
change through the blocks and "before" equals "after" exactly; its ISTA/MLP outputs are not zero.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from wbdit.data import get_matrix
from wbdit.diffusion import GaussianDiffusion
from wbdit.model import ISTA, MLP, GeneDiT, arch_name
from wbdit.preprocessing import Preprocessor, log_normalize, validate_expression
from wbdit.run import Run

EPS = 0.5  # coding precision, relative to unit-norm tokens
N_LEVELS = 10  # default number of noise levels, evenly spaced over 0..T-1
N_CELLS = 500  # default number of cells per inspection
DEFINITIONS = (
    "Tokens are rows; one cell's tokens Z (N, d). R(Z) = 1/2 logdet(I + d/(N eps^2) Z Z^T); "
    "R^c(Z; U_[K]) = sum_k 1/2 logdet(I + p/(N eps^2) (Z U_k)(Z U_k)^T), U_k an orthonormal basis (QR) of the "
    "span of U.weight[k p:(k+1) p].T of the block's MSSA (or the learned columns, orthonormal=False); "
    "natural logs (nats). Before/after MSSA: norm1(x)/sqrt(d) and "
    "norm2(x + gate1 MSSA)/sqrt(d) (unit-norm tokens). Sparse code: ISTA output a (DiT: GELU hidden units); "
    "SRR = R(A) - R^c(A) - lambda ||A||_1 with A = a/sqrt(d) and lambda the ISTA lambda. "
    "Per cell, then mean (and std) over cells."
)


@dataclass(frozen=True)
class Measure:
    """One measured quantity: its heat-map title, unit, and the architectures it is defined for."""

    title: str
    unit: str
    archs: tuple[str, ...] = ("wbdit", "dit")


# name -> Measure, in the order the heat maps draw them
MEASURES: dict[str, Measure] = {
    "R_before": Measure("coding rate R(Z) before MSSA / attention", "nats"),
    "R_after": Measure("coding rate R(Z) after MSSA / attention", "nats"),
    "Rc_before": Measure("compression term R^c(Z; U_[K]) before MSSA", "nats", ("wbdit",)),
    "Rc_after": Measure("compression term R^c(Z; U_[K]) after MSSA", "nats", ("wbdit",)),
    "Rc_delta": Measure("change of R^c across MSSA (< 0: compressed)", "nats", ("wbdit",)),
    "zero_frac": Measure("fraction of exact zeros in the sparse code", "fraction"),
    "nonpositive_frac": Measure("fraction of code entries <= 0 (units off)", "fraction"),
    "l1_l2": Measure("L1 / L2 per token of the sparse code", "ratio, 1..sqrt(width)"),
    "hoyer": Measure("Hoyer sparsity per token of the code (1: one-hot, 0: flat)", "0..1"),
    "code_R": Measure("coding rate R(A) of the ISTA output", "nats", ("wbdit",)),
    "code_Rc": Measure("compression term R^c(A; U_[K]) of the ISTA output", "nats", ("wbdit",)),
    "code_l1": Measure("||A||_1 of the ISTA output (A = a / sqrt(d))", "sum over tokens", ("wbdit",)),
    "srr": Measure("sparse rate reduction R - R^c - lambda ||A||_1 of the ISTA output", "nats", ("wbdit",)),
}
SPARSE_CODE = {"wbdit": "ISTA output", "dit": "MLP GELU hidden units"}


# ---------------------------------------------------------------------------- the measures


def _logdet_identity_plus(gram: Tensor, c: float) -> Tensor:
    """logdet(I + c G) of PSD Gram matrices G (..., m, m) in float64; returns (...)."""
    gram = gram.double()
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    # I + c G has eigenvalues >= 1: Cholesky cannot fail, and logdet = 2 sum log diag(L).
    chol = torch.linalg.cholesky(eye + c * gram)
    return 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)


def coding_rate(Z: Tensor, eps: float = EPS) -> Tensor:
    """CRATE's coding rate ``R(Z) = 1/2 logdet(I + d/(N eps^2) Z Z^T)`` of tokens Z (..., N, d); (...) float64 nats.

    The smaller Gram matrix is used (N x N or d x d: the same non-zero spectrum, Sylvester).
    """
    Z = Z.double()
    n, d = Z.shape[-2:]
    return 0.5 * _logdet_identity_plus(Z @ Z.mT if n <= d else Z.mT @ Z, d / (n * eps**2))


def head_bases(U: Tensor, num_heads: int, orthonormal: bool = True) -> Tensor:
    """The heads' bases U_k (K, d, p) from a projection weight U (K p, d) applied as ``w = z U^T``.

    ``orthonormal``: an orthonormal basis of each head's column span (reduced QR, float64), else
    the learned columns themselves.
    """
    out, d = U.shape
    bases = U.reshape(num_heads, out // num_heads, d).mT
    return torch.linalg.qr(bases.double()).Q if orthonormal else bases


def compression_rate(Z: Tensor, bases: Tensor, eps: float = EPS) -> Tensor:
    """CRATE's ``R^c(Z; U_[K]) = sum_k 1/2 logdet(I + p/(N eps^2) (Z U_k)(Z U_k)^T)``; Z (..., N, d), bases (K, d, p).

    Returns (...) float64 nats. Each head uses the smaller of its N x N and p x p Gram matrices.
    """
    Z = Z.double()
    n = Z.shape[-2]
    K, d, p = bases.shape
    W = (Z @ bases.double().permute(1, 0, 2).reshape(d, K * p)).unflatten(-1, (K, p))  # (..., N, K, p): one GEMM
    gram = torch.einsum("...nkp,...nkq->...kpq", W, W) if p <= n else torch.einsum("...nkp,...mkp->...knm", W, W)
    return 0.5 * _logdet_identity_plus(gram, p / (n * eps**2)).sum(-1)


def code_sparsity(A: Tensor) -> dict[str, Tensor]:
    """Sparsity of codes A (B, N, n) per cell (B,): exact zeros, entries <= 0, L1/L2 and Hoyer per token.

    L1/L2 lies in [1, sqrt(n)]; Hoyer's ``(sqrt(n) - L1/L2) / (sqrt(n) - 1)`` in [0, 1] (1: one
    non-zero entry, 0: all entries of equal magnitude) compares codes of different widths n.
    Tokens that are all zero have no ratio: they are left out of those two means (NaN if all are).
    """
    A = A.double()
    n = A.shape[-1]
    l1, l2 = A.abs().sum(-1), A.norm(dim=-1)
    alive = l2 > 0
    ratio = torch.where(alive, l1 / torch.where(alive, l2, 1.0), torch.nan)
    hoyer = (math.sqrt(n) - ratio) / (math.sqrt(n) - 1) if n > 1 else torch.zeros_like(ratio)
    return dict(
        zero_frac=(A == 0).double().mean((-2, -1)),
        nonpositive_frac=(A <= 0).double().mean((-2, -1)),
        l1_l2=ratio.nanmean(-1),
        hoyer=hoyer.nanmean(-1),
    )


def sparse_rate_reduction(Z: Tensor, bases: Tensor, lmbda: float, eps: float = EPS) -> Tensor:
    """``R(Z) - R^c(Z; U_[K]) - lambda ||Z||_1`` per cell for tokens Z (B, N, d); (B,) float64."""
    return coding_rate(Z, eps) - compression_rate(Z, bases, eps) - lmbda * Z.double().abs().sum((-2, -1))


# ---------------------------------------------------------------------------- capturing block internals


@contextlib.contextmanager
def block_taps(model: GeneDiT) -> Iterator[dict[tuple[int, str], Tensor]]:
    """Forward hooks that keep, per block i, ``(i, "before")`` = norm1's output, ``(i, "after")`` =
    norm2's output (B, N, d), and ``(i, "code")`` = the ISTA output (B, N, d) or the MLP's GELU output
    (B, N, 4d). Only read the outputs, so the model computes exactly what it computes without them.
    """
    taps: dict[tuple[int, str], Tensor] = {}
    handles = []

    def keep(key):
        def hook(module, args, output):
            taps[key] = output.detach()

        return hook

    for i, block in enumerate(model.blocks):
        if isinstance(block.mlp, ISTA):
            code = block.mlp
        elif isinstance(block.mlp, MLP):
            code = block.mlp[1]  # the activation: Linear(H, 4H) - GELU - Linear(4H, H)
        else:
            raise TypeError(f"block {i}: cannot tap a {type(block.mlp).__name__}")
        handles += [
            block.norm1.register_forward_hook(keep((i, "before"))),
            block.norm2.register_forward_hook(keep((i, "after"))),
            code.register_forward_hook(keep((i, "code"))),
        ]
    try:
        yield taps
    finally:
        for h in handles:
            h.remove()


def block_measures(
    model: GeneDiT,
    taps: dict[tuple[int, str], Tensor],
    eps: float = EPS,
    lmbda: float | None = None,
    orthonormal: bool = True,
) -> list[dict[str, Tensor]]:
    """Per block, every defined ``MEASURES`` entry as a (B,) float64 tensor of per-cell values."""
    arch = arch_name(model)
    out = []
    for i, block in enumerate(model.blocks):
        before, after, code = (taps[(i, k)].double() for k in ("before", "after", "code"))  # float64 once
        d = before.shape[-1]
        before, after = before / math.sqrt(d), after / math.sqrt(d)
        m = dict(R_before=coding_rate(before, eps), R_after=coding_rate(after, eps))
        m.update(code_sparsity(code))
        if arch == "wbdit":
            bases = head_bases(block.attn.U.weight.detach(), block.attn.num_heads, orthonormal)
            m["Rc_before"] = compression_rate(before, bases, eps)
            m["Rc_after"] = compression_rate(after, bases, eps)
            m["Rc_delta"] = m["Rc_after"] - m["Rc_before"]
            A = code / math.sqrt(d)
            lam = block.mlp.lmbda if lmbda is None else lmbda
            m["code_R"], m["code_Rc"] = coding_rate(A, eps), compression_rate(A, bases, eps)
            m["code_l1"] = A.abs().sum((-2, -1))
            m["srr"] = m["code_R"] - m["code_Rc"] - lam * m["code_l1"]
        out.append(m)
    return out


# ---------------------------------------------------------------------------- inspection


@dataclass
class Inspection:
    """One model's measures: ``measures[name]`` is (depth, len(t)) of means over cells, ``spread`` their std."""

    arch: str
    label: str
    t: list[int]
    measures: dict[str, list[list[float]]]
    spread: dict[str, list[list[float]]]
    n_cells: int
    eps: float
    lmbda: float | None
    orthonormal: bool
    conditioning: str
    model_config: dict
    seconds: float
    definitions: dict[str, dict] = field(default_factory=dict)

    @property
    def depth(self) -> int:
        return len(next(iter(self.measures.values())))

    def grid(self, name: str) -> np.ndarray:
        """(depth, len(t)) float array of a measure's means; NaN where it is not defined for this arch."""
        if name not in self.measures:
            return np.full((self.depth, len(self.t)), np.nan)
        return np.asarray(self.measures[name], dtype=np.float64)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """Plain-text table: one row per (measure, block), one column per t."""
        head = f"{'measure':<17}{'block':>6}" + "".join(f"{t:>10}" for t in self.t)
        lines = [f"{self.label} ({self.arch}), {self.n_cells} cells, eps {self.eps}", head]
        for name in MEASURES:
            if name in self.measures:
                for b, row in enumerate(self.measures[name]):
                    lines.append(f"{name:<17}{b + 1:>6}" + "".join(f"{v:>10.4g}" for v in row))
        return "\n".join(lines)


def noise_levels(diffusion: GaussianDiffusion, t: int | Sequence[int] | None) -> list[int]:
    """Timesteps to inspect: ``t`` given as a list, or that many (default ``N_LEVELS``) evenly spaced over 0..T-1."""
    T = diffusion.num_timesteps
    if t is None or isinstance(t, int):
        n = N_LEVELS if t is None else t
        if n < 1:
            raise ValueError(f"need at least one noise level, got {n}")
        return sorted({int(round(s)) for s in np.linspace(0, T - 1, min(n, T))})
    levels = [int(s) for s in t]
    bad = [s for s in levels if not 0 <= s < T]
    if not levels or bad:
        raise ValueError(f"noise levels must be timesteps in 0..{T - 1}, got {list(t)}")
    return levels


def cells_in_model_space(adata, pre: Preprocessor) -> tuple[Tensor, np.ndarray | None]:
    """An AnnData's cells in a run's model space: (n_cells, n_genes) float32, and label indices or None.

    Counts or log-normalized values are detected as in training; the run's genes (``var_names``)
    must all be present. Labels, (n,) for one label column and (n, K) for K, come from the run's
    label columns in ``obs`` when any is there (None otherwise); a missing column or a value the
    run does not know gets that column's null class.
    """
    X = get_matrix(adata, pre.layer)
    logx, _ = log_normalize(X, validate_expression(X, f".layers[{pre.layer!r}]" if pre.layer else ".X"))
    names = list(adata.var_names.astype(str))
    index = {g: j for j, g in enumerate(names)}
    missing = [g for g in pre.var_names if g not in index]
    if missing:
        raise ValueError(
            f"{len(missing)} of the run's {pre.n_genes} genes are not in the cells "
            f"(e.g. {missing[:5]}); inspect needs cells measured on the training genes"
        )
    dense = logx[:, [index[g] for g in pre.var_names]].toarray()
    x = pre.transform(torch.from_numpy(dense.astype(np.float32)))
    labels = None
    if any(k in adata.obs for k in pre.label_keys):
        columns = []
        for key, categories in zip(pre.label_keys, pre.label_categories):
            known = {c: code for code, c in enumerate(categories)}  # code len(categories): the null class
            values = adata.obs[key] if key in adata.obs else [None] * adata.n_obs
            columns.append([known.get(None if v is None else str(v), len(categories)) for v in values])
        labels = np.asarray(columns, np.int64).T
        labels = labels[:, 0] if len(pre.label_keys) == 1 else labels
    return x, labels


@torch.no_grad()
def inspect(
    run_or_model: Run | GeneDiT | str | os.PathLike,
    cells=None,
    t: int | Sequence[int] | None = None,
    n_cells: int = N_CELLS,
    labels: np.ndarray | Tensor | None = None,
    eps: float = EPS,
    lmbda: float | None = None,
    orthonormal: bool = True,
    diffusion: GaussianDiffusion | None = None,
    seed: int = 0,
    batch_size: int = 250,
    label: str | None = None,
    device: torch.device | str | None = None,
) -> Inspection:
    """Measure every block of a model on real cells noised to each timestep in ``t``.

    ``run_or_model``: a ``Run``, a run directory, or a model. ``cells``: an AnnData (with a
    run: preprocessed as in training, see ``cells_in_model_space``), a (n, n_genes) tensor or
    array already in model space, or None for the bundled PBMC cells (a run trained on them).
    ``t``: timesteps, or how many evenly spaced over 0..T-1 (default 10). At most ``n_cells``
    cells are used (a seeded random subset); one noise draw per cell is shared by every t.
    A conditional model gets the cells' types where known (``labels`` or the AnnData's label
    column), else the null class. ``diffusion`` defaults to the run's (a bare model: T = 1000
    linear). ``eps``: coding precision; ``lmbda``: the SRR's L1 weight (default the ISTA step's);
    ``orthonormal``: R^c on orthonormal bases of the heads' subspaces (default) or on U's learned
    columns. Returns an ``Inspection``; ``wbdit.whitebox_report.write_report`` writes JSON and heat maps.
    """
    start = time.perf_counter()
    if isinstance(run_or_model, (str, os.PathLike)):
        run_or_model = Run.load(run_or_model, device=device or "cpu")
    if isinstance(run_or_model, GeneDiT):
        model, pre = run_or_model, None
        diffusion = diffusion or GaussianDiffusion()
        label = label or type(model).__name__
    else:
        model, pre = run_or_model.model, run_or_model.preprocessor
        diffusion = diffusion or run_or_model.diffusion
        label = label or os.path.basename(os.path.normpath(run_or_model.out_dir))
    if device is not None:
        model = model.to(device)
    dev = next(model.parameters()).device
    if cells is None:
        if pre is None:
            raise ValueError("inspecting a bare model needs cells (a model-space tensor)")
        from wbdit import datasets  # scanpy's bundled cells: only when no cells are given

        cells = datasets.pbmc68k()
    if isinstance(cells, (Tensor, np.ndarray)):
        x0 = torch.as_tensor(cells, dtype=torch.float32)
    else:
        if pre is None:
            raise ValueError(
                "an AnnData needs a run's preprocessing: pass a Run (or its directory), or cells already in model space"
            )
        x0, cell_labels = cells_in_model_space(cells, pre)
        labels = cell_labels if labels is None else labels
    if x0.ndim != 2 or x0.shape[1] != model.n_genes:
        raise ValueError(f"cells must be (n, {model.n_genes}) in model space, got {tuple(x0.shape)}")
    levels = noise_levels(diffusion, t)
    gen = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(x0), generator=gen)[:n_cells].sort().values if len(x0) > n_cells else None
    x0 = x0 if keep is None else x0[keep]
    y, conditioning = None, "unconditional"
    if model.num_classes:
        if labels is not None:
            y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
            y = y if keep is None else y[keep]
            conditioning = "cell types"
        else:
            null = torch.tensor(model.label_sizes, dtype=torch.long)  # each label column's null class
            y = null.expand(len(x0), -1).clone() if isinstance(model.num_classes, list) else null.repeat(len(x0))
            conditioning = "null class"
    noise = torch.randn(x0.shape, generator=gen)
    was_training = model.training
    model.eval()
    per_t: list[list[dict[str, Tensor]]] = []  # [t][block] -> measure -> (n,) per cell
    try:
        with block_taps(model) as taps:
            for level in levels:
                chunks = []
                for a in range(0, len(x0), batch_size):
                    xb, nb = x0[a : a + batch_size].to(dev), noise[a : a + batch_size].to(dev)
                    tt = torch.full((len(xb),), level, dtype=torch.long, device=dev)
                    model(diffusion.q_sample(xb, tt, nb), tt, None if y is None else y[a : a + batch_size].to(dev))
                    chunks.append(block_measures(model, taps, eps, lmbda, orthonormal))
                    taps.clear()
                per_t.append(
                    [
                        {k: torch.cat([c[b][k] for c in chunks]).cpu() for k in chunks[0][b]}
                        for b in range(len(model.blocks))
                    ]
                )
    finally:
        model.train(was_training)
    names = [k for k in MEASURES if k in per_t[0][0]]
    means = {
        k: [[float(per_t[j][b][k].nanmean()) for j in range(len(levels))] for b in range(len(model.blocks))]
        for k in names
    }
    spread = {
        k: [[float(_nanstd(per_t[j][b][k])) for j in range(len(levels))] for b in range(len(model.blocks))]
        for k in names
    }
    arch = arch_name(model)
    lam = None if arch != "wbdit" else (model.blocks[0].mlp.lmbda if lmbda is None else lmbda)
    return Inspection(
        arch=arch,
        label=label,
        t=levels,
        measures=means,
        spread=spread,
        n_cells=len(x0),
        eps=eps,
        lmbda=lam,
        orthonormal=orthonormal,
        conditioning=conditioning,
        model_config=dict(model.config),
        seconds=time.perf_counter() - start,
        definitions={k: dict(asdict(MEASURES[k]), sparse_code=SPARSE_CODE[arch]) for k in names},
    )


def _nanstd(v: Tensor) -> float:
    v = v[~torch.isnan(v)]
    return float(v.std()) if len(v) > 1 else 0.0


TRAINING_CELLS, TRAINING_LEVELS = 100, 5  # per logged epoch: a few seconds of CPU on the small preset


def during_training(
    cells, n_cells: int = TRAINING_CELLS, t: int | Sequence[int] = TRAINING_LEVELS, seed: int = 0
) -> Callable[[Run], dict]:
    """An inspector for ``wbdit.train(inspect=...)``: the measures of the EMA model on ``n_cells`` of
    ``cells`` (an AnnData, e.g. the training or held-out cells) at ``t`` noise levels, as a compact
    dict for the epoch's log line: ``t``, ``n_cells``, ``eps`` and each measure's (depth, len(t)) grid."""
    prepared: list = []  # the cells in model space, computed at the first call (the run fixes the genes)

    def inspect_run(run: Run) -> dict:
        if not prepared:
            x, labels = cells_in_model_space(cells, run.preprocessor)
            keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n_cells].sort().values
            prepared.extend([x[keep], None if labels is None else labels[keep.numpy()]])
        ins = inspect(
            run.model, prepared[0], t=t, n_cells=n_cells, labels=prepared[1], diffusion=run.diffusion, seed=seed
        )
        return dict(
            t=ins.t,
            n_cells=ins.n_cells,
            eps=ins.eps,
            **{k: [[round(v, 5) for v in row] for row in grid] for k, grid in ins.measures.items()},
        )

    return inspect_run
