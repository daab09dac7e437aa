"""The diffusion trainer: AdamW, EMA, bf16 autocast on CUDA, atomic checkpoints, exact resume.

``train`` is a short loop around named steps: ``_prepare`` (preprocessing, model, optimizer),
``_resume`` (state from the last checkpoint), ``train_step``, an optional ``evaluate``
callback every ``eval_every`` epochs, and the checkpoint (``wbdit.checkpoint``). Checkpoints
can also be taken every ``checkpoint_every`` steps: a resumed run continues inside the epoch
at the next batch.

Under ``torchrun`` the same code trains with DistributedDataParallel (``wbdit.distributed``);
an AnnData opened with ``backed=True`` is streamed from disk (``wbdit.preprocessing``).

Faults: a step whose loss or gradient norm is not finite is not applied (model, optimizer
and EMA untouched); ``NONFINITE_PATIENCE`` such steps in a row stop training with a
``DivergedError`` naming them, unless ``skip_nonfinite`` (then they are skipped and counted in
``log.jsonl``). Rank 0 holds the run directory's lock (``wbdit.runlock``) for the whole run.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from wbdit import distributed, ops
from wbdit.batches import CellBatches
from wbdit.checkpoint import (
    CHECKPOINT,
    PREVIOUS,
    discard_partial,
    load_checkpoint,
    read_log,
    save_checkpoint,
    truncate_log,
)
from wbdit.data import ad
from wbdit.diffusion import GaussianDiffusion
from wbdit.errors import DivergedError
from wbdit.model import PRESETS, GeneDiT, WhiteBoxDiT, arch_name
from wbdit.nvtx import nvtx_range
from wbdit.preprocessing import INPUT_KINDS, Preprocessor
from wbdit.progress import Progress
from wbdit.run import MIN_EPOCHS, MIN_STEPS, Run, TrainConfig
from wbdit.runlock import RunLockedError, run_lock

DEFAULT_PREDICTION = "v"  # measured better than x0 and epsilon on PBMC (benchmarks/QUALITY.md)
RESUMABLE_CHANGES = ("epochs", "checkpoint_every", "max_steps", "skip_nonfinite")  # may differ when resuming
NONFINITE_PATIENCE = 3  # non-finite steps in a row that stop training (unless skip_nonfinite)
Evaluator = Callable[[Run], dict]  # EMA run -> metrics logged under "eval" (wbdit.evaluation.during_training)


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
    model: GeneDiT,
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
) -> tuple[torch.Tensor, bool]:
    """One optimisation step on x (B, n_genes) and labels y (B,) or None; returns (0-d loss, applied).

    ``t`` (B,) and ``noise`` (B, n_genes) are drawn from ``generator`` unless given.

    Forward and loss under ``autocast_for(x.device)``, backward, gradient-norm clipping when
    ``grad_clip`` > 0, the optimizer step, then ``ema <- lerp(ema, model, 1 - ema_decay)``
    when ``ema`` is given. If the loss or the gradient norm is not finite (on any rank), the
    step is not applied: ``applied`` is False and model, optimizer and EMA are unchanged.
    Deciding that synchronizes with the GPU once, between backward and the optimizer step.
    """
    with nvtx_range("forward"), autocast_for(x.device):
        loss = diffusion.training_loss(model, x, y, generator, t, noise)
    with nvtx_range("backward"):
        opt.zero_grad(set_to_none=True)
        loss.backward()
    with nvtx_range("optimizer"):
        if grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        finite = (torch.isfinite(loss.detach()) & torch.isfinite(norm)).to(torch.int32)
        if torch.distributed.is_initialized():  # one decision for all ranks, or their weights would part
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not finite.item():  # one NaN step would poison the weights, Adam's moments and the EMA for good
            opt.zero_grad(set_to_none=True)
            return loss, False
        opt.step()
    if ema is not None:
        with nvtx_range("ema"):
            _ema_update(ema, model, ema_decay)
    return loss, True


@dataclass
class _State:
    """What a checkpoint restores: where the run is, and the running sum of the epoch's loss."""

    epoch: int = 0
    step: int = 0
    batch: int = 0  # batches of ``epoch`` done
    epoch_loss: tuple[float, int] = (0.0, 0)
    epoch_nonfinite: int = 0  # steps of ``epoch`` not applied: non-finite loss or gradient norm
    log_line: str | None = None  # the log.jsonl line of the epoch that ended at the checkpoint


def train(
    adata: ad.AnnData,
    model: GeneDiT | Callable[[int, int | list[int] | None], GeneDiT] | None = None,
    label_key: str | list[str] | None = None,
    out_dir: str | os.PathLike = "runs/wbdit",
    config: TrainConfig | None = None,
    diffusion: GaussianDiffusion | None = None,
    layer: str | None = None,
    n_top_genes: int | None = None,
    scaling: str = "minmax",
    gene_order: str = "cluster",
    input_kind: str | None = None,
    resume: bool = False,
    evaluate: Evaluator | None = None,
    inspect: Evaluator | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    hook: TrainHook | None = None,
    fused: bool = True,
    compile: bool | str = False,
    **overrides,
) -> Run:
    """Train ``model`` on ``adata`` and return the ``Run`` (also written to ``out_dir``).

    ``model`` is a model, a factory ``(n_genes, num_classes) -> model`` called (seeded with
    ``config.seed``) once the preprocessing fixed the gene count, or None for a "small"
    WhiteBoxDiT. ``label_key``: the obs column to condition on, or several (``["cell_type",
    "donor"]``: one embedding table each, ``num_classes`` a list; each column is dropped to its
    null class on its own with probability ``label_dropout``). Keyword ``overrides`` set
    ``TrainConfig`` fields (``epochs=5, lr=3e-4``...).
    ``resume=True`` continues the run in ``out_dir`` exactly where its last checkpoint stopped.
    ``gene_order="cluster"`` puts correlated genes in the same patch ("input" keeps the file's
    order). ``input_kind`` overrides what the values are taken for (``wbdit.preprocessing.INPUT_KINDS``;
    default: read from them, and printed). ``evaluate(run)`` is called every ``eval_every``
    epochs on the EMA model
    (``wbdit.evaluation.during_training``); ``inspect(run)`` likewise every ``inspect_every``
    epochs, logged under "whitebox" (``wbdit.whitebox.during_training``). ``hook`` receives step
    and epoch callbacks. An
    ``adata`` opened with ``backed=True`` is preprocessed and read in chunks from its file.
    Under torchrun every process calls this; ``config.batch_size`` is the global batch.
    ``fused`` (default) trains on the fast paths proven equal to the reference (it sets
    ``model.fused``; False: the reference). ``compile=True`` runs the training forward under
    ``torch.compile`` as one graph (custom ops included; a graph break is an error), a string
    names the backend (default inductor); the checkpoint and the EMA model stay the plain module.
    Raises ``RunLockedError`` at once if another process is writing ``out_dir``, and
    ``DivergedError`` after ``NONFINITE_PATIENCE`` non-finite steps in a row (the checkpoints
    in ``out_dir`` are then those of the last good steps), unless ``skip_nonfinite=True``.
    """
    config = TrainConfig(**{**asdict(config or TrainConfig()), **overrides})
    if config.eval_every and evaluate is None:
        raise ValueError(
            "eval_every > 0 needs an evaluate callback, e.g. evaluate=wbdit.evaluation.during_training(adata, held_out)"
        )
    if config.inspect_every and inspect is None:
        raise ValueError(
            "inspect_every > 0 needs an inspect callback, e.g. inspect=wbdit.whitebox.during_training(adata)"
        )
    dist = distributed.setup(torch.device(device) if device is not None else distributed.default_device())
    device, out_dir = dist.device, Path(out_dir)
    with _writing(out_dir, dist):  # the lock is held until training ends, however it ends
        diffusion = diffusion or GaussianDiffusion(prediction=DEFAULT_PREDICTION)
        pre, logx, labels = Preprocessor.fit(
            adata, label_key, layer, n_top_genes, scaling, gene_order, input_kind=input_kind
        )
        auto_length = config.epochs is None
        config = config.planned(logx.shape[0])  # epochs=None: the default length for this many cells
        if progress and dist.is_main:
            tqdm.write(f"input {f'layer {layer!r}' if layer else '.X'}: {INPUT_KINDS[pre.input_kind]}")
        model = _build(model, pre, config.seed).to(device)
        model.fused = fused
        net = dist.wrap(model)  # DistributedDataParallel over ranks: rank 0's weights everywhere
        if compile:  # fixed batch shapes (ragged last batches are dropped): no dynamic shapes
            ops.available()  # import the fast backends now: an import inside the graph would break it
            net = torch.compile(net, fullgraph=True, dynamic=False, backend="inductor" if compile is True else compile)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        gen = torch.Generator(device=device).manual_seed(config.seed)
        meta = dict(
            arch=arch_name(model),
            model_config=model.config,
            diffusion=diffusion.config,
            preprocessor=pre.to_dict(),
            train_config=asdict(config),
        )
        if resume:
            state = _resume(out_dir, meta, model, ema, opt, gen, discard_bad=dist.is_main)
            if dist.is_main:
                truncate_log(out_dir, state.epoch, state.log_line)
        elif (out_dir / CHECKPOINT).exists() or (out_dir / PREVIOUS).exists():
            raise FileExistsError(
                f"{out_dir} already holds a run; pass resume=True (--resume) or choose another out_dir"
            )
        else:
            state = _State()

        saved_step = state.step if resume else None  # the step of the newest checkpoint in out_dir

        def checkpoint(
            epoch: int, batch: int, epoch_loss: tuple[float, int], epoch_nonfinite: int, record: dict | None = None
        ) -> None:
            """Rank 0 saves (``batch`` batches of ``epoch`` done) and logs ``record``; all ranks wait."""
            nonlocal saved_step
            if dist.is_main:
                save_checkpoint(
                    out_dir,
                    dict(
                        meta,
                        model=model.state_dict(),
                        ema=ema.state_dict(),
                        optimizer=opt.state_dict(),
                        rng=gen.get_state(),
                        epoch=epoch,
                        step=state.step,
                        batch=batch,
                        epoch_loss=epoch_loss,
                        epoch_nonfinite=epoch_nonfinite,
                    ),
                    record,
                )
            saved_step = state.step
            dist.barrier()

        batches = CellBatches(logx, labels, pre, config.batch_size, config.chunk_cells, config.window_chunks)
        size, rows = batches.batch_size, dist.shard(batches.batch_size)
        total_steps = min(config.epochs * len(batches), config.max_steps or config.epochs * len(batches))
        if progress and dist.is_main:
            rule = (
                f" (the default for {logx.shape[0]:,} cells: >= {MIN_STEPS:,} steps and >= {MIN_EPOCHS} epochs)"
                if auto_length and not config.max_steps
                else ""
            )
            print(
                f"plan: {total_steps:,} optimizer steps = {config.epochs} epochs of {len(batches)} batches of "
                f"{size} cells{rule}",
                flush=True,
            )
        bar = Progress(total_steps, state.step, size, enabled=progress and dist.is_main)
        epochs_done, start_epoch = state.epoch, state.epoch
        in_a_row = 0  # non-finite steps just before this one
        for epoch in range(start_epoch, config.epochs):
            if config.max_steps and state.step >= config.max_steps:
                break
            model.train()
            first = state.batch if epoch == start_epoch else 0  # a resumed epoch continues at its next batch
            total, n = state.epoch_loss if epoch == start_epoch else (0.0, 0)
            nonfinite = state.epoch_nonfinite if epoch == start_epoch else 0
            t0, n0 = time.perf_counter(), n
            it = batches.epoch(config.seed, epoch, device, start=first, rows=rows)
            b = first  # batches of this epoch done
            for b, (x, y) in enumerate(it, start=first + 1):
                # Draws for the whole global batch, the same on every rank; each rank keeps its rows.
                if y is not None and config.label_dropout > 0:  # classifier-free guidance: learn p(x) too
                    # Each label column dropped on its own: guidance per attribute (one column: (size,) draws).
                    drop = torch.rand((size, *y.shape[1:]), device=device, generator=gen)[rows] < config.label_dropout
                    y = model.drop_labels(y, drop)
                t, noise = diffusion.draw_t_noise(size, pre.n_genes, gen, device)
                for group in opt.param_groups:
                    group["lr"] = learning_rate(config, state.step, total_steps)
                decay = min(config.ema_decay, (1 + state.step) / (10 + state.step))
                loss, applied = train_step(
                    net, opt, diffusion, x, y, gen, config.grad_clip, ema, decay, t[rows], noise[rows]
                )
                loss = dist.mean(loss)
                state.step += 1
                if hook is not None:
                    hook.on_step_end(state.step, loss)
                if applied:
                    total += loss.item() * size
                    n += size
                    in_a_row = 0
                else:
                    nonfinite, in_a_row = nonfinite + 1, in_a_row + 1
                    if in_a_row >= NONFINITE_PATIENCE and not config.skip_nonfinite:
                        raise DivergedError(_diverged(state.step, in_a_row, out_dir, saved_step, config))
                bar.update(state.step, loss.item())
                stop = config.max_steps and state.step >= config.max_steps
                due = config.checkpoint_every and state.step % config.checkpoint_every == 0
                if b < len(batches) and (stop or due):
                    checkpoint(epoch, b, (total, n), nonfinite)  # the epoch's last batch: checkpointed with it
                if stop:
                    break
            if b < len(batches):
                break  # max_steps reached inside the epoch
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            record = dict(
                epoch=epoch + 1,
                step=state.step,
                loss=total / n if n else math.nan,
                epoch_time_s=dt,
                cells_per_s=(n - n0) / dt,
                nonfinite_steps=nonfinite,
            )
            if config.eval_every and (epoch + 1) % config.eval_every == 0 and dist.is_main:
                record["eval"] = evaluate(Run(out_dir, ema, pre, diffusion, config, epoch + 1, []))
            if config.inspect_every and (epoch + 1) % config.inspect_every == 0 and dist.is_main:
                record["whitebox"] = inspect(Run(out_dir, ema, pre, diffusion, config, epoch + 1, []))
            if hook is not None:
                hook.on_epoch_end(record)
            checkpoint(epoch + 1, 0, (0.0, 0), 0, record)
            epochs_done = epoch + 1
            if nonfinite:  # the one bar reports steps; skipped steps are worth a line of their own
                bar.write(f"epoch {epoch + 1}: {nonfinite} non-finite steps skipped")
        bar.close()
        return Run(out_dir, ema, pre, diffusion, config, epochs_done, read_log(out_dir))


@contextlib.contextmanager
def _writing(out_dir: Path, dist: distributed.Dist) -> Iterator[None]:
    """Rank 0 holds the writer lock of ``out_dir`` for the block; if it cannot, every rank raises."""
    with contextlib.ExitStack() as stack:
        refused = None
        if dist.is_main:
            try:
                stack.enter_context(run_lock(out_dir))
            except RunLockedError as exc:
                refused = exc
            else:
                discard_partial(out_dir)  # temporaries of a killed run: no other writer can own them now
        # Every rank learns rank 0's outcome, so that none waits forever at the first collective.
        if float(dist.mean(torch.tensor(float(refused is None), device=dist.device))) < 1:
            raise refused or RunLockedError(f"{out_dir}: rank 0 could not lock the run directory (see its error)")
        yield


def _diverged(step: int, in_a_row: int, out_dir: Path, saved_step: int | None, config: TrainConfig) -> str:
    kept = (
        f"{out_dir} keeps its checkpoint of step {saved_step}"
        if saved_step is not None
        else f"no checkpoint was written to {out_dir}"
    )
    return (
        f"training diverged: the loss or gradient norm was not finite at steps {step - in_a_row + 1} to {step} "
        f"({in_a_row} in a row); they were not applied (the weights are those of step {step - in_a_row}) and "
        f"{kept}. Lower the learning rate (lr={config.lr:g}) or raise warmup_steps (--warmup-steps); to skip "
        "such steps and train on (e.g. bf16 overflow on a GPU), pass skip_nonfinite=True (--skip-nonfinite)"
    )


def _build(
    model: GeneDiT | Callable[[int, int | list[int] | None], GeneDiT] | None, pre: Preprocessor, seed: int
) -> GeneDiT:
    """The model to train: given, or made by a factory once the gene and class counts are known."""
    if not isinstance(model, GeneDiT):
        factory = model or (lambda n, c: WhiteBoxDiT(n_genes=n, num_classes=c, **PRESETS["small"]))
        with torch.random.fork_rng(devices=[]):  # initial weights follow the seed, global RNG untouched
            torch.manual_seed(seed)
            model = factory(pre.n_genes, pre.num_classes)
    _check_model_fits(model, pre)
    return model


def _resume(
    out_dir: Path,
    meta: dict,
    model: GeneDiT,
    ema: torch.nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    discard_bad: bool,
) -> _State:
    """Load the newest usable checkpoint of ``out_dir`` into model, EMA, optimizer and generator."""
    ckpt = load_checkpoint(out_dir, discard_bad=discard_bad)
    _check_resumable(ckpt, meta)
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["optimizer"])
    gen.set_state(ckpt["rng"])
    return _State(
        ckpt["epoch"],
        ckpt["step"],
        ckpt.get("batch", 0),
        tuple(ckpt.get("epoch_loss", (0.0, 0))),
        ckpt.get("epoch_nonfinite", 0),
        ckpt.get("log_line"),
    )


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


def _check_model_fits(model: GeneDiT, pre: Preprocessor) -> None:
    if model.n_genes != pre.n_genes:
        raise ValueError(f"model has n_genes={model.n_genes} but the data has {pre.n_genes} genes after preprocessing")
    sizes = [len(c) for c in pre.label_categories]
    if model.label_sizes != sizes:
        have = f"{pre.num_classes} classes" if len(sizes) < 2 else f"{sizes} classes ({', '.join(pre.label_keys)})"
        raise ValueError(f"model has num_classes={model.num_classes} but the labels have {have}")


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
