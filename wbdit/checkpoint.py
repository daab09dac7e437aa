"""The run directory's files: two checkpoints (``checkpoint.pt``, ``checkpoint.prev.pt``) and ``log.jsonl``.

A checkpoint holds the model, EMA and optimizer state, the RNG, the epoch/step/batch reached,
and the configs that rebuild the run (``arch``, ``model_config``, ``diffusion``, ``preprocessor``,
``train_config``) under ``format`` = ``FORMAT_VERSION``. The log has one JSON object per epoch.
Torch only: reading a run needs no data libraries.

What survives a fault: each checkpoint is written to a temporary file, synced to disk and
renamed into place, and the one it replaces becomes ``checkpoint.prev.pt``, so a crash at any
moment leaves at least one complete checkpoint. A checkpoint with a non-finite weight is never
written. ``load_checkpoint`` verifies the newest (it loads, every tensor is finite) and falls
back to the previous one with a warning that says which steps were lost. ``log.jsonl`` is
strict JSON (non-finite numbers are written as null).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from wbdit.atomic import atomic_path
from wbdit.errors import DivergedError

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"  # the checkpoint before the newest, kept for when the newest is unusable
BAD = "checkpoint.bad.pt"  # an unusable newest checkpoint, moved aside by a resuming run
LOG = "log.jsonl"
FORMAT_VERSION = 1
CHECKED = ("model", "ema", "optimizer")  # the parts of a checkpoint whose tensors must be finite
PARTIAL = ("checkpoint.tmp-*.pt", "log.tmp-*.jsonl")  # atomic_path temporaries left by a killed writer


class _Unusable(Exception):
    """A checkpoint file that cannot be used; the message says why."""


def load_checkpoint(out_dir: str | os.PathLike, discard_bad: bool = False) -> dict[str, Any]:
    """The newest usable checkpoint dict of run directory ``out_dir`` (tensors on the CPU).

    The newest checkpoint is used if it loads and all its tensors are finite; otherwise the
    previous one, with a warning naming the step it goes back to. ``discard_bad`` (a run
    that will write here again) moves an unusable newest checkpoint to ``checkpoint.bad.pt``,
    so that the next save does not push the good previous one out.
    """
    newest, previous = Path(out_dir) / CHECKPOINT, Path(out_dir) / PREVIOUS
    if not newest.exists() and not previous.exists():
        raise FileNotFoundError(f"{newest}: no checkpoint (is {out_dir} a wbdit run directory?)")
    try:
        return _read_verified(newest)
    except _Unusable as exc:
        problem = str(exc)
    if not previous.exists():
        raise ValueError(f"{problem}, and there is no previous checkpoint to fall back to")
    try:
        ckpt = _read_verified(previous)
    except _Unusable as exc:
        raise ValueError(f"{problem}, and the previous checkpoint is unusable too: {exc}") from None
    moved = ""
    if discard_bad and newest.exists():
        os.replace(newest, newest.with_name(BAD))
        moved = f"; moved it to {BAD}"
    warnings.warn(
        f"{problem}{moved}. Using the previous checkpoint {previous} (epoch {ckpt['epoch']}, step "
        f"{ckpt['step']}): what was trained after step {ckpt['step']} is lost",
        stacklevel=2,
    )
    return ckpt


def save_checkpoint(out_dir: str | os.PathLike, state: dict[str, Any], record: dict | None = None) -> None:
    """Write ``state`` as the newest checkpoint (the newest so far becomes the previous one), then
    append ``record``, the log line of the epoch it ends, to ``log.jsonl``.

    The file is complete and synced before it takes the name, so a crash at any moment leaves
    the earlier checkpoints intact. The checkpoint keeps a copy of ``record``: a run killed
    before appending it gets the line back when it resumes (``truncate_log``). Raises
    ``DivergedError`` (writing nothing) if a weight of the model, EMA or optimizer state is non-finite.
    """
    bad = nonfinite_tensors(state)
    if bad:
        raise DivergedError(
            f"refusing to write a checkpoint at step {state.get('step')} with non-finite values in "
            f"{_names(bad)}: training diverged; {out_dir} keeps its earlier checkpoints"
        )
    newest = Path(out_dir) / CHECKPOINT
    with atomic_path(newest) as tmp:
        line = None if record is None else _json_line(record)
        torch.save({**state, "format": FORMAT_VERSION, "log_line": line}, tmp)
        with open(tmp, "rb") as f:  # on disk before the rename: a power cut cannot leave a renamed, empty file
            os.fsync(f.fileno())
        if newest.exists():
            os.replace(newest, newest.with_name(PREVIOUS))
    if record is not None:
        append_log(out_dir, record)


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """Names (``ema.blocks.0.attn.U.weight``...) of floating tensors with a NaN or inf in ``CHECKED`` parts."""
    bad: list[str] = []

    def visit(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(name)
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(f"{name}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(f"{name}.{i}", v)

    for part in CHECKED:
        visit(part, state.get(part))
    return bad


def discard_partial(out_dir: str | os.PathLike) -> None:
    """Delete temporaries that killed writers left in ``out_dir``; call it holding the run's lock."""
    for pattern in PARTIAL:
        for path in Path(out_dir).glob(pattern):
            path.unlink(missing_ok=True)


def read_log(out_dir: str | os.PathLike) -> list[dict]:
    """The epoch records of ``out_dir/log.jsonl`` (empty when there is none).

    A last line cut short (a process killed while appending it) is left out.
    """
    path = Path(out_dir) / LOG
    if not path.exists():
        return []
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not text.endswith("\n"):
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    return records


def append_log(out_dir: str | os.PathLike, record: dict) -> None:
    """Append one epoch record to ``out_dir/log.jsonl`` (flushed when this returns)."""
    with open(Path(out_dir) / LOG, "a") as f:
        f.write(_json_line(record))


def truncate_log(out_dir: str | os.PathLike, epoch: int, last_line: str | None = None) -> None:
    """Make ``log.jsonl`` end at ``epoch``, the epoch of the checkpoint a run resumes from.

    Drops lines past it (written by a run killed before its next checkpoint) and, if the run
    was killed between saving the checkpoint and logging, adds ``last_line``, its copy of the line.
    """
    kept = [r for r in read_log(out_dir) if r["epoch"] <= epoch]
    if last_line is not None and (not kept or kept[-1]["epoch"] < epoch):
        kept.append(json.loads(last_line))
    with atomic_path(Path(out_dir) / LOG) as tmp:
        Path(tmp).write_text("".join(_json_line(r) for r in kept))


def _read_verified(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``; ``_Unusable`` if it is missing, unreadable or non-finite."""
    if not path.exists():
        raise _Unusable(f"{path} is missing")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, I/O error: whatever torch raises, the file is unusable
        raise _Unusable(f"{path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict):
        raise _Unusable(f"{path} holds a {type(ckpt).__name__}, not a wbdit checkpoint")
    if ckpt.get("format") != FORMAT_VERSION:  # not damage: another wbdit version wrote it, so no fallback
        raise ValueError(f"{path}: checkpoint format {ckpt.get('format')} is not {FORMAT_VERSION}")
    bad = nonfinite_tensors(ckpt)
    if bad:
        raise _Unusable(f"{path} (step {ckpt.get('step')}) holds non-finite values in {_names(bad)}")
    return ckpt


def _names(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} tensors ({', '.join(names[:shown])}{more})"


def _json_line(record: dict) -> str:
    """``record`` as one line of strict JSON: NaN and infinities become null."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(record), allow_nan=False) + "\n"
