"""``train(compile=...)`` and ``sample(compile=...)``: the fused model under torch.compile agrees with eager.

The backend here is aot_eager: the same graph capture (fullgraph: a graph break fails) and
AOT autograd through the custom ops as inductor, without inductor's C++ build, which took
6 minutes for this tiny run on a busy 2-core machine. Inductor itself is checked against
eager, with its timing, by benchmarks/test_bench_training.py (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import numpy as np
import torch

from wbdit import datasets, ops
from wbdit.diffusion import GaussianDiffusion
from wbdit.model import WhiteBoxDiT
from wbdit.sampling import sample
from wbdit.trainer import train


def test_compiled_training_matches_eager(tmp_path, monkeypatch):
    adata = datasets.synthetic(n_cells=48, n_genes=25, n_types=3, markers_per_type=5, seed=0)
    runs = {}
    for compile in ("aot_eager", False):  # compiled first, with the fast backends not yet imported:
        torch._dynamo.reset()  # their import inside the graph would break it (train imports them first)
        monkeypatch.setattr(ops, "_backends_loaded", False)
        runs[compile] = train(
            adata,
            lambda n, c: WhiteBoxDiT(n_genes=n, num_classes=c, patch_size=10, hidden_size=32, depth=1, num_heads=2),
            label_key="cell_type",
            out_dir=tmp_path / str(compile),
            epochs=1,
            batch_size=16,
            lr=3e-3,
            diffusion=GaussianDiffusion(num_timesteps=100),
            device="cpu",
            progress=False,
            compile=compile,
        )
    eager, compiled = runs[False], runs["aot_eager"]
    assert compiled.model.fused and not isinstance(compiled.model, torch._dynamo.eval_frame.OptimizedModule)
    # Three AdamW steps from the same draws: the loss and the EMA weights agree to fp32 rounding.
    assert abs(compiled.history[0]["loss"] - eager.history[0]["loss"]) < 1e-5
    for (name, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_sampling_matches_eager(tmp_path, monkeypatch):
    adata = datasets.synthetic(n_cells=32, n_genes=25, n_types=3, markers_per_type=5, seed=0)
    run = train(
        adata,
        WhiteBoxDiT(n_genes=25, num_classes=3, patch_size=10, hidden_size=32, depth=1, num_heads=2),
        label_key="cell_type",
        out_dir=tmp_path / "r",
        epochs=1,
        batch_size=16,
        diffusion=GaussianDiffusion(num_timesteps=100),
        device="cpu",
        progress=False,
    )
    eager = sample(run, n_cells=5, batch_size=3, device="cpu", progress=False)  # a short last batch too
    torch._dynamo.reset()
    monkeypatch.setattr(ops, "_backends_loaded", False)
    compiled = sample(run, n_cells=5, batch_size=3, device="cpu", progress=False, compile="aot_eager")
    np.testing.assert_allclose(compiled.X.toarray(), eager.X.toarray(), rtol=1e-4, atol=1e-5)
