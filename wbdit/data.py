"""AnnData files: reading with errors that name the file, atomic writing, row blocks read on demand."""

from __future__ import annotations

import os

import numpy as np

from wbdit.atomic import atomic_path
from wbdit.errors import InputError, MissingKeyError
from wbdit.extras import require

ad = require("anndata", "reading and writing .h5ad files")
h5py = require("h5py", "reading .h5ad files in row blocks")
sp = require("scipy.sparse", "sparse expression matrices")


def read_h5ad(path: str | os.PathLike, backed: bool = False) -> ad.AnnData:
    """Read an AnnData file with errors that name the file and the problem.

    Not HDF5, HDF5 that HDF5 cannot open (a file cut short: its header records the full size),
    HDF5 without AnnData's ``obs`` and ``var``, or AnnData that anndata cannot read: each is an
    ``InputError`` naming the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, expected an .h5ad file")
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic != b"\x89HDF\r\n\x1a\n":
        raise InputError(f"{path}: not an .h5ad (HDF5) file")
    try:
        with h5py.File(path, "r") as f:
            entries = sorted(f.keys())
    except OSError as exc:
        raise InputError(f"{path}: truncated or damaged, HDF5 cannot open it ({exc})") from None
    if not {"obs", "var"} <= set(entries):
        raise InputError(f"{path}: an HDF5 file but not AnnData (it holds {entries[:8]}; an .h5ad has X, obs and var)")
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:
        raise InputError(f"{path}: could not be read as AnnData: {exc}") from exc


def get_matrix(adata: ad.AnnData, layer: str | None = None):
    """``.X`` or ``.layers[layer]``, with a clear error for an unknown layer."""
    if layer is None:
        if adata.X is None:
            raise ValueError("the AnnData has no .X; pass layer= to use one of its layers")
        return adata.X
    if layer not in adata.layers:
        raise MissingKeyError(f"layer {layer!r} not found; available layers: {sorted(adata.layers)}")
    return adata.layers[layer]


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike) -> None:
    """Write ``adata`` atomically: a failed write leaves no partial file."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


class H5Matrix:
    """Row blocks of an ``.h5ad`` file's ``X`` or ``layers[layer]`` (dense or CSR), read on demand.

    ``matrix[a:b]`` is the rows a..b-1 as a float32 CSR matrix (b - a, n_vars): for CSR, one
    contiguous read of ``data`` and ``indices`` between the rows' ``indptr`` bounds.
    """

    def __init__(self, path: str | os.PathLike, layer: str | None = None):
        self.file = h5py.File(path, "r")
        if layer is not None and layer not in self.file.get("layers", {}):
            raise MissingKeyError(f"layer {layer!r} not found; available layers: {sorted(self.file.get('layers', {}))}")
        elem = self.file["X"] if layer is None else self.file["layers"][layer]
        self.sparse = isinstance(elem, h5py.Group)
        if self.sparse and elem.attrs.get("encoding-type") != "csr_matrix":
            raise ValueError(
                f"{path}: backed training reads rows and needs a CSR or dense matrix, "
                f"not {elem.attrs.get('encoding-type')}; convert with adata.X = adata.X.tocsr()"
            )
        self.elem = elem
        self.shape = tuple(int(d) for d in elem.attrs["shape"]) if self.sparse else elem.shape

    def __getitem__(self, rows: slice) -> sp.csr_matrix:
        start, stop, _ = rows.indices(self.shape[0])
        if not self.sparse:
            return sp.csr_matrix(self.elem[start:stop], dtype=np.float32)
        ptr = self.elem["indptr"][start : stop + 1].astype(np.int64)
        data = self.elem["data"][ptr[0] : ptr[-1]].astype(np.float32, copy=False)
        return sp.csr_matrix(
            (data, self.elem["indices"][ptr[0] : ptr[-1]], ptr - ptr[0]), shape=(stop - start, self.shape[1])
        )


class MatrixRows:
    """Row blocks of an in-memory matrix (dense or sparse) as float32 CSR, like ``H5Matrix``."""

    def __init__(self, X):
        self.X, self.shape = X, X.shape

    def __getitem__(self, rows: slice) -> sp.csr_matrix:
        return sp.csr_matrix(self.X[rows], dtype=np.float32)


def matrix_rows(adata: ad.AnnData, layer: str | None = None) -> MatrixRows | H5Matrix:
    """Row-block reader of ``.X`` or ``.layers[layer]``: from the file when ``adata`` is backed."""
    if adata.isbacked:
        return H5Matrix(adata.filename, layer)
    return MatrixRows(get_matrix(adata, layer))


def split_cells(adata: ad.AnnData, label_key: str, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: (train indices, held-out indices) with ``fraction`` of each type held out."""
    rng = np.random.default_rng(seed)
    held = []
    for name in adata.obs[label_key].unique():
        idx = np.flatnonzero(adata.obs[label_key].to_numpy() == name)
        held.extend(rng.choice(idx, size=int(round(fraction * len(idx))), replace=False))
    held_out = np.sort(np.asarray(held, dtype=np.int64))
    return np.setdiff1d(np.arange(adata.n_obs), held_out), held_out
