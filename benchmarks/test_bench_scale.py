"""The out-of-core data path on CPU: streamed preprocessing and one epoch of batches, backed vs in memory.

    pytest benchmarks/test_bench_scale.py --benchmark-only

A 12,000-cell x 2000-gene synthetic file (sparse CSR, about 70 MB) is written once per
session. Timed: ``Preprocessor.fit`` of a backed AnnData (one pass over the file) against the same on the
loaded matrix, and one epoch of ``CellBatches`` (batch 256, windows of 4096 cells) read from
the file (``LogRows``: read, log-normalize, shuffle, densify) against the in-memory CSR.
The full-size run (100k / 300k / 1M cells, peak RSS, training cells/s) is
``benchmarks/scale.py``.
"""

from __future__ import annotations

import pytest
import torch

from wbdit.batches import CellBatches
from wbdit.data import read_h5ad
from wbdit.datasets import write_synthetic_h5ad
from wbdit.preprocessing import Preprocessor

CELLS, GENES, BATCH = 12_000, 2000, 256
WINDOW = dict(chunk_cells=1024, window_chunks=4)


@pytest.fixture(autouse=True)
def one_thread():
    """The data path is single-threaded: OpenMP spin-waits in its small elementwise ops would
    make it erratic on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cells_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("scale") / "cells.h5ad"
    write_synthetic_h5ad(path, CELLS, GENES, n_types=10, seed=0)
    return path


@pytest.mark.benchmark(group="preprocessing pass (12k cells x 2000 genes)")
@pytest.mark.parametrize("source", ["backed", "in memory"])
def test_fit(benchmark, cells_file, source):
    if source == "backed":
        adata = read_h5ad(cells_file, backed=True)
        benchmark.pedantic(Preprocessor.fit, args=(adata, "cell_type"), rounds=3, warmup_rounds=1)
    else:
        adata = read_h5ad(cells_file)
        benchmark.pedantic(Preprocessor.fit, args=(adata, "cell_type"), rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group="one epoch of batches (12k cells x 2000 genes, batch 256)")
@pytest.mark.parametrize("source", ["backed", "in memory"])
def test_epoch_of_batches(benchmark, cells_file, source):
    pre, logx, labels = Preprocessor.fit(read_h5ad(cells_file), "cell_type")
    if source == "backed":
        _, logx, _ = Preprocessor.fit(read_h5ad(cells_file, backed=True), "cell_type")
    batches = CellBatches(logx, labels, pre, BATCH, **WINDOW)

    def epoch():
        return sum(x.shape[0] for x, _ in batches.epoch(0, 0, "cpu"))

    cells = benchmark.pedantic(epoch, rounds=3, warmup_rounds=1)
    assert cells == len(batches) * BATCH
    benchmark.extra_info["cells_per_s"] = cells / benchmark.stats.stats.mean
