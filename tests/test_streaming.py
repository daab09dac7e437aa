"""Out-of-core training: chunked synthetic writer, streamed preprocessing, backed = in-memory batches,
bounded memory on a file larger than the cap, and kill-and-resume inside an epoch, again and again."""

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import wbdit
from wbdit.batches import CellBatches
from wbdit.checkpoint import CHECKPOINT, LOG, PREVIOUS, load_checkpoint, read_log
from wbdit.data import read_h5ad
from wbdit.datasets import SIM_CHUNK, synthetic, write_synthetic_h5ad
from wbdit.model import WhiteBoxDiT
from wbdit.preprocessing import Preprocessor
from wbdit.runlock import RunLockedError
from wbdit.trainer import TrainHook

TINY = dict(patch_size=10, hidden_size=32, depth=1, num_heads=2)
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as conftest gives this process


@pytest.fixture(scope="module")
def counts_file(tmp_path_factory):
    """A 1,200-cell x 60-gene synthetic counts file (CSR) and the same cells in memory."""
    path = tmp_path_factory.mktemp("streaming") / "counts.h5ad"
    write_synthetic_h5ad(path, n_cells=1200, n_genes=60, n_types=4, markers_per_type=5, seed=3)
    return path, synthetic(n_cells=1200, n_genes=60, n_types=4, markers_per_type=5, seed=3)


def test_written_file_holds_the_synthetic_cells_across_appended_chunks(tmp_path):
    n = SIM_CHUNK + 1500  # two simulation chunks: the second is appended to the file
    write_synthetic_h5ad(tmp_path / "s.h5ad", n_cells=n, n_genes=20, n_types=2, markers_per_type=3, seed=1)
    written, expected = read_h5ad(tmp_path / "s.h5ad"), synthetic(n, 20, 2, 3, seed=1)
    assert written.shape == (n, 20) and written.X.format == "csr"
    assert (written.X != expected.X).nnz == 0
    assert written.obs.equals(expected.obs) and written.var.equals(expected.var)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(label_key="cell_type", n_top_genes=25, scaling="standard"),
    ],
)
def test_streamed_fit_matches_the_in_memory_fit(counts_file, options):
    path, adata = counts_file
    mem, logx, labels = Preprocessor.fit(adata, **options)
    pre, rows, streamed_labels = Preprocessor.fit(read_h5ad(path, backed=True), chunk_cells=250, **options)
    a, b = asdict(mem), asdict(pre)
    # One pipeline: the same float64 moments, summed chunk by chunk, up to summation order.
    for key in (
        "var_names",
        "input_kind",
        "label_keys",
        "label_categories",
        "label_combinations",
        "combination_counts",
        "x_max",
        "zero_threshold",
    ):
        assert a[key] == b[key], key
    np.testing.assert_allclose(b["center"], a["center"], rtol=1e-12)
    np.testing.assert_allclose(b["scale"], a["scale"], rtol=1e-9)
    assert a["log_library"].keys() == b["log_library"].keys()
    for k in a["log_library"]:
        np.testing.assert_allclose(b["log_library"][k], a["log_library"][k], rtol=1e-9)
    if labels is None:
        assert streamed_labels is None
    else:
        np.testing.assert_array_equal(streamed_labels, labels)
    assert rows.shape == logx.shape and (rows[100:420] != logx[100:420]).nnz == 0


def test_streamed_fit_of_log_normalized_input(tmp_path, counts_file):
    _, adata = counts_file
    _, logx, _ = Preprocessor.fit(adata)
    lognorm = adata.copy()
    lognorm.X = logx
    lognorm.write_h5ad(tmp_path / "log.h5ad")
    mem, _, _ = Preprocessor.fit(lognorm, scaling="standard")
    pre, _, _ = Preprocessor.fit(read_h5ad(tmp_path / "log.h5ad", backed=True), scaling="standard", chunk_cells=500)
    assert pre.input_kind == mem.input_kind == "log-normalized" and pre.log_library == {}
    assert pre.x_max == mem.x_max
    np.testing.assert_allclose(pre.scale, mem.scale, rtol=1e-9)


def test_streamed_fit_rejects_what_the_in_memory_fit_rejects(tmp_path, counts_file):
    _, adata = counts_file
    bad = adata.copy()
    X = bad.X.toarray()
    X[700] = 0  # a cell with zero counts in the second chunk
    bad.X = sp.csr_matrix(X)
    bad.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(ValueError, match="1 cells have zero total counts"):
        Preprocessor.fit(read_h5ad(tmp_path / "bad.h5ad", backed=True), chunk_cells=500)
    with pytest.raises(ValueError, match="1 cells have zero total counts"):
        Preprocessor.fit(bad)


def test_backed_and_in_memory_batches_are_identical(counts_file):
    path, adata = counts_file
    pre, logx, labels = Preprocessor.fit(adata, "cell_type")
    _, rows, _ = Preprocessor.fit(read_h5ad(path, backed=True), "cell_type")
    sizes = dict(chunk_cells=100, window_chunks=3)  # 4 windows, batches straddling windows
    mem, backed = CellBatches(logx, labels, pre, 64, **sizes), CellBatches(rows, labels, pre, 64, **sizes)
    assert len(mem) == len(backed) == 1200 // 64
    for epoch in (0, 1):
        a, b = list(mem.epoch(7, epoch, "cpu")), list(backed.epoch(7, epoch, "cpu"))
        assert len(a) == len(b) == len(mem)
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Resuming at batch 5 yields the rest of the epoch; a rank's rows are its slice of each batch.
    tail = list(backed.epoch(7, 1, "cpu", start=5))
    assert all(torch.equal(x, xb) for (x, _), (xb, _) in zip(tail, b[5:])) and len(tail) == len(b) - 5
    half = list(backed.epoch(7, 1, "cpu", rows=slice(32, 64)))
    assert all(torch.equal(x, xb[32:]) and torch.equal(y, yb[32:]) for (x, y), (xb, yb) in zip(half, b))


def test_chunked_order_visits_each_cell_once_and_depends_on_the_epoch(counts_file):
    _, adata = counts_file
    pre, logx, _ = Preprocessor.fit(adata)
    ids = CellBatches(logx, np.arange(1200), pre, 50, chunk_cells=100, window_chunks=3)
    e0 = np.concatenate([y.numpy() for _, y in ids.epoch(0, 0, "cpu")])
    e1 = np.concatenate([y.numpy() for _, y in ids.epoch(0, 1, "cpu")])
    assert sorted(e0) == sorted(e1) == list(range(1200))
    assert not np.array_equal(e0, e1)
    assert len(set(e0[:50] // 100)) > 1  # a batch mixes cells from several chunks


def test_backed_training_equals_in_memory_training(tmp_path, counts_file):
    path, adata = counts_file
    common = dict(
        label_key="cell_type",
        epochs=2,
        batch_size=100,
        lr=1e-3,
        progress=False,
        device="cpu",
        chunk_cells=200,
        window_chunks=2,
    )

    def model(n, c):
        return WhiteBoxDiT(n_genes=n, num_classes=c, **TINY)

    mem = wbdit.train(adata, model, out_dir=tmp_path / "mem", **common)
    backed = wbdit.train(read_h5ad(path, backed=True), model, out_dir=tmp_path / "backed", **common)
    assert [r["loss"] for r in mem.history] == [r["loss"] for r in backed.history]
    a, b = load_checkpoint(tmp_path / "mem")["model"], load_checkpoint(tmp_path / "backed")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


MEMORY_CHILD = """
import json, sys
import torch
import wbdit
import wbdit.trainer  # loaded before the baseline: library code is not the data path's memory
from wbdit.model import WhiteBoxDiT

def rss(field):  # bytes; VmHWM is this process's peak since exec
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))

tiny = dict(patch_size=10, hidden_size=32, depth=1, num_heads=2)
warm = WhiteBoxDiT(n_genes=200, **tiny)  # torch's own first-step allocations are not the data's
opt = torch.optim.AdamW(warm.parameters())
for _ in range(2):
    wbdit.GaussianDiffusion().training_loss(warm, torch.randn(64, 200), None, torch.Generator()).backward()
    opt.step()
base = rss("VmRSS:")
adata = wbdit.read_h5ad(sys.argv[1], backed=True)
wbdit.train(adata, WhiteBoxDiT(n_genes=200, **tiny), out_dir=sys.argv[2], epochs=1, max_steps=30,
            batch_size=64, chunk_cells=512, window_chunks=4, progress=False, device="cpu")
print(json.dumps(dict(growth=rss("VmHWM:") - base)))
"""


def test_a_file_larger_than_the_memory_cap_trains_within_it(tmp_path):
    """60,000 cells x 200 genes: the file (~75 MB) and its matrix in memory exceed the 64 MB cap.

    The child compares its peak RSS with its RSS before opening the file, after warming up
    torch, so the growth is the data path's: streamed fit, windows, batches. It reads VmHWM,
    not getrusage's ru_maxrss: a child started by vfork + exec inherits the parent's (pytest's)
    peak in ru_maxrss.
    """
    cap = 64 * 2**20
    path = tmp_path / "big.h5ad"
    write_synthetic_h5ad(path, n_cells=60000, n_genes=200, n_types=3, seed=0)
    f = read_h5ad(path, backed=True)
    matrix_bytes = f.X.group["data"].nbytes + f.X.group["indices"].nbytes
    assert os.path.getsize(path) > cap and matrix_bytes > cap  # loading it could not fit
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(path), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        env=CHILD_ENV,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["growth"] < cap, f"peak RSS grew {result['growth'] / 2**20:.0f} MiB"
    assert load_checkpoint(tmp_path / "run")["step"] == 30


KILL_CHILD = """
import json, os, signal, sys, time
import torch
import wbdit
from wbdit.model import WhiteBoxDiT
from wbdit.trainer import TrainHook

# argv: data, run dir, losses file, model sizes, train config, fault. The fault {"step": S, "at": A}
# strikes the save of step S: "write" SIGKILLs it half-way through writing the temporary file,
# "rename" between its two renames (the newest checkpoint has just become the previous one),
# "hang" half-way through writing, until the parent kills it; {} runs without a fault.
fault = json.loads(sys.argv[6])
real_save, real_replace, saving = torch.save, os.replace, {}

def dying_save(state, path, *args, **kwargs):
    saving["step"] = state.get("step")
    if fault.get("at") in ("write", "hang") and state.get("step") == fault["step"]:
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        if fault["at"] == "hang":
            time.sleep(600)
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(state, path, *args, **kwargs)

def dying_replace(src, dst):
    if fault.get("at") == "rename" and saving.get("step") == fault["step"] and str(dst).endswith("checkpoint.pt"):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)

torch.save, os.replace = dying_save, dying_replace

class Losses(TrainHook):
    def on_step_end(self, step, loss):
        with open(sys.argv[3], "a") as f:
            f.write(json.dumps(loss.item()) + "\\n")

started = any(os.path.exists(os.path.join(sys.argv[2], f)) for f in ("checkpoint.pt", "checkpoint.prev.pt"))
wbdit.train(wbdit.read_h5ad(sys.argv[1]), lambda n, c: WhiteBoxDiT(n_genes=n, num_classes=c, **json.loads(sys.argv[4])),
            label_key="cell_type", out_dir=sys.argv[2], progress=False, device="cpu", hook=Losses(),
            resume=started, **json.loads(sys.argv[5]))
"""
KILL_CONFIG = dict(epochs=2, batch_size=150, lr=1e-3, checkpoint_every=2, chunk_cells=200, window_chunks=2)


class StepLosses(TrainHook):
    def __init__(self):
        self.losses = []

    def on_step_end(self, step, loss):
        self.losses.append(loss.item())


def tiny_model(n, c):
    return WhiteBoxDiT(n_genes=n, num_classes=c, **TINY)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, counts_file):
    """The run the killed ones must end as: 2 epochs of 8 steps, never interrupted; its step losses."""
    out, ref = tmp_path_factory.mktemp("uninterrupted") / "ref", StepLosses()
    wbdit.train(
        counts_file[1],
        tiny_model,
        label_key="cell_type",
        out_dir=out,
        progress=False,
        device="cpu",
        hook=ref,
        **KILL_CONFIG,
    )
    assert len(ref.losses) == 16
    return out, ref.losses


def kill_child(path, run_dir, losses, config, fault) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILL_CHILD,
            str(path),
            str(run_dir),
            str(losses),
            json.dumps(TINY),
            json.dumps(config),
            json.dumps(fault),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )


def test_killed_mid_epoch_resumes_without_losing_steps_or_corrupting_the_checkpoint(
    tmp_path, counts_file, uninterrupted
):
    """8 steps per epoch, checkpoints every 2: killed inside step 6's save, resumed at batch 4."""
    path, adata = counts_file
    ref_dir, ref_losses = uninterrupted
    killed = tmp_path / "killed"
    child = kill_child(path, killed, tmp_path / "losses.jsonl", KILL_CONFIG, {"step": 6, "at": "write"})
    _, err = child.communicate(timeout=300)
    assert child.returncode == -9, err[-3000:]
    before = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(before, ref_losses[:6], rtol=1e-6)  # ran 6 steps, died saving the 6th
    ckpt = load_checkpoint(killed)  # the step-4 checkpoint, intact beside the half-written file
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (0, 4, 4)
    assert any(p.name.startswith("checkpoint.tmp-") for p in killed.iterdir())

    resumed = StepLosses()
    wbdit.train(
        adata,
        tiny_model,
        label_key="cell_type",
        out_dir=killed,
        progress=False,
        device="cpu",
        resume=True,
        hook=resumed,
        **KILL_CONFIG,
    )
    np.testing.assert_allclose(resumed.losses, ref_losses[4:], rtol=1e-6)  # steps 5..16, none lost
    a, b = load_checkpoint(ref_dir), load_checkpoint(killed)
    assert b["step"] == 16 and b["epoch"] == 2
    assert all(torch.allclose(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-7) for k in a["model"])
    log = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    ref_log = [json.loads(line) for line in (ref_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [8, 16]
    np.testing.assert_allclose([r["loss"] for r in log], [r["loss"] for r in ref_log], rtol=1e-6)
    assert not any(p.name.startswith("checkpoint.tmp-") for p in killed.iterdir())  # the resumed run cleaned up


def test_killed_again_and_again_ends_with_the_uninterrupted_weights(tmp_path, counts_file, uninterrupted):
    """SIGKILL five times, each time resumed by a new process, then run to the end.

    A checkpoint every step, so that a random moment often falls inside a save. Three kills
    strike a save at set points: writing the temporary file (step 3), between its two renames
    (step 7: the newest checkpoint is gone, the previous one must be used), and writing it while
    a second writer tries the same run directory (step 10: refused by the lock, naming the
    child). Two more strike at random moments. The run then ends with the weights, EMA and log
    of the run never interrupted.
    """
    path, adata = counts_file
    ref_dir, _ = uninterrupted
    run_dir, losses = tmp_path / "run", tmp_path / "losses.jsonl"
    config = {**KILL_CONFIG, "checkpoint_every": 1}

    def steps_run() -> int:
        return len(losses.read_text().splitlines()) if losses.exists() else 0

    for fault in ({"step": 3, "at": "write"}, {"step": 7, "at": "rename"}):
        child = kill_child(path, run_dir, losses, config, fault)
        _, err = child.communicate(timeout=300)
        assert child.returncode == -9, err[-3000:]
    assert not (run_dir / CHECKPOINT).exists()
    with pytest.warns(UserWarning, match=r"checkpoint.pt is missing.*previous checkpoint .* step 6\)"):
        assert load_checkpoint(run_dir)["step"] == 6

    child = kill_child(path, run_dir, losses, config, {"step": 10, "at": "hang"})
    deadline = time.monotonic() + 300
    while not (
        (run_dir / CHECKPOINT).exists()
        and list(run_dir.glob("checkpoint.tmp-*.pt"))
        and load_checkpoint(run_dir)["step"] == 9
    ):  # hanging in the save of step 10
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()[1][-3000:]
        time.sleep(0.05)
    with pytest.raises(RunLockedError, match=f"is being written by pid {child.pid} on"):
        wbdit.train(
            adata,
            tiny_model,
            label_key="cell_type",
            out_dir=run_dir,
            resume=True,
            progress=False,
            device="cpu",
            **config,
        )
    child.kill()
    child.communicate()

    rng = random.Random(19)
    for _ in range(2):
        seen, child = steps_run(), kill_child(path, run_dir, losses, config, {})
        while steps_run() == seen and child.poll() is None:  # it is training: kill it at a random moment
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        child.kill()
        child.communicate()

    child = kill_child(path, run_dir, losses, config, {})
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]
    a, b = load_checkpoint(ref_dir), load_checkpoint(run_dir)
    assert (b["epoch"], b["step"]) == (2, 16)
    for part in ("model", "ema"):  # equal up to float rounding: CPU kernels may sum in another order per process
        worst = max(float((a[part][k] - b[part][k]).abs().max()) for k in a[part])
        assert all(torch.allclose(a[part][k], b[part][k], rtol=1e-5, atol=1e-7) for k in a[part]), (part, worst)
    log, ref_log = read_log(run_dir), read_log(ref_dir)
    assert [(r["epoch"], r["step"]) for r in log] == [(r["epoch"], r["step"]) for r in ref_log]
    np.testing.assert_allclose([r["loss"] for r in log], [r["loss"] for r in ref_log], rtol=1e-6)
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([CHECKPOINT, PREVIOUS, LOG])  # nothing half-written
