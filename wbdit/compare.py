"""``wbdit compare``: WB-DiT (reference and fused) against DiT under identical training.

Every model variant trains with ``wbdit.train`` on the same cells, seed, batch size,
optimizer and epochs; every ``eval_every`` epochs the trainer evaluates its EMA model
on ``eval_cells`` generated cells against held-out real cells (``wbdit.evaluation``).
Per epoch we keep wall time and cells/s (training only, evaluation excluded) and peak
memory; per model the parameter count and which op implementations ran.

Each variant trains in a fresh process by default (``isolate=True``), so CPU peak RSS and
CUDA allocator state belong to that variant alone. Outputs in ``out_dir``:
``compare.json``, ``compare.md`` (a markdown table), ``compare_time.png`` (seconds per
epoch) and ``compare_metrics.png`` (loss and evaluation metrics against epoch).
"""

from __future__ import annotations

import json
import shutil
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import torch

from wbdit import datasets, ops
from wbdit.atomic import atomic_path
from wbdit.data import read_h5ad, split_cells, write_h5ad
from wbdit.distributed import default_device
from wbdit.model import PRESETS, build_model
from wbdit.profiling import PeakMemory, describe_machine
from wbdit.run import TrainConfig
from wbdit.tables import format_value
from wbdit.trainer import train

# name -> (architecture, fused)
VARIANTS: dict[str, tuple[str, bool]] = {
    "wbdit-ref": ("wbdit", False),
    "wbdit-fused": ("wbdit", True),
    "dit-ref": ("dit", False),
    "dit-fused": ("dit", True),
}
# the ops each architecture dispatches through wbdit.ops (ops.report() is process-wide)
ARCH_OPS = {
    "wbdit": ("patch_embed", "timestep_embedding", "mssa", "ista"),
    "dit": ("patch_embed", "timestep_embedding", "attention"),
}
STYLES = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]  # identical curves stay visible
LABEL_KEY = "cell_type"
MiB = 2**20


@dataclass
class CompareConfig:
    """What is compared and how; the same for every model variant.

    ``data`` is "pbmc" (700 real cells x 765 genes bundled with scanpy) or "synthetic"
    (``wbdit.datasets.synthetic(n_cells, n_genes, n_types)``). A stratified ``held_out``
    fraction of the cells is never trained on; evaluation compares generated cells with
    it. Optimizer settings default to the demo's measured ones (lr 1e-3, 50 warm-up
    steps, EMA 0.995). ``model`` holds the size (``PRESETS`` keys).
    """

    models: tuple[str, ...] = tuple(VARIANTS)
    preset: str = "small"
    model: dict = field(default_factory=lambda: dict(PRESETS["small"]))
    data: str = "pbmc"
    n_cells: int = 10000
    n_genes: int = 2000
    n_types: int = 10
    held_out: float = 0.3
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=10, batch_size=64, eval_every=5, eval_cells=200)
    )
    isolate: bool = True
    baselines: bool = False  # also run the per-gene Gaussian and resampling baselines through the same evaluator

    def __post_init__(self):
        unknown = [m for m in self.models if m not in VARIANTS]
        if unknown or not self.models:
            raise ValueError(f"unknown or no model variants {list(self.models)}; choose from {list(VARIANTS)}")
        if self.data not in ("pbmc", "synthetic"):
            raise ValueError(f"unknown data {self.data!r}; choose 'pbmc' or 'synthetic'")

    @classmethod
    def for_device(cls, device: torch.device | str, size: dict | None = None, **overrides) -> "CompareConfig":
        """CPU: PBMC cells, "small" preset, batch 64, 10 epochs (minutes).
        CUDA: the seed configuration (hidden 768, depth 3, 8 heads, patch 10) on 10000
        synthetic cells x 2000 genes, batch 256, 10 epochs, 1000 generated cells per evaluation.
        ``overrides`` set any field of this config or of its ``TrainConfig``; ``size``
        overrides some of the preset's model sizes.
        """
        if torch.device(device).type == "cuda":
            base = dict(preset="seed", data="synthetic", batch_size=256, eval_cells=1000)
        else:
            base = dict(preset="small", data="pbmc", batch_size=64, eval_cells=200)
        base.update(overrides)
        base.setdefault("model", {**PRESETS[base["preset"]], **(size or {})})
        train_fields = {f.name for f in fields(TrainConfig)}
        train = {k: base.pop(k) for k in list(base) if k in train_fields}
        train = replace(cls.__dataclass_fields__["train"].default_factory(), **train)
        return cls(train=train, **base)

    def describe_data(self) -> str:
        if self.data == "pbmc":
            return "PBMC68k reduced (scanpy's bundled 10x_pbmc68k_reduced.h5ad): 700 real cells x 765 genes, 10 types"
        return (
            f"synthetic negative-binomial counts (wbdit.datasets.synthetic, seed {self.train.seed}): "
            f"{self.n_cells} cells x {self.n_genes} genes, {self.n_types} types"
        )


def prepare_data(config: CompareConfig, out_dir: Path) -> tuple[Path, Path]:
    """Write the training and held-out cells once, so every variant reads identical data."""
    if config.data == "pbmc":
        adata = datasets.pbmc68k()
    else:
        adata = datasets.synthetic(config.n_cells, config.n_genes, config.n_types, seed=config.train.seed)
    train_idx, test_idx = split_cells(adata, LABEL_KEY, config.held_out, config.train.seed)
    paths = out_dir / "data" / "train.h5ad", out_dir / "data" / "heldout.h5ad"
    for path, idx in zip(paths, (train_idx, test_idx)):
        write_h5ad(adata[idx].copy(), path)
    return paths


class _EpochMemory:
    """Trainer hook: log each epoch's peak memory (``peak_mem_bytes``) and reset the peak.

    The hook runs after the epoch's evaluation, so on evaluation epochs the peak also
    covers generating the evaluated cells.
    """

    def __init__(self, meter: PeakMemory):
        self.meter = meter

    def on_step_end(self, step: int, loss: torch.Tensor) -> None:
        pass

    def on_epoch_end(self, record: dict) -> None:
        record["peak_mem_bytes"] = self.meter.peak()
        self.meter.reset()


def train_variant(
    name: str, config: CompareConfig, data: tuple[str, str], out_dir: str, device: str, progress: bool
) -> dict:
    """Train one variant with ``wbdit.train``; return its parameter count, ops and epoch log."""
    arch, fused = VARIANTS[name]
    real_train, real_test = read_h5ad(data[0]), read_h5ad(data[1])
    torch.manual_seed(config.train.seed)  # same initial weights for the same architecture
    built = []

    def factory(n_genes: int, num_classes: int | None):
        built.append(build_model(arch, n_genes=n_genes, num_classes=num_classes, fused=fused, **config.model))
        return built[-1]

    evaluator = None
    if config.train.eval_every:  # scikit-learn, POT: only when evaluating
        from wbdit.evaluation import during_training

        evaluator = during_training(
            real_test, reference=real_train, n_cells=config.train.eval_cells, seed=config.train.seed
        )
    run_dir = Path(out_dir) / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # compare owns its run directories: start afresh
    meter = PeakMemory(device)
    baseline = meter.current()
    meter.reset()
    run = train(
        real_train,
        factory,
        label_key=LABEL_KEY,
        out_dir=run_dir,
        config=config.train,
        evaluate=evaluator,
        device=device,
        progress=progress,
        hook=_EpochMemory(meter),
        fused=fused,
    )
    return dict(
        name=name,
        arch=arch,
        fused=fused,
        params=sum(p.numel() for p in built[0].parameters()),
        implementations={op: impl for op, impl in ops.report().items() if op in ARCH_OPS[arch]},
        memory=dict(kind=meter.kind, scope=meter.scope, baseline_bytes=baseline),
        history=run.history,
    )


def _train_isolated(*args) -> dict:
    """``train_variant`` in a fresh process (spawned: no CUDA or allocator state is inherited)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(train_variant, *args).result()


def summarize(result: dict) -> dict:
    """Per-model numbers for the table: epoch time and cells/s (median over epochs after the
    first, which carries one-time costs, when there are several), peak memory, final loss,
    the last evaluation."""
    hist = result["history"]
    timed = hist[1:] if len(hist) > 1 else hist
    evals = [r for r in hist if r.get("eval")]
    return dict(
        epoch_time_s=statistics.median(r["epoch_time_s"] for r in timed),
        cells_per_s=statistics.median(r["cells_per_s"] for r in timed),
        timed_epochs=[r["epoch"] for r in timed],
        peak_mem_bytes=max(r["peak_mem_bytes"] for r in hist),
        final_loss=hist[-1]["loss"],
        eval_epoch=evals[-1]["epoch"] if evals else None,
        eval=evals[-1]["eval"] if evals else None,
    )


def speed_ratios(models: dict[str, dict]) -> dict[str, float]:
    """DiT seconds per epoch / WB-DiT seconds per epoch (> 1: WB-DiT is faster), per implementation."""
    out = {}
    for impl in ("ref", "fused"):
        wb, dit = models.get(f"wbdit-{impl}"), models.get(f"dit-{impl}")
        if wb and dit:
            out[f"dit-{impl} / wbdit-{impl}"] = dit["summary"]["epoch_time_s"] / wb["summary"]["epoch_time_s"]
    return out


def run_compare(
    out_dir: str | Path,
    config: CompareConfig | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Train every variant in ``config.models``, then write compare.json, compare.md and the plots."""
    device = torch.device(device) if device is not None else default_device()
    config = config or CompareConfig.for_device(device)
    out = Path(out_dir)
    data = prepare_data(config, out)
    models = {}
    for i, name in enumerate(config.models, 1):
        if progress:
            print(f"[{i}/{len(config.models)}] {name}: {config.train.epochs} epochs on {device}", flush=True)
        args = (name, config, tuple(map(str, data)), str(out), str(device), progress)
        result = _train_isolated(*args) if config.isolate else train_variant(*args)
        result["summary"] = summarize(result)
        models[name] = result
    baselines = {}
    if config.baselines:  # the trivial generators on the same split, through the same evaluator
        from wbdit.evaluation import baseline_headlines  # scikit-learn, POT: only when evaluating

        baselines = baseline_headlines(
            read_h5ad(data[1]), read_h5ad(data[0]), LABEL_KEY, config.train.eval_cells, seed=config.train.seed
        )
    report = dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=describe_machine(device),
        device=str(device),
        data=config.describe_data(),
        config=asdict(config),
        models=models,
        speed_ratios=speed_ratios(models),
        baselines=baselines,
    )
    with atomic_path(out / "compare.json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2))
    with atomic_path(out / "compare.md") as tmp:
        Path(tmp).write_text(markdown(report))
    report["plots"] = plot(report, out)
    return report


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(report: dict) -> str:
    """The comparison as markdown: settings, one row per model, speed ratios, implementations."""
    config, machine = report["config"], report["machine"]
    models = report["models"]
    metric_names = sorted({k for m in models.values() for k in (m["summary"]["eval"] or {})})
    first = next(iter(models.values()))
    mem = first["memory"]
    mem_head = "peak CUDA alloc (MiB)" if mem["kind"].startswith("cuda") else "peak RSS (MiB)"
    timed = first["summary"]["timed_epochs"]
    lines = [
        f"## WB-DiT vs DiT: {config['train']['epochs']} epochs, batch {config['train']['batch_size']}",
        "",
        f"- Machine: {machine['device']} ({machine['cpu_cores']} CPU cores, torch {machine['torch']}, "
        f"{machine['torch_threads']} threads), {report['date']}",
        f"- Data: {report['data']}; {config['held_out']:.0%} held out for evaluation",
        f"- Model size: {config['model']}; AdamW lr {config['train']['lr']}, "
        f"warm-up {config['train']['warmup_steps']} steps, "
        f"EMA {config['train']['ema_decay']}, seed {config['train']['seed']}",
        f"- Time per epoch and cells/s: training only, median over epochs {timed[0]}..{timed[-1]}; "
        f"memory: {mem['kind']} ({mem['scope']}), max over epochs, evaluation epochs included"
        + (
            ""
            if mem["kind"].startswith("cuda")
            else f"; the process held {mem['baseline_bytes'] / MiB:.0f} MiB before training"
        ),
        f"- Evaluation: every {config['train']['eval_every']} epochs, "
        f"{config['train']['eval_cells']} generated cells vs the held-out "
        "cells (PCA space fitted on real cells; see wbdit.evaluation)"
        if config["train"]["eval_every"]
        else "- Evaluation: off",
        "",
        _row(["model", "params", "s/epoch", "cells/s", mem_head, "final loss", *metric_names]),
        _row(["---"] + ["---:"] * (5 + len(metric_names))),
    ]
    for name, m in models.items():
        s = m["summary"]
        evals = s["eval"] or {}
        lines.append(
            _row(
                [
                    name,
                    f"{m['params'] / 1e6:.2f} M",
                    f"{s['epoch_time_s']:.2f}",
                    f"{s['cells_per_s']:.1f}" if s["cells_per_s"] < 100 else f"{s['cells_per_s']:.0f}",
                    f"{s['peak_mem_bytes'] / MiB:.0f}",
                    f"{s['final_loss']:.4f}",
                    *(format_value(evals.get(k)) for k in metric_names),
                ]
            )
        )
    for name, headline in report.get("baselines", {}).items():  # wbdit.baselines, same cells and evaluator
        lines.append(_row([f"baseline: {name}", *["-"] * 5, *(format_value(headline.get(k)) for k in metric_names)]))
    if report["speed_ratios"]:
        lines += [
            "",
            "Per-epoch speed ratio (DiT time / WB-DiT time; > 1 means WB-DiT is faster): "
            + ", ".join(f"{k} = {v:.2f}x" for k, v in report["speed_ratios"].items()),
        ]
    lines += ["", "Op implementations that ran:"]
    lines += [
        f"- {name}: " + ", ".join(f"{op} = {impl}" for op, impl in sorted(m["implementations"].items()))
        for name, m in models.items()
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict, out_dir: Path) -> list[str]:
    """compare_time.png (seconds per epoch) and compare_metrics.png (loss and metrics per epoch)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from wbdit.plots import CURVE_METRICS, save_figure

    models = report["models"]
    paths = []
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for (name, m), (marker, ls) in zip(models.items(), STYLES):
        ax.plot(
            [r["epoch"] for r in m["history"]],
            [r["epoch_time_s"] for r in m["history"]],
            marker=marker,
            ls=ls,
            label=name,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="training time per epoch (s)", title=report["machine"]["device"])
    ax.set_ylim(bottom=0)
    ax.legend()
    paths.append(save_figure(fig, str(out_dir / "compare_time.png")))

    metric_names = sorted(
        {
            k
            for m in models.values()
            for r in m["history"]
            for k, v in (r.get("eval") or {}).items()
            if isinstance(v, (int, float))
        }
    )
    panels = ["loss"] + metric_names
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.5 * cols, 3.5 * rows))
    for i, key in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for (name, m), (marker, ls) in zip(models.items(), STYLES):
            pts = [(r["epoch"], r["loss"] if key == "loss" else (r.get("eval") or {}).get(key)) for r in m["history"]]
            pts = [(e, v) for e, v in pts if isinstance(v, (int, float))]
            ax.plot([e for e, _ in pts], [v for _, v in pts], marker=marker, ls=ls, label=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        label, ideal = CURVE_METRICS.get(key, ("training loss (MSE)" if key == "loss" else key, None))
        if ideal is not None:
            ax.axhline(ideal, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="epoch", ylabel=label)
        if i == 0:
            ax.legend()
    paths.append(save_figure(fig, str(out_dir / "compare_metrics.png")))
    return paths
