"""White-box measures (wbdit.whitebox) on closed forms, and the inspection on tiny models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import wbdit
from wbdit import datasets
from wbdit.checkpoint import read_log
from wbdit.cli import main
from wbdit.data import write_h5ad
from wbdit.diffusion import GaussianDiffusion
from wbdit.model import DiT, WhiteBoxDiT, modulate
from wbdit.preprocessing import Preprocessor
from wbdit.reference import timestep_embedding
from wbdit.run import Run, TrainConfig
from wbdit.whitebox import (
    EPS,
    block_measures,
    block_taps,
    cells_in_model_space,
    code_sparsity,
    coding_rate,
    compression_rate,
    during_training,
    head_bases,
    inspect,
    noise_levels,
    sparse_rate_reduction,
)
from wbdit.whitebox_report import plot_training_whitebox, write_report

TINY = dict(n_genes=30, patch_size=5, hidden_size=16, depth=2, num_heads=2)


def orthonormal_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q[:n]


@pytest.mark.parametrize("eps", [EPS, 0.1])
def test_coding_rate_of_orthonormal_tokens(eps):
    n, d = 6, 10  # N < d: the N x N Gram is the identity
    expect = n / 2 * math.log(1 + d / (n * eps**2))
    assert coding_rate(orthonormal_rows(n, d), eps).item() == pytest.approx(expect, rel=1e-12)
    # N > d: every basis vector twice, Z^T Z = 2 I_d (the d x d Gram path)
    z = torch.cat([torch.eye(d), torch.eye(d)]).double()
    expect = d / 2 * math.log(1 + d / (2 * d * eps**2) * 2)
    assert coding_rate(z, eps).item() == pytest.approx(expect, rel=1e-12)


@pytest.mark.parametrize("n", [3, 40])
def test_coding_rate_of_identical_tokens(n):
    d = 8
    u = torch.randn(d, dtype=torch.float64)
    z = (u / u.norm()).expand(n, d)  # rank one: one eigenvalue N * d / (N eps^2), whatever N
    assert coding_rate(z).item() == pytest.approx(0.5 * math.log(1 + d / EPS**2), rel=1e-12)


def test_compression_rate_closed_form_and_head_layout():
    d, heads, n = 12, 3, 5
    p = d // heads
    z = torch.eye(d, dtype=torch.float64)[:n]  # tokens e_0..e_4: each lands in exactly one head's coordinates
    rc = compression_rate(z, head_bases(torch.eye(d), heads))  # orthonormalising I changes nothing
    assert rc.item() == pytest.approx(n / 2 * math.log(1 + p / (n * EPS**2)), rel=1e-12)
    # the heads are the blocks of w = z U^T that MSSA reads (w.view(..., heads, p))
    U = torch.randn(d, d, dtype=torch.float64)
    z = torch.randn(2, n, d, dtype=torch.float64)
    w = (z @ U.T).view(2, n, heads, p)
    direct = sum(
        0.5 * torch.logdet(torch.eye(n, dtype=torch.float64) + p / (n * EPS**2) * w[:, :, k] @ w[:, :, k].mT)
        for k in range(heads)
    )
    torch.testing.assert_close(
        compression_rate(z, head_bases(U, heads, orthonormal=False)), direct, rtol=1e-12, atol=1e-12
    )
    # orthonormal bases: R^c depends on the heads' subspaces only, not on a rescaling / mixing inside a head
    mix = torch.block_diag(*[torch.randn(p, p, dtype=torch.float64) + 3 * torch.eye(p) for _ in range(heads)])
    mixed = compression_rate(z, head_bases(mix @ U, heads))
    torch.testing.assert_close(mixed, compression_rate(z, head_bases(U, heads)), rtol=1e-10, atol=1e-10)


def test_measures_invariant_to_token_order():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 9, 12, generator=g, dtype=torch.float64)
    bases = head_bases(torch.randn(12, 12, generator=g, dtype=torch.float64), 4)
    perm = torch.randperm(9, generator=g)
    for f in (
        lambda x: coding_rate(x),
        lambda x: compression_rate(x, bases),
        lambda x: sparse_rate_reduction(x, bases, 0.1),
        lambda x: code_sparsity(x.relu())["hoyer"],
    ):
        torch.testing.assert_close(f(z[:, perm]), f(z), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dictionary", ["identity", "zero"])
def test_sparsity_of_an_ista_step_with_known_dictionary(dictionary):
    model = WhiteBoxDiT(**TINY)
    ista = model.blocks[0].mlp
    with torch.no_grad():  # D = I or D = 0: x D - x D^T D = 0, so the step is relu(x - eta lambda)
        ista.D.copy_(torch.eye(16) if dictionary == "identity" else torch.zeros(16, 16))
    x = torch.linspace(-0.5, 0.5, 2 * 4 * 16).view(2, 4, 16)
    out = ista(x)
    threshold = ista.eta * ista.lmbda
    torch.testing.assert_close(out, torch.relu(x - threshold))
    s = code_sparsity(out)
    expect = (x <= threshold).double().mean((-2, -1))
    torch.testing.assert_close(s["zero_frac"], expect)
    torch.testing.assert_close(s["nonpositive_frac"], expect)


def test_l1_l2_and_hoyer_of_one_hot_and_flat_tokens():
    n = 16
    one_hot = torch.zeros(1, 2, n)
    one_hot[0, :, 3] = 2.0
    flat = torch.full((1, 2, n), -0.5)
    assert code_sparsity(one_hot)["l1_l2"].item() == pytest.approx(1.0)
    assert code_sparsity(one_hot)["hoyer"].item() == pytest.approx(1.0)
    assert code_sparsity(flat)["l1_l2"].item() == pytest.approx(math.sqrt(n))
    assert code_sparsity(flat)["hoyer"].item() == pytest.approx(0.0, abs=1e-12)
    dead = torch.zeros(1, 2, n)
    dead[0, 0, 0] = 1.0  # the all-zero token has no ratio: left out of the mean
    assert code_sparsity(dead)["l1_l2"].item() == pytest.approx(1.0)
    assert code_sparsity(dead)["zero_frac"].item() == pytest.approx(1 - 1 / (2 * n))


def _perturbed(model):
    """Non-zero adaLN gates and final layer, so that the blocks change the residual stream."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("cls", [WhiteBoxDiT, DiT])
def test_taps_read_the_block_without_changing_it(cls):
    model = _perturbed(cls(**TINY))
    x, t = torch.randn(3, 30), torch.tensor([0, 10, 999])
    with torch.no_grad():
        plain = model(x, t)
        with block_taps(model) as taps:
            tapped = model(x, t)
        h = model.x_embedder(x.view(3, 6, 5)) + model.pos_embed
        c = model.t_embedder(timestep_embedding(t))
        block = model.blocks[0]
        s1, sc1, g1, *_ = block.adaLN_modulation(c).chunk(6, dim=1)
        mid = h + g1.unsqueeze(1) * block.attn(modulate(block.norm1(h), s1, sc1))
    torch.testing.assert_close(tapped, plain, rtol=0, atol=0)
    torch.testing.assert_close(taps[(0, "before")], block.norm1(h), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(taps[(0, "after")], block.norm2(mid), rtol=1e-5, atol=1e-5)
    assert taps[(0, "code")].shape == ((3, 6, 16) if cls is WhiteBoxDiT else (3, 6, 64))
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed


def test_fresh_model_blocks_do_not_move_the_residual_stream():
    model = WhiteBoxDiT(**TINY).eval()  # adaLN-Zero: every gate is zero at init
    with torch.no_grad(), block_taps(model) as taps:
        model(torch.randn(4, 30), torch.full((4,), 500))
        m = block_measures(model, taps)
    for b in m:
        torch.testing.assert_close(b["R_before"], b["R_after"])
        torch.testing.assert_close(b["Rc_delta"], torch.zeros_like(b["Rc_delta"]))
        torch.testing.assert_close(b["R_before"], m[0]["R_before"])
        assert (b["zero_frac"] > 0).all()  # the ISTA output itself is not zero, and has zeros
        torch.testing.assert_close(b["srr"], b["code_R"] - b["code_Rc"] - 0.1 * b["code_l1"])


def test_noise_levels():
    diff = GaussianDiffusion()
    assert noise_levels(diff, None) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert noise_levels(diff, 2) == [0, 999]
    assert noise_levels(diff, [5, 7]) == [5, 7]
    with pytest.raises(ValueError, match="0..999"):
        noise_levels(diff, [1000])


def test_inspect_and_report_side_by_side(tmp_path):
    torch.manual_seed(0)
    cells = torch.randn(24, 30)
    model = _perturbed(WhiteBoxDiT(**TINY, num_classes=3))
    wb = inspect(model, cells, t=3, n_cells=20, batch_size=8)
    dit = inspect(DiT(**TINY), cells, t=[0, 500, 999], n_cells=20)
    assert wb.t == dit.t == [0, 500, 999] and wb.n_cells == 20 and wb.conditioning == "null class"
    assert np.asarray(wb.measures["Rc_after"]).shape == (2, 3) and np.isfinite(wb.grid("srr")).all()
    assert "Rc_after" not in dit.measures and np.isnan(dit.grid("Rc_after")).all()
    assert (np.asarray(dit.measures["zero_frac"]) == 0).all()  # GELU units are never exactly zero
    again = inspect(model, cells, t=3, n_cells=20, batch_size=20)
    np.testing.assert_allclose(again.grid("srr"), wb.grid("srr"), rtol=1e-5)  # batching does not matter
    assert wbdit.inspect is inspect  # the package-level name
    paths = write_report([wb, dit], tmp_path)
    assert {p.rsplit("/", 1)[-1] for p in paths} == {
        "whitebox.json",
        "whitebox.txt",
        "whitebox_coding_rate.png",
        "whitebox_sparsity.png",
    }
    doc = json.loads((tmp_path / "whitebox.json").read_text())
    assert [m["arch"] for m in doc["models"]] == ["wbdit", "dit"] and doc["eps"] == EPS
    assert "Rc_delta" in (tmp_path / "whitebox.txt").read_text()


def test_cells_from_anndata_follow_the_run_preprocessing():
    adata = datasets.synthetic(n_cells=40, n_genes=30, n_types=3, markers_per_type=5, seed=0)
    pre, logx, labels = Preprocessor.fit(adata, label_key="cell_type", gene_order="cluster")
    x, y = cells_in_model_space(adata[:, ::-1].copy(), pre)  # genes in another order: matched by name
    torch.testing.assert_close(x, pre.transform(torch.from_numpy(logx.toarray())))
    np.testing.assert_array_equal(y, labels)
    with pytest.raises(ValueError, match="not in the cells"):
        cells_in_model_space(adata[:, 1:].copy(), pre)


def test_training_curves_from_logged_measures(tmp_path):
    adata = datasets.synthetic(n_cells=40, n_genes=30, n_types=3, markers_per_type=5, seed=0)
    pre, _, _ = Preprocessor.fit(adata, label_key="cell_type")
    model = _perturbed(WhiteBoxDiT(**TINY, num_classes=3))
    run = Run(tmp_path, model, pre, GaussianDiffusion(), TrainConfig(), 1, [])
    summary = during_training(adata, n_cells=8, t=2)(run)
    assert summary["t"] == [0, 999] and summary["n_cells"] == 8 and np.asarray(summary["srr"]).shape == (2, 2)
    lines = [dict(epoch=e, loss=1.0, whitebox=summary) for e in (1, 2)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert plot_training_whitebox(tmp_path)[0].endswith("training_whitebox.png")
    (tmp_path / "log.jsonl").write_text(json.dumps(dict(epoch=1, loss=1.0)) + "\n")
    assert plot_training_whitebox(tmp_path) == []


def test_cli_train_inspect_every_inspect_and_report(tmp_path, capsys):
    data = tmp_path / "cells.h5ad"
    write_h5ad(datasets.synthetic(n_cells=48, n_genes=25, n_types=3, markers_per_type=5, seed=0), data)
    out = tmp_path / "run"
    # --reference: the fast paths would run Triton's interpreter here (TRITON_INTERPRET=1), slow and not under test
    tiny = ["--hidden-size", "16", "--depth", "2", "--num-heads", "2", "--patch-size", "5"]
    assert (
        main(
            [
                "train",
                str(data),
                "--label-key",
                "cell_type",
                "--out",
                str(out),
                "--epochs",
                "2",
                "--batch-size",
                "16",
                "--device",
                "cpu",
                "--inspect-every",
                "2",
                "--reference",
                *tiny,
            ]
        )
        == 0
    )
    log = read_log(out)
    assert "whitebox" not in log[0] and np.asarray(log[1]["whitebox"]["Rc_delta"]).shape == (2, 5)
    assert main(["report", str(out)]) == 0
    assert (out / "training_whitebox.png").exists()
    assert (
        main(["inspect", str(out), "--data", str(data), "-o", str(tmp_path / "ins"), "--t", "0,999", "--n-cells", "20"])
        == 0
    )
    doc = json.loads((tmp_path / "ins" / "whitebox.json").read_text())
    assert doc["models"][0]["t"] == [0, 999] and doc["models"][0]["conditioning"] == "cell types"
    assert "Rc_after" in capsys.readouterr().out
