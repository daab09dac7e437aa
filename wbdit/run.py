"""A trained run as one object: the EMA model, its preprocessing, diffusion and training settings.

``Run.load(out_dir)`` rebuilds it from the run directory (``wbdit.checkpoint``); the trainer
returns one and the sampler takes one, so neither imports the other.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from wbdit.batches import CHUNK_CELLS, WINDOW_CHUNKS
from wbdit.checkpoint import load_checkpoint, read_log
from wbdit.diffusion import GaussianDiffusion
from wbdit.model import GeneDiT, build_model
from wbdit.preprocessing import Preprocessor

LR_SCHEDULES = ("constant", "cosine")


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
    skip_nonfinite: bool = False  # skip steps with a non-finite loss or gradient and train on (else stop)
    chunk_cells: int = CHUNK_CELLS  # batch order: chunks of consecutive cells in random order,
    window_chunks: int = WINDOW_CHUNKS  # shuffled together this many chunks at a time (batches.epoch_windows)

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")


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
