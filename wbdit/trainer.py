"""The diffusion trainer: AdamW, EMA, bf16 autocast on CUDA, atomic checkpoints, exact resume.

A run directory holds ``checkpoint.pt`` (model, EMA, optimizer, RNG, preprocessing,
diffusion and model config) and ``log.jsonl`` (one JSON line per epoch). ``Run.load``
turns it back into a model ready to sample. Checkpoints can also be taken every
``checkpoint_every`` steps: a resumed run continues inside the epoch at the next batch.

Under ``torchrun`` the same code trains with DistributedDataParallel (``wbdit.distributed``);
an AnnData opened with ``backed=True`` is streamed from disk (``wbdit.streaming``).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import anndata as ad
import torch
from tqdm.auto import tqdm

from wbdit import distributed
from wbdit.atomic import atomic_path
from wbdit.data import CHUNK_CELLS, CLUSTER_MAX_GENES, GENE_ORDERS, WINDOW_CHUNKS, CellBatches, Preprocessor, cluster_gene_order
from wbdit.diffusion import GaussianDiffusion
from wbdit.model import PRESETS, WhiteBoxDiT, _GeneDiT, arch_name, build_model
from wbdit.profiling import nvtx_range
from wbdit.streaming import fit_backed

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
FORMAT_VERSION = 1


@dataclass
class TrainConfig:
    """Optimisation settings; saved with the checkpoint and checked on resume.

    Defaults are the measured best for the "small" preset on datasets of hundreds to
    thousands of cells (benchmarks/QUALITY.md); the paper's seed recipe is lr 1e-4.
    """

    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    lr_schedule: str = "constant"  # after warmup: "constant", or "cosine" decay to 0 at the last step
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    label_dropout: float = 0.1
    seed: int = 0
    eval_every: int = 0
    eval_cells: int = 500
    checkpoint_every: int = 0  # also checkpoint every this many steps (0: at epoch ends only)
    max_steps: int = 0  # stop (and checkpoint) after this many steps in all (0: no limit)
    chunk_cells: int = CHUNK_CELLS  # batch order: chunks of consecutive cells in random order,
    window_chunks: int = WINDOW_CHUNKS  # shuffled together this many chunks at a time (data.epoch_windows)

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")


LR_SCHEDULES = ("constant", "cosine")
DEFAULT_PREDICTION = "v"  # measured better than x0 and epsilon on PBMC (benchmarks/QUALITY.md)
RESUMABLE_CHANGES = ("epochs", "checkpoint_every", "max_steps")  # may differ when resuming


@dataclass
class Run:
    """A trained model: EMA weights for sampling, its preprocessing and diffusion."""

    out_dir: Path
    model: _GeneDiT
    preprocessor: Preprocessor
    diffusion: GaussianDiffusion
    config: TrainConfig
    epoch: int
    history: list[dict]

    @classmethod
    def load(cls, out_dir: str | os.PathLike, device: torch.device | str = "cpu", fused: bool = False) -> "Run":
        """Load ``out_dir/checkpoint.pt``; the model carries the EMA weights, in eval mode."""
        ckpt = load_checkpoint(out_dir)
        model = build_model(ckpt["arch"], **ckpt["model_config"], fused=fused)
        model.load_state_dict(ckpt["ema"])
        return cls(
            out_dir=Path(out_dir),
            model=model.to(device).eval(),
            preprocessor=Preprocessor.from_dict(ckpt["preprocessor"]),
            diffusion=GaussianDiffusion(**ckpt["diffusion"]),
            config=TrainConfig(**ckpt["train_config"]),
            epoch=ckpt["epoch"],
            history=read_log(out_dir),
        )


def load_checkpoint(out_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint (is {out_dir} a wbdit run directory?)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {ckpt.get('format')} is not {FORMAT_VERSION}")
    return ckpt


def read_log(out_dir: str | os.PathLike) -> list[dict]:
    path = Path(out_dir) / LOG
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TrainHook:
    """Callbacks from ``train``: subclass and override what you need (both are no-ops here).

    ``on_step_end(step, loss)`` runs after each optimizer step; ``step`` counts the steps
    completed since the run began and ``loss`` is the step's 0-d tensor (reading it syncs).
    ``on_epoch_end(record)`` runs after an epoch's training and evaluation, before ``record``
    (the epoch's ``log.jsonl`` line) is written: keys added to it are logged.
    """

    def on_step_end(self, step: int, loss: torch.Tensor) -> None:
        pass

    def on_epoch_end(self, record: dict) -> None:
        pass


def autocast_for(device: torch.device):
    """The trainer's mixed precision: bf16 autocast on CUDA, none elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train_step(
    model: _GeneDiT,
    opt: torch.optim.Optimizer,
    diffusion: GaussianDiffusion,
    x: torch.Tensor,
    y: torch.Tensor | None,
    generator: torch.Generator,
    grad_clip: float = 1.0,
    ema: torch.nn.Module | None = None,
    ema_decay: float = 0.0,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One optimisation step on x (B, n_genes) and labels y (B,) or None; returns the 0-d loss.

    ``t`` (B,) and ``noise`` (B, n_genes) are drawn from ``generator`` unless given.

    Forward and loss under ``autocast_for(x.device)``, backward, gradient-norm clipping when
    ``grad_clip`` > 0, the optimizer step, then ``ema <- lerp(ema, model, 1 - ema_decay)``
    when ``ema`` is given. Nothing here synchronizes with the GPU.
    """
    with nvtx_range("forward"), autocast_for(x.device):
        loss = diffusion.training_loss(model, x, y, generator, t, noise)
    with nvtx_range("backward"):
        opt.zero_grad(set_to_none=True)
        loss.backward()
    with nvtx_range("optimizer"):
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
    if ema is not None:
        with nvtx_range("ema"):
            _ema_update(ema, model, ema_decay)
    return loss


def train(
    adata: ad.AnnData,
    model: _GeneDiT | Callable[[int, int | None], _GeneDiT] | None = None,
    label_key: str | None = None,
    out_dir: str | os.PathLike = "runs/wbdit",
    config: TrainConfig | None = None,
    diffusion: GaussianDiffusion | None = None,
    layer: str | None = None,
    n_top_genes: int | None = None,
    scaling: str = "minmax",
    gene_order: str = "cluster",
    resume: bool = False,
    eval_data: ad.AnnData | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    hook: TrainHook | None = None,
    **overrides,
) -> Run:
    """Train ``model`` on ``adata`` and return the ``Run`` (also written to ``out_dir``).

    ``model`` is a model, a factory ``(n_genes, num_classes) -> model`` called (seeded with
    ``config.seed``) once the preprocessing fixed the gene count, or None for a "small" WhiteBoxDiT. Keyword ``overrides``
    set ``TrainConfig`` fields (``epochs=5, lr=3e-4``...). ``resume=True`` continues the
    run in ``out_dir`` exactly where its last checkpoint stopped. ``gene_order="cluster"`` puts
    correlated genes in the same patch (``data.cluster_gene_order``; "input" keeps the
    file's order). ``hook`` receives step and
    epoch callbacks (``TrainHook``). An ``adata`` opened with ``backed=True`` is preprocessed
    and read in chunks from its file (``wbdit.streaming``). Under torchrun every process calls
    this; ``config.batch_size`` is the global batch, split across processes.
    """
    config = TrainConfig(**{**asdict(config or TrainConfig()), **overrides})
    device = torch.device(device) if device is not None else default_device()
    dist = distributed.setup(device)  # under torchrun: join the process group; cuda -> cuda:LOCAL_RANK
    device = dist.device
    diffusion = diffusion or GaussianDiffusion(prediction=DEFAULT_PREDICTION)
    out_dir = Path(out_dir)
    fit = fit_backed if adata.isbacked else Preprocessor.fit
    if gene_order not in GENE_ORDERS:
        raise ValueError(f"unknown gene_order {gene_order!r}; choose from {GENE_ORDERS}")
    pre, logx, labels = fit(adata, label_key, layer, n_top_genes, scaling)
    if gene_order == "cluster" and pre.n_genes > CLUSTER_MAX_GENES:
        warnings.warn(f"{pre.n_genes} genes: too many to cluster (limit {CLUSTER_MAX_GENES}); genes keep the "
                      "file's order. Select genes (n_top_genes / --n-top-genes 2000) to get the cluster order.",
                      stacklevel=2)
    elif gene_order == "cluster":
        pre.order = cluster_gene_order(logx)
    if not isinstance(model, _GeneDiT):
        factory = model or (lambda n, c: WhiteBoxDiT(n_genes=n, num_classes=c, **PRESETS["small"]))
        with torch.random.fork_rng(devices=[]):  # initial weights follow config.seed, global RNG untouched
            torch.manual_seed(config.seed)
            model = factory(pre.n_genes, len(pre.categories) or None)
    _check_model_fits(model, pre)
    model = model.to(device)
    net = dist.wrap(model)  # DistributedDataParallel over ranks: rank 0's weights everywhere
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    meta = dict(arch=arch_name(model), model_config=model.config, diffusion=diffusion.config,
                preprocessor=pre.to_dict(), train_config=asdict(config))
    start_epoch, step, start_batch, partial = 0, 0, 0, (0.0, 0)
    if resume:
        ckpt = load_checkpoint(out_dir)
        _check_resumable(ckpt, meta)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["rng"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        start_batch, partial = ckpt.get("batch", 0), tuple(ckpt.get("epoch_loss", partial))
        if dist.is_main:
            _truncate_log(out_dir, start_epoch)
    elif (out_dir / CHECKPOINT).exists():
        raise FileExistsError(f"{out_dir} already holds a run; pass resume=True (--resume) or choose another out_dir")

    def checkpoint(epochs_done: int, batch: int, epoch_loss: tuple[float, int], record: dict | None = None) -> None:
        """Rank 0 saves (``batch`` batches of epoch ``epochs_done`` done) and logs ``record``; all wait."""
        if dist.is_main:
            _save_checkpoint(out_dir, dict(meta, format=FORMAT_VERSION, model=model.state_dict(), ema=ema.state_dict(),
                                           optimizer=opt.state_dict(), rng=gen.get_state(), epoch=epochs_done,
                                           step=step, batch=batch, epoch_loss=epoch_loss))
            if record is not None:
                with open(out_dir / LOG, "a") as f:
                    f.write(json.dumps(record) + "\n")
        dist.barrier()

    batches = CellBatches(logx, labels, pre, config.batch_size, config.chunk_cells, config.window_chunks)
    size, rows, null = batches.batch_size, dist.shard(batches.batch_size), len(pre.categories)
    total_steps = min(config.epochs * len(batches), config.max_steps or config.epochs * len(batches))
    epochs_done = start_epoch
    for epoch in range(start_epoch, config.epochs):
        if config.max_steps and step >= config.max_steps:
            break
        model.train()
        first = start_batch if epoch == start_epoch else 0  # a resumed epoch continues at its next batch
        total, n = partial if epoch == start_epoch else (0.0, 0)
        t0, n0 = time.perf_counter(), n
        it = tqdm(batches.epoch(config.seed, epoch, device, start=first, rows=rows), total=len(batches) - first,
                  disable=not (progress and dist.is_main), desc=f"epoch {epoch + 1}/{config.epochs}", leave=False)
        b = first  # batches of this epoch done
        for b, (x, y) in enumerate(it, start=first + 1):
            # Draws for the whole global batch, the same on every rank; each rank keeps its rows.
            if y is not None and config.label_dropout > 0:  # classifier-free guidance: learn p(x) too
                drop = torch.rand((size,), device=device, generator=gen)[rows] < config.label_dropout
                y = torch.where(drop, torch.full_like(y, null), y)
            t, noise = diffusion.draw_t_noise(size, pre.n_genes, gen, device)
            for group in opt.param_groups:
                group["lr"] = learning_rate(config, step, total_steps)
            loss = dist.mean(train_step(net, opt, diffusion, x, y, gen, config.grad_clip,
                                        ema, min(config.ema_decay, (1 + step) / (10 + step)), t[rows], noise[rows]))
            step += 1
            if hook is not None:
                hook.on_step_end(step, loss)
            total += loss.item() * size
            n += size
            it.set_postfix(loss=f"{loss.item():.4f}")
            stop = config.max_steps and step >= config.max_steps
            if b < len(batches) and (stop or (config.checkpoint_every and step % config.checkpoint_every == 0)):
                checkpoint(epoch, b, (total, n))  # the epoch's last batch is checkpointed with the epoch
            if stop:
                break
        if b < len(batches):
            break  # max_steps reached inside the epoch
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        record = dict(epoch=epoch + 1, step=step, loss=total / max(n, 1), epoch_time_s=dt, cells_per_s=(n - n0) / dt)
        if config.eval_every and (epoch + 1) % config.eval_every == 0 and dist.is_main:
            run = Run(out_dir, ema, pre, diffusion, config, epoch + 1, [])
            record["eval"] = _evaluate_during_training(run, adata, eval_data, config, device)
        if hook is not None:
            hook.on_epoch_end(record)
        checkpoint(epoch + 1, 0, (0.0, 0), record)
        epochs_done = epoch + 1
        if progress and dist.is_main:
            tqdm.write(f"epoch {epoch + 1}: loss {record['loss']:.4f}  {dt:.1f}s  {record['cells_per_s']:.0f} cells/s")
    return Run(out_dir, ema, pre, diffusion, config, epochs_done, read_log(out_dir))


@torch.no_grad()
def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``: linear warmup, then the schedule."""
    warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    if config.lr_schedule == "constant":
        return config.lr * warm
    progress = min(1.0, max(0.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)))
    return config.lr * warm * 0.5 * (1.0 + math.cos(math.pi * progress))


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def _check_model_fits(model: _GeneDiT, pre: Preprocessor) -> None:
    if model.n_genes != pre.n_genes:
        raise ValueError(f"model has n_genes={model.n_genes} but the data has {pre.n_genes} genes after preprocessing")
    n_classes = len(pre.categories) or None
    if model.num_classes != n_classes:
        raise ValueError(f"model has num_classes={model.num_classes} but the labels have {n_classes} classes")


def _check_resumable(ckpt: dict, meta: dict) -> None:
    """Refuse to resume a checkpoint whose model, data or diffusion differ from this run's."""
    for key in ("arch", "model_config", "diffusion"):
        if ckpt[key] != meta[key]:
            raise ValueError(f"cannot resume: checkpoint {key} {ckpt[key]} differs from this run's {meta[key]}")
    if ckpt["preprocessor"]["var_names"] != meta["preprocessor"]["var_names"]:
        raise ValueError("cannot resume: the checkpoint was trained on other genes")
    old = {k: v for k, v in {**asdict(TrainConfig()), **ckpt["train_config"]}.items() if k not in RESUMABLE_CHANGES}
    new = {k: v for k, v in meta["train_config"].items() if k not in RESUMABLE_CHANGES}
    if old != new:
        diff = {k: (old[k], new[k]) for k in old if old[k] != new.get(k)}
        raise ValueError(f"cannot resume: training settings differ from the checkpoint's (old, new): {diff}")


def _save_checkpoint(out_dir: Path, state: dict) -> None:
    with atomic_path(out_dir / CHECKPOINT) as tmp:
        torch.save(state, tmp)


def _truncate_log(out_dir: Path, epoch: int) -> None:
    """Drop log lines past the checkpoint's epoch (written by a run killed before its next save)."""
    kept = [r for r in read_log(out_dir) if r["epoch"] <= epoch]
    with atomic_path(out_dir / LOG) as tmp:
        Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept))


def _evaluate_during_training(run: Run, train_data: ad.AnnData, held_out: ad.AnnData | None, config: TrainConfig,
                              device) -> dict:
    """Headline metrics of ``config.eval_cells`` EMA samples against held-out cells when given
    (the PCA then fit on the training cells, so real and generated are both unseen), else
    against the training cells."""
    from wbdit.evaluation import evaluate
    from wbdit.sampling import sample

    gen = sample(run, n_cells=config.eval_cells, seed=config.seed, device=device, progress=False)
    real, reference = (held_out, train_data) if held_out is not None else (train_data, None)
    return evaluate(real, gen, label_key=run.preprocessor.label_key, baselines=False, reference=reference).headline()
