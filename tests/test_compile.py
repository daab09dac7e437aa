"""``train(compile=True)``: the fused model under torch.compile as one graph agrees with eager training.

One tiny run each way (compiling takes tens of seconds on 2 cores; the timing is in
benchmarks/RESULTS.md, not here).
"""
from __future__ import annotations

import torch

from wbdit import datasets
from wbdit.diffusion import GaussianDiffusion
from wbdit.model import WhiteBoxDiT
from wbdit.trainer import train


def test_compiled_training_matches_eager(tmp_path):
    adata = datasets.synthetic(n_cells=48, n_genes=25, n_types=3, markers_per_type=5, seed=0)
    runs = {}
    for compile in (False, True):
        torch._dynamo.reset()
        runs[compile] = train(
            adata, lambda n, c: WhiteBoxDiT(n_genes=n, num_classes=c, patch_size=10, hidden_size=32, depth=1,
                                            num_heads=2),
            label_key="cell_type", out_dir=tmp_path / str(compile), epochs=1, batch_size=16, lr=3e-3,
            diffusion=GaussianDiffusion(num_timesteps=100), device="cpu", progress=False, compile=compile)
    eager, compiled = runs[False], runs[True]
    assert compiled.model.fused and not isinstance(compiled.model, torch._dynamo.eval_frame.OptimizedModule)
    # Three AdamW steps from the same draws: the loss and the EMA weights agree to fp32 rounding
    # (inductor reorders the elementwise sums).
    assert abs(compiled.history[0]["loss"] - eager.history[0]["loss"]) < 1e-5
    for (name, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
