"""Measured launch configurations: the GPU suite's tile-sweep winners, per GPU architecture.

The Triton ops pick each launch's tiles with built-in heuristics (``kernels/mssa.py``,
``kernels/ista.py``), chosen from compiler resource reports without a GPU. On a GPU,
``benchmarks/gpu_suite.sh`` times the alternatives in :data:`SWEEP` at the seed shape and writes
the fastest correct one per kernel into a winners file. Where that file has an entry for the
running GPU's architecture, the kernels launch with the measured winner instead of the
heuristic, and ``wbdit.ops.report()["tuning"]`` says which winners ran.

The winners file is JSON, one entry per architecture::

    {"sm_90": {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0",
               "date": "2026-11-30", "configs": {"mssa_fwd": {"bfloat16/128": [128, 64, 8, 2]}}}}

A config is the tuple the kernel's heuristic returns (for MSSA: BLOCK_M, BLOCK_N, warps,
stages); its key names what the heuristic depends on (dtype and padded head dim). The file is
``$WBDIT_TUNING`` when set, else ``wbdit/tuning.json`` next to this module. torch only: the
Triton modules call :func:`choose`, and nothing here imports Triton.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Iterator

import torch

ENV = "WBDIT_TUNING"
BUNDLED = Path(__file__).with_name("tuning.json")

# The alternatives the GPU suite times at the seed shape (bf16, as training runs), in the order
# of each kernel's config tuple: MSSA (BLOCK_M, BLOCK_N, warps, stages) keyed by dtype and padded
# head dim (96 -> 128); ISTA (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) keyed by dtype and width.
# Each is compiled ahead of time by ``python -m wbdit.kernels.aot`` for sm_80 and sm_90a
# (benchmarks/RESULTS.md), so every one is known to compile, stay spill-free and fit shared memory
# before a GPU is lent (left out for spilling under Triton 3.6 on sm_80: MSSA forward 128 x 128 and
# ISTA 256 x 128 tiles); the heuristic's own choice is always timed too.
SWEEP: dict[str, dict[str, list[tuple]]] = {
    "mssa_fwd": {"bfloat16/128": [(64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 2), (128, 64, 8, 3)]},
    "mssa_bwd": {"bfloat16/128": [(32, 32, 4, 2), (32, 32, 4, 3), (64, 32, 8, 2), (32, 64, 4, 2), (64, 32, 4, 3)]},
    "ista_fwd": {
        "bfloat16/768": [
            (128, 128, 64, 4, 3),
            (128, 256, 64, 8, 3),
            (128, 128, 64, 8, 4),
            (64, 128, 64, 4, 4),
            (128, 64, 64, 4, 4),
        ]
    },
    "ista_bwd_dx": {
        "bfloat16/768": [(128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (64, 128, 64, 4, 3), (128, 128, 32, 8, 4)]
    },
    "ista_bwd_dB": {
        "bfloat16/768": [(64, 128, 128, 8, 2), (32, 128, 128, 8, 3), (32, 64, 64, 4, 3), (64, 64, 128, 4, 2)]
    },
}

_forced: dict[str, tuple] = {}  # kernel -> config, set by forced() (the sweep, the AOT table)
_arch_override: list[str | None] = []  # set by for_arch() (the AOT table compiles per architecture)
_used: dict[tuple[str, str], tuple] = {}  # (kernel, key) -> measured winner that a launch used


def winners_path() -> Path:
    """The winners file in force: ``$WBDIT_TUNING``, else the one bundled with the package."""
    return Path(os.environ.get(ENV) or BUNDLED)


@functools.lru_cache(maxsize=None)
def _read(path: str, mtime: float) -> dict:
    # Keyed by mtime so that a file the suite rewrites mid-process is read again.
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a winners file maps architectures to entries, got {type(data).__name__}")
    return data


def load(path: str | os.PathLike | None = None) -> dict:
    """The winners file's contents, ``{}`` when it does not exist (a malformed one raises)."""
    p = Path(path) if path is not None else winners_path()
    if not p.is_file():
        return {}
    return _read(str(p), p.stat().st_mtime)


@functools.lru_cache(maxsize=None)
def _capability_arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def current_arch() -> str | None:
    """The current CUDA device's architecture ("sm_90"); None without one. Interpreted launches on
    a machine with a GPU read its winners too: any tile computes the same function."""
    if not torch.cuda.is_available():
        return None
    return _capability_arch(torch.cuda.current_device())


def config_key(dtype: torch.dtype, *dims: int) -> str:
    """The key of a config: the dtype and the sizes the heuristic reads, "bfloat16/128"."""
    return "/".join([str(dtype).replace("torch.", ""), *map(str, dims)])


def choose(kernel: str, key: str, default: tuple) -> tuple:
    """The launch config of ``kernel`` for ``key``: a :func:`forced` one, else the measured winner
    for the running GPU's architecture, else ``default`` (the kernel's heuristic)."""
    if kernel in _forced:
        return _forced[kernel]
    arch = _arch_override[-1] if _arch_override else current_arch()
    if arch is None:
        return default
    winner = load().get(arch, {}).get("configs", {}).get(kernel, {}).get(key)
    if winner is None:
        return default
    config = tuple(winner)
    if len(config) != len(default):
        raise ValueError(f"{winners_path()}: {arch} {kernel} {key} has {config}, expected {len(default)} values")
    if not _arch_override:  # a real launch, not the AOT table's look-up for another architecture
        _used[(kernel, key)] = config
    return config


@contextlib.contextmanager
def forced(configs: dict[str, tuple]) -> Iterator[None]:
    """Within the block, launches of the named kernels use these configs (the sweep times them)."""
    saved = dict(_forced)
    _forced.update(configs)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


@contextlib.contextmanager
def for_arch(arch: str | None) -> Iterator[None]:
    """Within the block, choose configs as on a GPU of ``arch`` ("sm_90"; None: the heuristics),
    GPU or not: the ahead-of-time table compiles what the dispatch would launch there."""
    _arch_override.append(arch)
    try:
        yield
    finally:
        _arch_override.pop()


def describe() -> str:
    """One line for ``wbdit.ops.report()``: which measured winners launches used, or why none."""
    arch = current_arch()
    path = winners_path()
    if _used:
        entry = load().get(arch, {}) if arch else {}
        used = ", ".join(f"{k} {key}" for k, key in sorted(_used))
        return (
            f"measured winners for {arch} ({entry.get('device', '?')}, {entry.get('date', '?')}, from {path}): {used}"
        )
    if arch is None:
        return "built-in heuristics (no CUDA device)"
    if arch not in load():
        return f"built-in heuristics (no winners for {arch} in {path})"
    return f"built-in heuristics ({path} has winners for {arch}, none for the shapes launched)"
