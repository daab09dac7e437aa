"""wbdit: the White-Box Diffusion Transformer for single-cell RNA-seq, with fused kernels.

    import wbdit
    adata = wbdit.datasets.pbmc68k()
    model = wbdit.WhiteBoxDiT(n_genes=adata.n_vars, num_classes=10)
    run = wbdit.train(adata, model, label_key="cell_type", epochs=10, out_dir="runs/pbmc")
    gen = wbdit.sample(run, n_cells=1000)

The model, ops, kernels and diffusion need torch and numpy only. The names that read or
write AnnData (``train``, ``sample``, ``datasets``...) or evaluate (``evaluate``) load their
modules on first use, so ``import wbdit`` works without anndata, scanpy or scikit-learn.
"""

import importlib
import os

# OpenMP threads that spin while waiting make small CPU training steps 10-30x slower as soon
# as another process shares the cores (measured: 67 ms vs 530-2700 ms per step on 2 busy
# cores; 68 ms with active waiting on a quiet moment). Read when torch starts OpenMP,
# so it only takes effect if torch was not imported before wbdit; a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from wbdit import ops, reference  # noqa: E402
from wbdit.diffusion import GaussianDiffusion  # noqa: E402
from wbdit.model import DiT, WhiteBoxDiT  # noqa: E402

# name -> module that defines it; loaded on first access (PEP 562)
_LAZY = {
    "datasets": "wbdit.datasets",
    "kernels": "wbdit.kernels",
    "Preprocessor": "wbdit.preprocessing",
    "read_h5ad": "wbdit.data",
    "write_h5ad": "wbdit.data",
    "Run": "wbdit.run",
    "TrainConfig": "wbdit.run",
    "train": "wbdit.trainer",
    "sample": "wbdit.sampling",
    "evaluate": "wbdit.evaluation",
    "inspect": "wbdit.whitebox",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'wbdit' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"wbdit.{name}" else getattr(module, name)
    globals()[name] = value
    return value


__all__ = ["DiT", "GaussianDiffusion", "WhiteBoxDiT", "ops", "reference", *_LAZY]
__version__ = "0.1.0"
