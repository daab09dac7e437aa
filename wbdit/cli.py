"""The ``wbdit`` command line: train, sample, evaluate, report, inspect, demo, compare, profile."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from wbdit.diffusion import (
    DEFAULT_CFG_INTERVAL,
    DEFAULT_CFG_SCALE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    GUIDANCES,
    PREDICTIONS,
    SAMPLERS,
    SCHEDULES,
)
from wbdit.distributed import default_device
from wbdit.errors import MissingKeyError
from wbdit.model import MODELS, PRESETS, build_model
from wbdit.preprocessing import GENE_ORDERS, INPUT_KINDS, SCALINGS, label_candidates
from wbdit.run import LR_SCHEDULES, MIN_EPOCHS, MIN_STEPS, Run, TrainConfig
from wbdit.trainer import DEFAULT_PREDICTION, NONFINITE_PATIENCE

SIZE_FLAGS = ("patch_size", "hidden_size", "depth", "num_heads")  # override the preset's model sizes


def _cell_type_count(text: str) -> tuple[str, int]:
    name, sep, count = text.rpartition("=")
    if not sep or not name or not count.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=COUNT, got {text!r}")
    return name, int(count)


def _condition(text: str) -> tuple[dict[str, str], int]:
    """``COLUMN=VALUE[,COLUMN=VALUE...]:COUNT`` -> ({column: value}, count)."""
    body, sep, count = text.rpartition(":")
    values = {}
    for pair in body.split(",") if sep else []:
        key, eq, value = (part.strip() for part in pair.partition("="))
        if not eq or not key or not value or key in values:
            values = {}
            break
        values[key] = value
    if not values or not count.strip().isdigit():
        raise argparse.ArgumentTypeError(
            f"expected COLUMN=VALUE[,COLUMN=VALUE...]:COUNT with each column once, got {text!r}"
        )
    return values, int(count)


def _cfg_scale(text: str) -> tuple[str | None, float]:
    """``SCALE`` (every label column) or ``COLUMN=SCALE`` -> (column or None, scale)."""
    column, _, value = text.rpartition("=")
    try:
        return column.strip() or None, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SCALE or COLUMN=SCALE, got {text!r}") from None


def _interval(text: str) -> tuple[float, float]:
    """``LO,HI`` -> (lo, hi), fractions of T."""
    lo, sep, hi = text.partition(",")
    try:
        return float(lo), float(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (fractions of T, e.g. 0,1), got {text!r}") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _model_size(args: argparse.Namespace) -> dict:
    """The preset's sizes with the ones given on the command line."""
    given = {k: getattr(args, k) for k in SIZE_FLAGS if getattr(args, k) is not None}
    return {**PRESETS[args.preset], **given} if args.preset else given


def cmd_train(args: argparse.Namespace) -> None:
    from wbdit.data import read_h5ad
    from wbdit.diffusion import GaussianDiffusion
    from wbdit.trainer import train

    adata = read_h5ad(args.data, backed=args.backed)
    looks = {} if args.label_key else label_candidates(adata.obs)
    if looks and os.environ.get("RANK", "0") == "0":
        print(
            "note: no --label-key, so the model is unconditional. obs columns that look like cell types: "
            + ", ".join(f"{k!r} ({n} values)" for k, n in looks.items())
            + f"; condition on one with --label-key {next(iter(looks))}",
            file=sys.stderr,
        )
    size = _model_size(args)

    def model(n_genes: int, num_classes: int | list[int] | None):
        return build_model(args.arch, n_genes=n_genes, num_classes=num_classes, **size)

    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        ema_decay=args.ema_decay,
        eval_every=args.eval_every,
        warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule,
        inspect_every=args.inspect_every,
        checkpoint_every=args.checkpoint_every,
        max_steps=args.max_steps,
        skip_nonfinite=args.skip_nonfinite,
    )
    evaluator = None
    if args.eval_every:
        from wbdit.evaluation import during_training  # scikit-learn, POT: only when evaluating

        held_out = read_h5ad(args.eval_data) if args.eval_data else None
        evaluator = during_training(
            held_out if held_out is not None else adata,
            reference=adata if held_out is not None else None,
            n_cells=config.eval_cells,
            seed=config.seed,
        )
    inspector = None
    if args.inspect_every:
        from wbdit.whitebox import during_training as inspect_during_training

        inspector = inspect_during_training(read_h5ad(args.eval_data) if args.eval_data else adata, seed=config.seed)
    run = train(
        adata,
        model,
        label_key=args.label_key,
        out_dir=args.out,
        config=config,
        diffusion=GaussianDiffusion(schedule=args.schedule, prediction=args.prediction),
        layer=args.layer,
        n_top_genes=args.n_top_genes,
        scaling=args.scaling,
        gene_order=args.gene_order,
        input_kind=args.input_kind,
        resume=args.resume,
        evaluate=evaluator,
        inspect=inspector,
        device=args.device,
        fused=not args.reference,
        compile=args.compile,
    )
    last = run.history[-1] if run.history else {}
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for the run
        loss = last.get("loss")  # None (null in log.jsonl) when every step of the epoch was skipped
        print(f"trained {run.epoch} epochs -> {args.out} (loss {'n/a' if loss is None else f'{loss:.4f}'})")


def cmd_sample(args: argparse.Namespace) -> None:
    from wbdit.data import read_h5ad, write_h5ad
    from wbdit.sampling import sample

    run = Run.load(args.run)
    scales = args.cfg_scale or []
    base = next((w for column, w in reversed(scales) if column is None), None)  # the last bare SCALE
    per_column = {column: w for column, w in scales if column is not None}
    # None: sample()'s default, which also holds for the columns that per_column does not name
    cfg_scale = (
        base
        if not per_column
        else per_column
        if base is None
        else {**dict.fromkeys(run.preprocessor.label_keys, base), **per_column}
    )
    gen = sample(
        run,
        n_cells=args.n_cells,
        cell_types=dict(args.cell_type) if args.cell_type else None,
        conditions=args.condition or (),
        like=read_h5ad(args.like) if args.like else None,
        allow_unseen=args.allow_unseen,
        guidance=args.guidance,
        sampler=args.sampler,
        steps=args.steps,
        eta=args.eta,
        cfg_scale=cfg_scale,
        cfg_interval=args.cfg_interval,
        batch_size=args.batch_size,
        counts=args.counts,
        seed=args.seed,
        device=args.device,
        fused=not args.reference,
        compile=args.compile,
    )
    write_h5ad(gen, args.output)
    print(f"wrote {gen.n_obs} cells x {gen.n_vars} genes -> {args.output}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from wbdit.evaluation import cli_evaluate

    cli_evaluate(
        args.real,
        args.generated,
        args.output,
        label_key=args.label_key,
        n_pcs=args.n_pcs,
        seed=args.seed,
        reference_path=args.reference,
        all_genes=args.all_genes,
        space=args.space,
    )


def cmd_report(args: argparse.Namespace) -> None:
    from wbdit.evaluation import plot_training_curves
    from wbdit.whitebox_report import plot_training_whitebox

    for path in plot_training_curves(args.run) + plot_training_whitebox(args.run):
        print(path)


def cmd_inspect(args: argparse.Namespace) -> None:
    from wbdit.data import read_h5ad
    from wbdit.whitebox import inspect
    from wbdit.whitebox_report import write_report

    cells = read_h5ad(args.data) if args.data else None  # None: the bundled PBMC cells
    t = [int(s) for s in args.t.split(",")] if args.t else args.levels
    found = [
        inspect(
            run,
            cells,
            t=t,
            n_cells=args.n_cells,
            eps=args.eps,
            orthonormal=not args.learned_bases,
            seed=args.seed,
            device=args.device or default_device(),
        )
        for run in args.run
    ]
    paths = write_report(found, args.output)
    print(Path(paths[1]).read_text())
    print("wrote " + ", ".join(paths))


def cmd_demo(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from wbdit.demo import DEMO_CONFIG, run_demo

    config = replace(DEMO_CONFIG, epochs=args.epochs) if args.epochs else DEMO_CONFIG
    summary = run_demo(args.out, config=config, seed=args.seed, device=args.device)
    print(Path(args.out, "summary.txt").read_text())
    print(f"demo finished in {summary['wall_time_s']:.0f} s; outputs in {args.out}/")


def cmd_compare(args: argparse.Namespace) -> None:
    from wbdit.compare import CompareConfig, run_compare

    device = args.device or str(default_device())
    size = {k: getattr(args, k) for k in SIZE_FLAGS if getattr(args, k) is not None}
    overrides = {
        k: v
        for k, v in dict(
            models=tuple(args.models.split(",")) if args.models else None,
            preset=args.preset,
            data=args.data,
            n_cells=args.n_cells,
            n_genes=args.n_genes,
            n_types=args.n_types,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            eval_every=args.eval_every,
            eval_cells=args.eval_cells,
            seed=args.seed,
            isolate=False if args.no_isolate else None,
            baselines=True if args.baselines else None,
        ).items()
        if v is not None
    }
    run_compare(args.out, CompareConfig.for_device(device, size, **overrides), device=device)
    print(Path(args.out, "compare.md").read_text())
    print(f"wrote {args.out}/compare.json, compare.md, compare_time.png, compare_metrics.png")


def cmd_profile(args: argparse.Namespace) -> None:
    from wbdit.profiling import nsys_command, profile_training

    if args.nsys:
        print(
            "Nsight Systems timeline of the measured steps (NVTX ranges included):\n  "
            + nsys_command(args.out, ["wbdit", *args.argv]),
            flush=True,
        )
    s = profile_training(
        args.out,
        arch=args.arch,
        fused=not args.reference,
        preset=args.preset,
        n_genes=args.n_genes,
        batch_size=args.batch_size,
        warmup=args.warmup,
        steps=args.steps,
        nsys=args.nsys,
        device=args.device,
        seed=args.seed,
        model_overrides={k: getattr(args, k) for k in SIZE_FLAGS if getattr(args, k) is not None},
    )
    if not args.nsys:
        print(Path(s["files"]["top_ops"]).read_text())
    print(
        f"{s['arch']} fused={s['fused']} preset={s['preset']} batch {s['batch_size']} on {s['machine']['device']}: "
        f"median {s['median_step_ms']:.1f} ms/step ({s['cells_per_s']:.0f} cells/s) over {s['measured_steps']} steps"
    )
    print(f"wrote {args.out}/profile.json" + ("" if args.nsys else f", {s['files']['trace']}, {s['files']['top_ops']}"))


def _size_parent(default: str | None, help: str) -> argparse.ArgumentParser:
    """--preset and the size flags that override it, shared by train, compare and profile."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--preset", choices=tuple(PRESETS), default=default, help=help)
    for name in SIZE_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=_positive_int, help=f"override the preset's {name}")
    return p


def _common_parent(seed: int | None = 0) -> argparse.ArgumentParser:
    """--seed and --device, shared by every command that computes."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return p


def _ops_parent() -> argparse.ArgumentParser:
    """--reference, shared by the commands that run the model (train, sample, profile)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--reference",
        action="store_true",
        help="run the plain-PyTorch reference ops instead of the fast paths proven equal to it",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wbdit", description="White-Box Diffusion Transformer for single-cell RNA-seq")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common, ops = _common_parent(), _ops_parent()

    t = sub.add_parser(
        "train",
        help="train a model on an .h5ad file",
        parents=[_size_parent("small", "model size preset"), common, ops],
    )
    t.add_argument("data", help="input .h5ad (raw counts, log-normalized or TPM-like values; dense or sparse)")
    t.add_argument("--out", required=True, help="run directory (checkpoint.pt, log.jsonl)")
    t.add_argument(
        "--label-key",
        action="append",
        metavar="COLUMN",
        help="obs column to condition on, e.g. cell types (repeatable: --label-key cell_type "
        "--label-key donor conditions on both, with guidance per column)",
    )
    t.add_argument("--layer", help="use this layer instead of .X")
    t.add_argument("--n-top-genes", type=_positive_int, help="keep only this many highly variable genes")
    t.add_argument("--scaling", choices=SCALINGS, default="minmax", help="per-gene scaling")
    t.add_argument(
        "--gene-order",
        choices=GENE_ORDERS,
        default="cluster",
        help="model-space gene order: correlated genes in one patch (cluster), or the file's (input)",
    )
    t.add_argument("--arch", choices=tuple(MODELS), default="wbdit", help="WB-DiT or the DiT baseline")
    t.add_argument("--schedule", choices=SCHEDULES, default="linear")
    t.add_argument("--prediction", choices=PREDICTIONS, default=DEFAULT_PREDICTION)
    t.add_argument(
        "--epochs",
        type=_positive_int,
        help=f"passes over the cells (default: enough for >= {MIN_STEPS:,} optimizer steps and >= "
        f"{MIN_EPOCHS} epochs, whatever the file's size; --max-steps alone sets the length too)",
    )
    t.add_argument("--batch-size", type=_positive_int, default=TrainConfig.batch_size)
    t.add_argument("--lr", type=float, default=TrainConfig.lr, help="AdamW learning rate (the seed recipe: 1e-4)")
    t.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps)
    t.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=TrainConfig.lr_schedule,
        help="after warmup: constant, or cosine decay to 0 at the last step",
    )
    t.add_argument("--ema-decay", type=float, default=TrainConfig.ema_decay)
    t.add_argument("--eval-every", type=int, default=0, help="evaluate the EMA model every K epochs (0: never)")
    t.add_argument("--eval-data", help="held-out real cells (.h5ad) to evaluate against (default: the training cells)")
    t.add_argument(
        "--inspect-every",
        type=int,
        default=0,
        metavar="K",
        help="log the white-box measures (coding rate, compression, sparsity per block; 'wbdit inspect') "
        "of the EMA model every K epochs on 100 of the --eval-data or training cells (0: never)",
    )
    t.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    t.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="also checkpoint every STEPS steps; --resume continues inside the epoch (0: epoch ends only)",
    )
    t.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in all (0: no limit)")
    t.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip steps whose loss or gradient is NaN/inf and train on, counting them in log.jsonl "
        f"(e.g. bf16 overflow on a GPU); default: stop after {NONFINITE_PATIENCE} in a row",
    )
    t.add_argument(
        "--input-kind",
        choices=tuple(INPUT_KINDS),
        help="what the values are: raw counts, log1p-normalized, or tpm-like (non-integer, not logged); "
        "default: read from the values (integers: counts; non-integer up to 20: log-normalized; above: "
        "tpm-like)",
    )
    t.add_argument(
        "--backed",
        action="store_true",
        help="stream the .h5ad from disk in chunks instead of loading it (for files larger than memory)",
    )
    t.add_argument(
        "--compile",
        action="store_true",
        help="run the training forward under torch.compile (compiles for a while first; see "
        "benchmarks/RESULTS.md for when it pays off)",
    )
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="generate cells from a trained run", parents=[common, ops])
    s.add_argument("run", help="run directory written by 'wbdit train'")
    s.add_argument("-o", "--output", required=True, help="output .h5ad")
    s.add_argument(
        "--n-cells",
        type=_positive_int,
        help="cells to generate (default: the requested total, or 1000 without requests)",
    )
    s.add_argument(
        "--cell-type",
        type=_cell_type_count,
        action="append",
        metavar="NAME=COUNT",
        help="cells of a given type (repeatable); the rest follow training proportions",
    )
    s.add_argument(
        "--condition",
        type=_condition,
        action="append",
        metavar="COLUMN=VALUE[,...]:COUNT",
        help="COUNT cells with these label values, e.g. 'cell_type=CD19+ B,donor=d3:500' "
        "(repeatable); label columns not named follow their training frequencies given the named",
    )
    s.add_argument(
        "--like",
        metavar="TEMPLATE.h5ad",
        help="a synthetic twin: one cell per template cell with its label values, the template's obs "
        "copied, obs_names '<template cell>-twin'",
    )
    s.add_argument(
        "--allow-unseen", action="store_true", help="generate label combinations that never occur in the training data"
    )
    s.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER)
    s.add_argument(
        "--steps",
        type=_positive_int,
        help="model calls per cell, guidance aside (default: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items())
        + "; ddpm takes all T)",
    )
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 deterministic, 1 DDPM-like)")
    s.add_argument(
        "--cfg-scale",
        type=_cfg_scale,
        action="append",
        metavar="[COLUMN=]SCALE",
        help=f"classifier-free guidance scale for every label column (default {DEFAULT_CFG_SCALE}; "
        "unconditional runs: none), or for one column, e.g. --cfg-scale 1.5 --cfg-scale donor=1.0 "
        "(repeatable)",
    )
    s.add_argument(
        "--cfg-interval",
        type=_interval,
        default=DEFAULT_CFG_INTERVAL,
        metavar="LO,HI",
        help="guide only the steps whose t / T lies in [LO, HI]; the others cost one forward pass "
        "instead of two (default {:g},{:g}; 0,1: every step)".format(*DEFAULT_CFG_INTERVAL),
    )
    s.add_argument(
        "--guidance",
        choices=GUIDANCES,
        default="joint",
        help="guidance over several label columns: joint (u + w (c - u) with equal scales) or "
        "compositional (CFGen: u + sum_k w_k (c_k - u)); one column: both the same",
    )
    s.add_argument("--counts", action="store_true", help="write integer counts (log values in a layer)")
    s.add_argument("--batch-size", type=_positive_int, help="cells per batch (default: sized for the device)")
    s.add_argument(
        "--compile",
        action="store_true",
        help="run the model under torch.compile: more cells/s after a first compile of tens of seconds "
        "(pays off from tens of thousands of cells on a CPU)",
    )
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("evaluate", help="compare generated cells with real ones")
    e.add_argument("real", help="real cells .h5ad")
    e.add_argument("generated", help="generated cells .h5ad")
    e.add_argument("-o", "--output", required=True, help="report directory")
    e.add_argument("--label-key", help="obs column with cell types (in both files)")
    e.add_argument(
        "--reference",
        help="the cells the generator was trained on (.h5ad): genes, PCA and baselines "
        "are fit on them, and the downstream-utility classifier trains on them",
    )
    e.add_argument(
        "--all-genes",
        action="store_true",
        help="evaluate on every gene (default: the 2000 most highly variable when there are more)",
    )
    e.add_argument(
        "--space",
        choices=("auto", "joint", "reference"),
        default="auto",
        help="PCA fit on the reference (default with --reference) or on both sides of each comparison",
    )
    e.add_argument("--n-pcs", type=_positive_int, default=30)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("report", help="plot a run's loss and metrics against epoch, optimizer steps and training time")
    r.add_argument("run", help="run directory")
    r.set_defaults(func=cmd_report)

    i = sub.add_parser(
        "inspect",
        help="coding rate, compression and sparsity of every block per noise level "
        "(JSON, tables, heat maps); several runs side by side",
        parents=[common],
    )
    i.add_argument("run", nargs="+", help="run directories (e.g. a WB-DiT and a DiT trained alike)")
    i.add_argument("-o", "--output", required=True, help="output directory (whitebox.json, whitebox.txt, PNGs)")
    i.add_argument("--data", help="real cells (.h5ad) on the runs' genes (default: the bundled PBMC cells)")
    i.add_argument("--n-cells", type=_positive_int, default=500, help="cells used (a seeded random subset)")
    i.add_argument("--levels", type=_positive_int, default=10, help="noise levels, evenly spaced over 0..T-1")
    i.add_argument("--t", help="explicit timesteps instead of --levels, comma-separated, e.g. 0,100,500,999")
    i.add_argument("--eps", type=float, default=0.5, help="coding precision of R and R^c (tokens have unit norm)")
    i.add_argument(
        "--learned-bases",
        action="store_true",
        help="R^c on U's learned columns instead of orthonormal bases of the heads' subspaces",
    )
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser(
        "demo", help="train on bundled PBMC cells, generate and evaluate (CPU, minutes)", parents=[common]
    )
    d.add_argument("--out", default="wbdit-demo")
    d.add_argument("--epochs", type=_positive_int, help="override the demo's epochs")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser(
        "compare",
        help="train WB-DiT (reference, fused) and DiT identically; time, memory, quality",
        parents=[_size_parent(None, "model size (default: seed on CUDA, small on CPU)"), _common_parent(seed=None)],
    )
    c.add_argument("--out", default="wbdit-compare", help="output directory (compare.json, compare.md, plots)")
    c.add_argument("--models", help="comma-separated variants (default: wbdit-ref,wbdit-fused,dit-ref,dit-fused)")
    c.add_argument(
        "--data",
        choices=("pbmc", "synthetic"),
        help="bundled PBMC cells or simulated counts (default: synthetic on CUDA, pbmc on CPU)",
    )
    c.add_argument("--n-cells", type=_positive_int, help="synthetic cells (default 10000)")
    c.add_argument("--n-genes", type=_positive_int, help="synthetic genes (default 2000)")
    c.add_argument("--n-types", type=_positive_int, help="synthetic cell types (default 10)")
    c.add_argument("--epochs", type=_positive_int, help="default 10")
    c.add_argument("--batch-size", type=_positive_int, help="default 256 on CUDA, 64 on CPU")
    c.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-3, the demo's)")
    c.add_argument("--eval-every", type=int, help="evaluate every K epochs, 0: never (default 5)")
    c.add_argument("--eval-cells", type=_positive_int, help="generated cells per evaluation")
    c.add_argument(
        "--no-isolate",
        action="store_true",
        help="train all variants in this process (CPU peak RSS is then reset per epoch where Linux allows it)",
    )
    c.add_argument(
        "--baselines",
        action="store_true",
        help="add rows for the per-gene Gaussian and per-gene "
        "resampling baselines, evaluated like the models' cells on the same held-out cells",
    )
    c.set_defaults(func=cmd_compare)

    f = sub.add_parser(
        "profile",
        help="profile a few training steps (torch.profiler trace, top ops; or --nsys)",
        parents=[_size_parent(None, "default: seed on CUDA, small on CPU"), common, ops],
    )
    f.add_argument("--out", default="wbdit-profile", help="output directory (trace.json, top_ops.txt, profile.json)")
    f.add_argument(
        "--nsys",
        action="store_true",
        help="print the nsys command and bracket the measured steps with cudaProfilerStart/Stop",
    )
    f.add_argument("--arch", choices=tuple(MODELS), default="wbdit")
    f.add_argument("--n-genes", type=_positive_int, default=2000)
    f.add_argument("--batch-size", type=_positive_int, help="default 256 on CUDA, 32 on CPU")
    f.add_argument("--warmup", type=_positive_int, default=3, help="unprofiled warm-up steps")
    f.add_argument("--steps", type=_positive_int, default=5, help="measured steps")
    f.set_defaults(func=cmd_profile)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as given, e.g. for the nsys command line that reruns it
    try:
        args.func(args)
    # What users cause: bad input (InputError and other ValueErrors), missing files and
    # directories, an existing run, failed writes (OSError), a missing extra (ImportError).
    # Anything else is a bug and keeps its traceback.
    except (MissingKeyError, ValueError, OSError, ImportError) as exc:
        print(f"wbdit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
