"""The ``wbdit`` command line: train, sample, evaluate, report, demo."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wbdit.diffusion import PREDICTIONS, SCHEDULES


def _cell_type_count(text: str) -> tuple[str, int]:
    name, sep, count = text.rpartition("=")
    if not sep or not name or not count.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=COUNT, got {text!r}")
    return name, int(count)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def cmd_train(args: argparse.Namespace) -> None:
    from wbdit.data import read_h5ad
    from wbdit.diffusion import GaussianDiffusion
    from wbdit.model import PRESETS, build_model
    from wbdit.trainer import TrainConfig, train

    adata = read_h5ad(args.data)
    size = {**PRESETS[args.preset], **{k: v for k, v in dict(
        patch_size=args.patch_size, hidden_size=args.hidden_size, depth=args.depth, num_heads=args.num_heads,
    ).items() if v is not None}}

    def model(n_genes: int, num_classes: int | None):
        return build_model(args.arch, n_genes=n_genes, num_classes=num_classes, fused=args.fused, **size)

    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         ema_decay=args.ema_decay, eval_every=args.eval_every, warmup_steps=args.warmup_steps)
    run = train(adata, model, label_key=args.label_key, out_dir=args.out, config=config,
                diffusion=GaussianDiffusion(schedule=args.schedule, prediction=args.prediction),
                layer=args.layer, n_top_genes=args.n_top_genes, scaling=args.scaling, resume=args.resume,
                device=args.device)
    last = run.history[-1] if run.history else {}
    print(f"trained {run.epoch} epochs -> {args.out} (loss {last.get('loss', float('nan')):.4f})")


def cmd_sample(args: argparse.Namespace) -> None:
    from wbdit.data import write_h5ad
    from wbdit.sampling import sample

    gen = sample(args.run, n_cells=args.n_cells, cell_types=dict(args.cell_type) if args.cell_type else None,
                 sampler=args.sampler, steps=args.steps, eta=args.eta, cfg_scale=args.cfg_scale,
                 counts=args.counts, seed=args.seed, device=args.device, fused=args.fused or None)
    write_h5ad(gen, args.output)
    print(f"wrote {gen.n_obs} cells x {gen.n_vars} genes -> {args.output}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from wbdit.evaluation import cli_evaluate

    cli_evaluate(args.real, args.generated, args.output, label_key=args.label_key, n_pcs=args.n_pcs, seed=args.seed)


def cmd_report(args: argparse.Namespace) -> None:
    from wbdit.evaluation import plot_training_curves

    for path in plot_training_curves(args.run):
        print(path)


def cmd_demo(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from wbdit.demo import DEMO_CONFIG, run_demo

    config = replace(DEMO_CONFIG, epochs=args.epochs) if args.epochs else DEMO_CONFIG
    summary = run_demo(args.out, config=config, seed=args.seed, device=args.device)
    print(Path(args.out, "summary.txt").read_text())
    print(f"demo finished in {summary['wall_time_s']:.0f} s; outputs in {args.out}/")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wbdit", description="White-Box Diffusion Transformer for single-cell RNA-seq")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model on an .h5ad file")
    t.add_argument("data", help="input .h5ad (raw counts or log-normalized, dense or sparse)")
    t.add_argument("--out", required=True, help="run directory (checkpoint.pt, log.jsonl)")
    t.add_argument("--label-key", help="obs column with cell types (conditional model)")
    t.add_argument("--layer", help="use this layer instead of .X")
    t.add_argument("--n-top-genes", type=_positive_int, help="keep only this many highly variable genes")
    t.add_argument("--scaling", choices=("minmax", "standard"), default="minmax", help="per-gene scaling")
    t.add_argument("--arch", choices=("wbdit", "dit"), default="wbdit", help="WB-DiT or the DiT baseline")
    t.add_argument("--preset", choices=("small", "seed"), default="small", help="model size preset")
    t.add_argument("--patch-size", type=_positive_int)
    t.add_argument("--hidden-size", type=_positive_int)
    t.add_argument("--depth", type=_positive_int)
    t.add_argument("--num-heads", type=_positive_int)
    t.add_argument("--schedule", choices=SCHEDULES, default="linear")
    t.add_argument("--prediction", choices=PREDICTIONS, default="epsilon")
    t.add_argument("--epochs", type=_positive_int, default=100)
    t.add_argument("--batch-size", type=_positive_int, default=128)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--ema-decay", type=float, default=0.999)
    t.add_argument("--eval-every", type=int, default=0, help="evaluate the EMA model every K epochs (0: never)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    t.add_argument("--fused", action="store_true", help="use the fused kernels")
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="generate cells from a trained run")
    s.add_argument("run", help="run directory written by 'wbdit train'")
    s.add_argument("-o", "--output", required=True, help="output .h5ad")
    s.add_argument("--n-cells", type=_positive_int, default=1000)
    s.add_argument("--cell-type", type=_cell_type_count, action="append", metavar="NAME=COUNT",
                   help="cells of a given type (repeatable); the rest follow training proportions")
    s.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    s.add_argument("--steps", type=_positive_int, default=50, help="DDIM steps")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 deterministic, 1 DDPM-like)")
    s.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale")
    s.add_argument("--counts", action="store_true", help="write integer counts (log values in a layer)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fused", action="store_true", help="use the fused kernels")
    s.add_argument("--device")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("evaluate", help="compare generated cells with real ones")
    e.add_argument("real", help="real cells .h5ad")
    e.add_argument("generated", help="generated cells .h5ad")
    e.add_argument("-o", "--output", required=True, help="report directory")
    e.add_argument("--label-key", help="obs column with cell types (in both files)")
    e.add_argument("--n-pcs", type=_positive_int, default=30)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("report", help="plot a run's loss and metrics against epoch")
    r.add_argument("run", help="run directory")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="train on bundled PBMC cells, generate and evaluate (CPU, minutes)")
    d.add_argument("--out", default="wbdit-demo")
    d.add_argument("--epochs", type=_positive_int, help="override the demo's epochs")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, IsADirectoryError, RuntimeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"wbdit {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
