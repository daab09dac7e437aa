"""The run directory's files: ``checkpoint.pt`` (torch.save of one dict) and ``log.jsonl``.

A checkpoint holds the model, EMA and optimizer state, the RNG, the epoch/step/batch reached,
and the configs that rebuild the run (``arch``, ``model_config``, ``diffusion``, ``preprocessor``,
``train_config``) under ``format`` = ``FORMAT_VERSION``. The log has one JSON object per epoch.
Torch only: reading a run needs no data libraries.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from wbdit.atomic import atomic_path

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
FORMAT_VERSION = 1


def load_checkpoint(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict of run directory ``out_dir`` (tensors on the CPU)."""
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint (is {out_dir} a wbdit run directory?)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {ckpt.get('format')} is not {FORMAT_VERSION}")
    return ckpt


def save_checkpoint(out_dir: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: a crash leaves the previous checkpoint, never a partial one."""
    with atomic_path(Path(out_dir) / CHECKPOINT) as tmp:
        torch.save({**state, "format": FORMAT_VERSION}, tmp)


def read_log(out_dir: str | os.PathLike) -> list[dict]:
    """The epoch records of ``out_dir/log.jsonl`` (empty when there is none)."""
    path = Path(out_dir) / LOG
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_log(out_dir: str | os.PathLike, record: dict) -> None:
    """Append one epoch record to ``out_dir/log.jsonl``."""
    with open(Path(out_dir) / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(out_dir: str | os.PathLike, epoch: int) -> None:
    """Drop log lines past ``epoch`` (written by a run killed before its next checkpoint)."""
    kept = [r for r in read_log(out_dir) if r["epoch"] <= epoch]
    with atomic_path(Path(out_dir) / LOG) as tmp:
        Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept))
