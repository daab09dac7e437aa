"""wbdit: the White-Box Diffusion Transformer for single-cell RNA-seq, with fused kernels.

    import wbdit
    adata = wbdit.datasets.pbmc68k()
    model = wbdit.WhiteBoxDiT(n_genes=adata.n_vars, num_classes=10)
    run = wbdit.train(adata, model, label_key="cell_type", epochs=10, out_dir="runs/pbmc")
    gen = wbdit.sample(run, n_cells=1000)
"""
from wbdit import datasets, ops, reference
from wbdit.data import Preprocessor, read_h5ad
from wbdit.diffusion import GaussianDiffusion
from wbdit.model import DiT, WhiteBoxDiT
from wbdit.sampling import sample
from wbdit.trainer import Run, TrainConfig, train


def evaluate(real, generated, label_key=None, **kwargs):
    """Compare generated with real cells (see ``wbdit.evaluation.evaluate``)."""
    from wbdit.evaluation import evaluate as _evaluate  # scikit-learn, POT, matplotlib load only when used

    return _evaluate(real, generated, label_key=label_key, **kwargs)


__all__ = [
    "DiT", "GaussianDiffusion", "Preprocessor", "Run", "TrainConfig", "WhiteBoxDiT",
    "datasets", "evaluate", "ops", "read_h5ad", "reference", "sample", "train",
]
__version__ = "0.1.0"
