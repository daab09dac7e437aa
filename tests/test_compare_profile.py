"""``wbdit compare`` and ``wbdit profile`` on a CPU at tiny settings: outputs exist, numbers are sane."""

from __future__ import annotations

import importlib.util
import json

import pytest

from wbdit.cli import main
from wbdit.compare import CompareConfig, run_compare
from wbdit.model import build_model
from wbdit.profiling import PeakMemory

TINY = dict(patch_size=10, hidden_size=32, depth=1, num_heads=2)
TINY_ARGS = ["--patch-size", "10", "--hidden-size", "32", "--depth", "1", "--num-heads", "2"]
HAS_EVAL = importlib.util.find_spec("wbdit.evaluation") is not None
MiB = 2**20


@pytest.fixture(autouse=True)
def cpu_fast_paths(monkeypatch):
    """fused=True on CPU takes the CPU fast paths, not the (slow) Triton interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_compare_in_process(tmp_path):
    models = ("wbdit-ref", "wbdit-fused", "dit-ref")
    config = CompareConfig.for_device(
        "cpu",
        size=TINY,
        models=models,
        data="synthetic",
        n_cells=120,
        n_genes=40,
        n_types=2,
        epochs=2,
        batch_size=32,
        eval_every=2 if HAS_EVAL else 0,
        eval_cells=20,
        isolate=False,
    )
    run_compare(tmp_path, config, device="cpu", progress=False)
    report = json.loads((tmp_path / "compare.json").read_text())

    assert list(report["models"]) == list(models)
    assert report["machine"]["device"].startswith("CPU")
    n_train = 120 - round(0.3 * 120)  # stratified hold-out, rounded per type: within a cell or two
    for name, m in report["models"].items():
        arch = name.split("-")[0]
        assert m["params"] == sum(p.numel() for p in build_model(arch, n_genes=40, num_classes=2, **TINY).parameters())
        assert [r["epoch"] for r in m["history"]] == [1, 2]
        for r in m["history"]:
            steps_cells = (n_train // 32) * 32  # whole batches only
            assert r["epoch_time_s"] > 0
            assert abs(r["cells_per_s"] * r["epoch_time_s"] - steps_cells) <= 32
            assert 0.05 < r["loss"] < 2.0  # x0-prediction MSE of a barely trained model: mean x0^2 < 1
            assert 50 * MiB < r["peak_mem_bytes"] < 16 * 2**30  # a torch process's resident set
        assert m["summary"]["timed_epochs"] == [2]  # the first epoch is excluded as warm-up
        if HAS_EVAL:
            assert m["history"][-1]["eval"]["knn_auc"] is None or 0 <= m["history"][-1]["eval"]["knn_auc"] <= 1
    ref, fused = report["models"]["wbdit-ref"], report["models"]["wbdit-fused"]
    assert set(ref["implementations"].values()) == {"reference"}
    assert fused["implementations"]["mssa"] != "reference" and fused["implementations"]["ista"] != "reference"
    # same seed, data and initial weights; the fused CPU paths agree with the reference to float rounding
    assert ref["history"][0]["loss"] == pytest.approx(fused["history"][0]["loss"], abs=1e-4)
    assert report["speed_ratios"]["dit-ref / wbdit-ref"] > 0

    md = (tmp_path / "compare.md").read_text()
    for name in models:
        assert f"| {name} |" in md
    assert "dit-ref / wbdit-ref" in md and "synthetic" in md
    assert _png(tmp_path / "compare_time.png") and _png(tmp_path / "compare_metrics.png")


def test_compare_cli_isolated(tmp_path, capsys):
    """The default path: each variant trains in a fresh process."""
    out = tmp_path / "cmp"
    rc = main(
        [
            "compare",
            "--out",
            str(out),
            "--models",
            "wbdit-fused",
            "--data",
            "synthetic",
            "--n-cells",
            "60",
            "--n-genes",
            "20",
            "--n-types",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--eval-every",
            "0",
            "--device",
            "cpu",
            *TINY_ARGS,
        ]
    )
    assert rc == 0
    assert "| wbdit-fused |" in capsys.readouterr().out
    m = json.loads((out / "compare.json").read_text())["models"]["wbdit-fused"]
    assert m["memory"]["kind"] == "cpu peak rss"
    assert m["memory"]["baseline_bytes"] > 50 * MiB
    assert len(m["history"]) == 1 and m["history"][0]["cells_per_s"] > 0
    assert (out / "runs" / "wbdit-fused" / "checkpoint.pt").exists()


def test_compare_rejects_unknown_variant():
    with pytest.raises(ValueError, match="unknown or no model variants"):
        CompareConfig(models=("wbdit", "transformer"))


def test_peak_memory_resets_on_cpu():
    meter = PeakMemory("cpu")
    block = bytearray(256 * MiB)  # touched: zero-filled pages are resident
    block[::4096] = b"\x01" * len(block[::4096])
    high = meter.peak()
    del block
    meter.reset()
    if meter.scope == "since reset":
        assert high - meter.peak() > 200 * MiB
    else:  # the kernel refused the reset: the peak is the process's lifetime maximum
        assert meter.peak() >= high


def test_profile_cpu(tmp_path, capsys):
    out = tmp_path / "prof"
    assert (
        main(
            [
                "profile",
                "--out",
                str(out),
                "--n-genes",
                "40",
                "--batch-size",
                "8",
                "--warmup",
                "1",
                "--steps",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "ms/step" in capsys.readouterr().out
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::") for n in names) and any("Optimizer.step" in n for n in names)
    assert "aten::" in (out / "top_ops.txt").read_text()
    summary = json.loads((out / "profile.json").read_text())
    assert len(summary["step_ms"]) == 2 and all(ms > 0 for ms in summary["step_ms"])
    assert summary["preset"] == "small" and summary["batch_size"] == 8
    assert not (out / "run").exists()  # the throwaway checkpoint is removed


def test_profile_nsys_prints_command(tmp_path, capsys):
    out = tmp_path / "nsys"
    assert (
        main(
            [
                "profile",
                "--nsys",
                "--out",
                str(out),
                "--n-genes",
                "40",
                "--batch-size",
                "8",
                "--warmup",
                "1",
                "--steps",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi --capture-range-end=stop" in printed
    assert "wbdit profile --nsys --out" in printed
    assert (out / "profile.json").exists() and not (out / "trace.json").exists()
