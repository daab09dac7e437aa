"""Scale benchmark: out-of-core training on synthetic 100k / 300k / 1M-cell x 2000-gene files (CPU).

    python benchmarks/scale.py                                  # 100k, 300k, 1M cells
    python benchmarks/scale.py --cells 1000000 --steps 200 --data-dir /data/wbdit-scale --json scale.json

For each size the file is written once (cached in ``--data-dir``) by
``wbdit.datasets.write_synthetic_h5ad`` (sparse CSR float32, 10 cell types; about 5.7 kB
per cell on disk, 5.7 GB for 1M cells). Then a fresh child process opens it with
``wbdit.read_h5ad(path, backed=True)`` and measures:

- ``startup_s``: ``wbdit.train`` from the call to the end of its first step: the streamed
  preprocessing pass over every cell (``wbdit.Preprocessor.fit`` on a backed AnnData, O(cells) time),
  building the model, reading the first shuffle window and one step;
- ``train cells/s``: ``wbdit.train(..., max_steps=--steps)`` with a deliberately tiny WB-DiT
  (patch 50, hidden 32, depth 1, 2 heads) so that the data path is a visible part of each
  step; steps 11..S, which include reading a new shuffle window every 128 steps (batch 256);
- ``loader cells/s``: the batch loader alone (``CellBatches`` over ``LogRows``: windows of
  32768 cells read, log-normalized, shuffled, densified per batch) for 3 windows;
- cells per CPU-second (in parentheses): the same cells over the child's CPU time rather
  than wall time; with one thread it is what an idle core would do, and it is much less
  disturbed by other processes on a shared machine than cells/s;
- ``peak RSS``: the child's ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. The parent imports
  neither torch nor wbdit and writes files in their own child, so no large parent peak is
  inherited through fork + exec.

cells/s staying flat from 100k to 1M cells and a peak RSS far below the file size show that
the trainer's memory and per-step cost do not depend on the number of cells; only the
startup pass grows, linearly. The child runs with ``--threads`` torch threads (default 1:
on a shared machine OpenMP spin-waits make multi-threaded tiny steps erratic). With
``--repeats K`` each size runs K children: the table keeps the best throughputs and startup
(contention only slows) and the largest peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODEL = dict(patch_size=50, hidden_size=32, depth=1, num_heads=2)
GENES = 2000
CELL_TYPES = 10
WARMUP_STEPS = 10


def file_for(data_dir: str, n_cells: int, n_genes: int) -> str:
    """The cached synthetic file for a size, written (in a child process) if missing."""
    path = os.path.join(data_dir, f"synthetic_{n_cells}x{n_genes}.h5ad")
    if not os.path.exists(path):
        os.makedirs(data_dir, exist_ok=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "_write", path, str(n_cells), str(n_genes)], check=True)
        print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def write_child(path: str, n_cells: int, n_genes: int) -> None:
    from wbdit.datasets import write_synthetic_h5ad

    write_synthetic_h5ad(path, n_cells, n_genes, n_types=CELL_TYPES, seed=0)


def run_child(path: str, steps: int, batch_size: int, threads: int) -> dict:
    """Train ``steps`` steps on the backed file, then time the loader alone; return the numbers."""
    import resource
    import tempfile

    import torch

    import wbdit
    from wbdit.batches import CHUNK_CELLS, WINDOW_CHUNKS, CellBatches
    from wbdit.data import H5Matrix
    from wbdit.model import WhiteBoxDiT
    from wbdit.preprocessing import LogRows, encode_labels
    from wbdit.trainer import TrainHook

    torch.set_num_threads(threads)

    class Clock(TrainHook):
        def __init__(self):
            self.ends: list[tuple[float, float]] = []  # (wall, this process's CPU time) at each step end

        def on_step_end(self, step, loss):
            self.ends.append((time.perf_counter(), time.process_time()))

    clock = Clock()
    t0 = time.perf_counter()
    adata = wbdit.read_h5ad(path, backed=True)
    with tempfile.TemporaryDirectory() as out:
        run = wbdit.train(
            adata,
            lambda n, c: WhiteBoxDiT(n_genes=n, num_classes=c, **MODEL),
            label_key="cell_type",
            out_dir=out,
            epochs=1,
            max_steps=steps,
            batch_size=batch_size,
            progress=False,
            device="cpu",
            hook=clock,
        )
    (wall0, cpu0), (wall1, cpu1) = clock.ends[WARMUP_STEPS - 1], clock.ends[-1]
    trained = (steps - WARMUP_STEPS) * batch_size

    labels, _ = encode_labels(adata, "cell_type")
    batches = CellBatches(
        LogRows(H5Matrix(adata.filename), run.preprocessor.input_kind, None), labels, run.preprocessor, batch_size
    )
    n_load = min(len(batches), 3 * CHUNK_CELLS * WINDOW_CHUNKS // batch_size)
    t1, c1 = time.perf_counter(), time.process_time()
    for _, _ in zip(range(n_load), batches.epoch(0, 1, "cpu")):
        pass
    load_s, load_cpu_s = time.perf_counter() - t1, time.process_time() - c1
    with open("/proc/self/status") as status:
        hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return dict(
        n_cells=adata.n_obs,
        n_genes=adata.n_vars,
        file_gb=os.path.getsize(path) / 1e9,
        steps=steps,
        batch_size=batch_size,
        threads=threads,
        startup_s=clock.ends[0][0] - t0,
        train_cells_per_s=trained / (wall1 - wall0),
        train_cells_per_cpu_s=trained / (cpu1 - cpu0),
        load_cells_per_s=n_load * batch_size / load_s,
        load_cells_per_cpu_s=n_load * batch_size / load_cpu_s,
        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        vm_hwm_gib=hwm / 2**20,
    )


def best(runs: list[dict]) -> dict:
    """Repeats merged: the best throughput and startup (a busy machine only slows), the largest peak RSS."""
    out = dict(runs[0], repeats=len(runs))
    for key in runs[0]:
        if key.endswith(("per_s", "per_cpu_s")):
            out[key] = max(r[key] for r in runs)
    out["startup_s"] = min(r["startup_s"] for r in runs)
    out["peak_rss_gib"] = max(r["peak_rss_gib"] for r in runs)
    out["vm_hwm_gib"] = max(r["vm_hwm_gib"] for r in runs)
    return out


def markdown(rows: list[dict]) -> str:
    head = (
        "| cells | file (GB) | startup: streamed fit + first step (s) | train cells/s (per CPU-s) "
        "| loader cells/s (per CPU-s) | peak RSS (GiB) |\n|---|---|---|---|---|---|\n"
    )
    return head + "".join(
        f"| {r['n_cells']:,} | {r['file_gb']:.2f} | {r['startup_s']:.0f} "
        f"| {r['train_cells_per_s']:.0f} ({r['train_cells_per_cpu_s']:.0f}) "
        f"| {r['load_cells_per_s']:.0f} ({r['load_cells_per_cpu_s']:.0f}) | {r['peak_rss_gib']:.2f} |\n"
        for r in rows
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_write":
        return write_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        print(json.dumps(run_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))))
        return None
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    p.add_argument("--genes", type=int, default=GENES)
    p.add_argument("--steps", type=int, default=200, help="training steps per size (timed: 11..steps)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch threads in the training child")
    p.add_argument("--repeats", type=int, default=1, help="children per size: best throughput, largest peak RSS")
    p.add_argument("--data-dir", default="/tmp/wbdit-scale", help="where the synthetic files are cached")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    rows = []
    for n in args.cells:
        path = file_for(args.data_dir, n, args.genes)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run(
                [sys.executable, __file__, "_run", path, str(args.steps), str(args.batch_size), str(args.threads)],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if out.returncode != 0:
                sys.exit(f"{n} cells: the training child failed:\n{out.stderr[-3000:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
        rows.append(best(runs))
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
