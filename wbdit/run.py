"""A trained run as one object: the EMA model, its preprocessing, diffusion and training settings.

``Run.load(out_dir)`` rebuilds it from the run directory (``wbdit.checkpoint``); the trainer
returns one and the sampler takes one, so neither imports the other.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from wbdit.batches import CHUNK_CELLS, WINDOW_CHUNKS
from wbdit.checkpoint import load_checkpoint, read_log
from wbdit.diffusion import GaussianDiffusion
from wbdit.model import GeneDiT, build_model
from wbdit.preprocessing import Preprocessor

LR_SCHEDULES = ("constant", "cosine")
# The default training length (benchmarks/QUALITY.md, "Training length"): at least MIN_STEPS
# optimizer steps, where 491 PBMC cells stop improving (450 vs 600 epochs), and at least
# MIN_EPOCHS passes over the cells, where 20,000 simulated cells were best (10 epochs: worse).
MIN_STEPS = 6750
MIN_EPOCHS = 16


def steps_per_epoch(n_cells: int, batch_size: int) -> int:
    """Optimizer steps in an epoch: the ragged last batch is dropped, a batch never exceeds the cells."""
    return max(1, n_cells // max(1, min(batch_size, n_cells)))


def default_epochs(n_cells: int, batch_size: int) -> int:
    """Epochs that train ``n_cells`` cells for at least MIN_STEPS steps of ``batch_size`` and MIN_EPOCHS epochs.

    490 cells at batch 32: 450 epochs (6,750 steps); from 13,500 cells on, 16 epochs (20,000
    cells: 10,000 steps).
    """
    return max(MIN_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch(n_cells, batch_size)))


@dataclass
class TrainConfig:
    """Optimisation settings; saved with the checkpoint and checked on resume.

    Defaults are the measured best for the "small" preset on datasets of hundreds to
    thousands of cells (benchmarks/QUALITY.md); the paper's seed recipe is lr 1e-4.
    """

    epochs: int | None = None  # None: ``default_epochs`` for the number of cells (``planned``)
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
    inspect_every: int = 0  # log the white-box measures (wbdit.whitebox) every this many epochs (0: never)
    checkpoint_every: int = 0  # also checkpoint every this many steps (0: at epoch ends only)
    max_steps: int = 0  # stop (and checkpoint) after this many steps in all (0: no limit)
    skip_nonfinite: bool = False  # skip steps with a non-finite loss or gradient and train on (else stop)
    chunk_cells: int = CHUNK_CELLS  # batch order: chunks of consecutive cells in random order,
    window_chunks: int = WINDOW_CHUNKS  # shuffled together this many chunks at a time (batches.epoch_windows)

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")

    def planned(self, n_cells: int) -> "TrainConfig":
        """This config with ``epochs`` set if it is None: enough for ``max_steps`` when that is
        set, else ``default_epochs(n_cells, batch_size)``."""
        if self.epochs is not None:
            return self
        if self.max_steps:
            return replace(self, epochs=math.ceil(self.max_steps / steps_per_epoch(n_cells, self.batch_size)))
        return replace(self, epochs=default_epochs(n_cells, self.batch_size))


@dataclass
class Run:
    """A trained model: EMA weights for sampling, its preprocessing and diffusion."""

    out_dir: Path
    model: GeneDiT
    preprocessor: Preprocessor
    diffusion: GaussianDiffusion
    config: TrainConfig
    epoch: int
    history: list[dict]

    @classmethod
    def load(cls, out_dir: str | os.PathLike, device: torch.device | str = "cpu", fused: bool = True) -> "Run":
        """Load the newest usable checkpoint of ``out_dir``; the model carries the EMA weights, in eval mode.

        An unreadable or non-finite newest checkpoint falls back to the previous one with a
        warning (``wbdit.checkpoint.load_checkpoint``).

        ``fused`` (default) runs the fast paths proven equal to the reference; False the reference.
        """
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
