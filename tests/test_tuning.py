"""wbdit.tuning: the dispatch launches with the measured winners for the running GPU's architecture,
says so in ``wbdit.ops.report()``, and falls back to the heuristics everywhere else.

No GPU is needed: ``current_arch`` is patched to name one, and without a GPU the MSSA kernels run
through the Triton interpreter (tests/conftest.py) with the winner's tiles.
"""

import json

import pytest
import torch

pytest.importorskip("triton")

from wbdit import ops, reference, tuning
from wbdit.kernels import aot
from wbdit.kernels import mssa as kmssa

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED = kmssa.MssaShape(256, 200, 8, 96, torch.bfloat16)
KEY = tuning.config_key(torch.bfloat16, 128)
WINNER = (64, 64, 4, 2)  # not the heuristic's (128, 64, 8, 2)
# The interpreter computes 16-bit inputs in fp32 (kernels/common.py), so its launches read fp32 keys.
KEY32, WINNER32 = tuning.config_key(torch.float32, 128), (32, 32, 4, 2)  # heuristic: (16, 32, 4, 2)


def _config(spec):
    return spec.constexprs["BLOCK_M"], spec.constexprs["BLOCK_N"], spec.num_warps, spec.num_stages


@pytest.fixture
def winners(tmp_path, monkeypatch):
    """A winners file for sm_90 in force, and a process that believes it runs on an sm_90 GPU."""
    path = tmp_path / "tuning.json"
    path.write_text(
        json.dumps(
            {
                "sm_90": {
                    "device": "NVIDIA H200",
                    "date": "2026-12-01",
                    "configs": {"mssa_fwd": {KEY: list(WINNER), KEY32: list(WINNER32)}},
                }
            }
        )
    )
    monkeypatch.setenv(tuning.ENV, str(path))
    monkeypatch.setattr(tuning, "current_arch", lambda: "sm_90")
    monkeypatch.setattr(tuning, "_used", {})
    return path


def test_heuristics_without_a_gpu_or_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.ENV, str(tmp_path / "missing.json"))
    heuristic = _config(kmssa.forward_specs(SEED)[0])
    assert tuning.choose("mssa_fwd", KEY, heuristic) == heuristic
    monkeypatch.setattr(tuning, "current_arch", lambda: "sm_90")
    assert _config(kmssa.forward_specs(SEED)[0]) == heuristic
    assert tuning.describe().startswith("built-in heuristics (no winners for sm_90")


def test_winner_for_the_running_arch_is_launched(winners):
    assert _config(kmssa.forward_specs(SEED)[0]) == WINNER
    # Other keys (head dim 64) and kernels (the backward) keep their heuristics.
    d64 = kmssa.MssaShape(256, 200, 12, 64, torch.bfloat16)
    with tuning.for_arch(None):
        heuristic_d64 = _config(kmssa.forward_specs(d64)[0])
        heuristic_bwd = _config(kmssa.backward_specs(SEED)[1])
    assert _config(kmssa.forward_specs(d64)[0]) == heuristic_d64
    assert _config(kmssa.backward_specs(SEED)[1]) == heuristic_bwd
    assert "measured winners for sm_90 (NVIDIA H200, 2026-12-01" in tuning.describe()
    assert "mssa_fwd bfloat16/128" in tuning.describe()


def test_other_arch_and_forced_configs(winners):
    with tuning.for_arch("sm_80"):
        assert _config(kmssa.forward_specs(SEED)[0]) != WINNER
    with tuning.forced({"mssa_fwd": (128, 32, 8, 2)}):
        assert _config(kmssa.forward_specs(SEED)[0]) == (128, 32, 8, 2)
    assert _config(kmssa.forward_specs(SEED)[0]) == WINNER


def test_report_names_the_winners_that_ran(winners):
    # The interpreter launches the winner's tiles; the result is still MSSA.
    w = torch.randn(1, 7, 96, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    out = ops.mssa(w, 1, fused=True)
    rep = ops.report()
    assert rep["mssa"] == "triton"
    assert "measured winners for sm_90" in rep["tuning"] and "mssa_fwd float32/128" in rep["tuning"], rep
    expected = reference.mssa(w.double(), 1)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-5


def test_bad_files_raise(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv(tuning.ENV, str(path))
    monkeypatch.setattr(tuning, "current_arch", lambda: "sm_90")
    path.write_text(json.dumps({"sm_90": {"configs": {"mssa_fwd": {KEY: [64, 64, 4]}}}}))
    with pytest.raises(ValueError, match="expected 4 values"):
        kmssa.forward_specs(SEED)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="maps architectures"):
        tuning.load()


def _tiles(spec):
    """A spec's config tuple as the kernels' heuristics return it: tiles (no BLOCK_D), warps, stages."""
    tiles = tuple(spec.constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in spec.constexprs)
    return tiles + (spec.num_warps, spec.num_stages)


def test_aot_table_covers_winners_and_every_sweep_alternative(winners):
    configs = aot.all_specs()
    fwd = {_config(c.spec): c.roles for c in configs if c.spec.name == "mssa_fwd" and c.dtype == "bfloat16"}
    assert "winner sm_90" in fwd[WINNER]
    # Every kernel the sweep names asks wbdit.tuning for its config: each alternative was compiled.
    for kernel, keys in tuning.SWEEP.items():
        for key, alternatives in keys.items():
            dtype = key.split("/")[0]
            got = {_tiles(c.spec) for c in configs if c.spec.name == kernel and c.dtype == dtype and "sweep" in c.roles}
            assert got == set(alternatives), kernel
