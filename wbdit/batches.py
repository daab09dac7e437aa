"""Shuffled mini-batches for the trainer, read in chunks so that cells in memory and cells
streamed from a file see identical batches."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from wbdit.data import sp
from wbdit.nvtx import nvtx_range

CHUNK_CELLS = 2048  # consecutive cells read together: one contiguous block of a file
WINDOW_CHUNKS = 16  # chunks shuffled together: at most 32768 cells held at once


def epoch_windows(
    n_obs: int, seed: int, epoch: int, chunk_cells: int = CHUNK_CELLS, window_chunks: int = WINDOW_CHUNKS
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch's cell order as windows, a pure function of (n_obs, seed, epoch, chunk sizes).

    The cells are cut into chunks of ``chunk_cells`` consecutive cells; the chunks are put in
    random order and taken ``window_chunks`` at a time. Yields, per window, the chunk ids in
    reading order and a permutation of the window's cells (positions in the concatenation
    of those chunks): the order in which they are trained on.
    """
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    chunks = torch.randperm(-(-n_obs // chunk_cells), generator=g).numpy()
    for w in range(0, len(chunks), window_chunks):
        ids = chunks[w : w + window_chunks]
        size = sum(min(chunk_cells, n_obs - c * chunk_cells) for c in ids)
        yield ids, torch.randperm(size, generator=g).numpy()


class CellBatches:
    """Shuffled mini-batches of model-space tensors, densifying one sparse batch at a time.

    ``logx`` is the log-normalized cells x kept genes matrix: a CSR matrix in memory, or any
    object with ``.shape`` whose row slices ``logx[a:b]`` are CSR (``wbdit.preprocessing.LogRows``
    reads them from an ``.h5ad`` file). Both are read in the order of ``epoch_windows``, so an
    in-memory and a backed run see identical batches, and only one window of cells (plus one
    batch) is held at a time.
    """

    def __init__(
        self,
        logx,
        labels: np.ndarray | None,
        pre,
        batch_size: int,
        chunk_cells: int = CHUNK_CELLS,
        window_chunks: int = WINDOW_CHUNKS,
    ):
        if logx.shape[0] == 0:
            raise ValueError("no cells to train on")
        self.logx, self.labels, self.pre = logx, labels, pre
        self.batch_size = min(batch_size, logx.shape[0])
        self.chunk_cells, self.window_chunks = chunk_cells, window_chunks

    def __len__(self) -> int:
        return self.logx.shape[0] // self.batch_size  # drop the ragged last batch: stable batch shapes

    def epoch(
        self, seed: int, epoch: int, device: torch.device | str, start: int = 0, rows: slice = slice(None)
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Batches of one epoch in an order fixed by (seed, epoch), so a resumed run repeats it.

        ``start`` skips the epoch's first batches without reading them (resuming mid-epoch);
        ``rows`` keeps those rows of each batch (a distributed rank's share of the global batch).
        Yields x (rows, n_genes) float32 in model space and labels (rows,) int64 or None.
        """
        n, size, skip, c = self.logx.shape[0], self.batch_size, start * self.batch_size, self.chunk_cells
        ids, part = np.empty(0, np.int64), None  # the cells of a batch begun in the previous window
        end, b = 0, start
        for chunks, perm in epoch_windows(n, seed, epoch, c, self.window_chunks):
            begin, end = end, end + len(perm)
            if end <= skip:
                continue  # every cell of this window belongs to a batch already trained on
            if b >= len(self):
                break
            with nvtx_range("data_load"):
                window = sp.vstack([self.logx[k * c : min((k + 1) * c, n)] for k in chunks], format="csr")
                cells = np.concatenate([np.arange(k * c, min((k + 1) * c, n)) for k in chunks])
            perm = perm[max(skip - begin, 0) :]
            while b < len(self) and len(perm):
                take, perm = perm[: size - len(ids)], perm[size - len(ids) :]
                ids = np.concatenate([ids, cells[take]])
                part = window[take] if part is None else sp.vstack([part, window[take]], format="csr")
                if len(ids) == size:
                    with nvtx_range("data_load"):  # closed before the yield: the range covers loading only
                        x = torch.from_numpy(part[rows].toarray()).to(device)
                        y = None if self.labels is None else torch.from_numpy(self.labels[ids[rows]]).to(device)
                        batch = self.pre.transform(x), y
                    yield batch
                    ids, part, b = ids[:0], None, b + 1
