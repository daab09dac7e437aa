"""Training-step and sampling speed, measured side by side; importable by the other benchmarks.

    python benchmarks/speed.py train [--batch 16] [--rounds 5] [--compile]
    python benchmarks/speed.py sample RUN_DIR [--cells 10000] [--set KEY=VALUE ...]   # wbdit.sample keywords

``train``: one ``wbdit.trainer.train_step`` (forward + loss, backward, clipping, AdamW, EMA) of
each variant of ``wbdit.compare.VARIANTS`` at the seed configuration (2000 genes, hidden 768,
depth 3, 8 heads, patch 10; fp32 without autocast on a CPU), in turn, ``--rounds`` times, so
that the machine's drift hits every variant alike; the ratios are taken round by round and
their median printed. With ``--compile`` the fused variants also run under ``torch.compile``
(inductor, one graph): compile seconds, step time and the first loss against eager. Each step
is put against ``fp32_peak_gflops``, the best rate of a large fp32 matrix product on the same
threads, with ``step_flops`` (FLOPs as torch's FlopCounterMode counts them: matrix products
and attention; elementwise work is not counted).

``sample``: ``wbdit.sample`` as a user calls it (defaults unless given), wall and CPU seconds.

Reusable: ``train_step_fn``, ``step_flops``, ``fp32_peak_gflops``, ``interleaved``,
``sampling_pass`` (``GaussianDiffusion.sample`` with the default sampler settings, model calls
counted; it needs only the torch-only core, not anndata).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import time
from typing import Callable

# Before torch loads OpenMP (wbdit/__init__.py says why): spinning threads on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.utils import flop_counter  # noqa: E402

from wbdit import ops  # noqa: E402
from wbdit.diffusion import DEFAULT_CFG_INTERVAL, DEFAULT_CFG_SCALE, DEFAULT_SAMPLER, GaussianDiffusion  # noqa: E402
from wbdit.model import PRESETS, build_model  # noqa: E402
from wbdit.trainer import train_step  # noqa: E402

VARIANTS = {
    "wbdit-ref": ("wbdit", False),
    "wbdit-fused": ("wbdit", True),
    "dit-ref": ("dit", False),
    "dit-fused": ("dit", True),
}  # as wbdit.compare.VARIANTS, without importing the evaluation layer
NUM_CLASSES = 10


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_fn(
    arch: str,
    fused: bool,
    preset: str = "seed",
    n_genes: int = 2000,
    batch: int = 16,
    device: str = "cpu",
    compile: bool = False,
    seed: int = 0,
) -> tuple[Callable[[], torch.Tensor], dict]:
    """A closure running one trainer step on a fixed batch (B, n_genes) with 10 classes, and its info.

    ``compile``: the model under ``torch.compile(fullgraph=True, dynamic=False)``, as
    ``wbdit.train(compile=True)`` runs it; the first call compiles. Every call ends synchronized.
    The closure returns the step's loss; info holds the parameter count.
    """
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(arch, n_genes=n_genes, num_classes=NUM_CLASSES, fused=fused, **PRESETS[preset]).to(dev)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ops.available()  # import the fast backends before compiling, as wbdit.train does
    net = torch.compile(model, fullgraph=True, dynamic=False) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diffusion = GaussianDiffusion()
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(batch, n_genes, device=dev, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=dev, generator=g)
    t, noise = diffusion.draw_t_noise(batch, n_genes, g, dev)  # the same draws every step and variant

    def step() -> torch.Tensor:
        loss, _ = train_step(net, opt, diffusion, x, y, g, grad_clip=1.0, ema=ema, ema_decay=0.999, t=t, noise=noise)
        sync(dev)
        return loss

    return step, dict(params=sum(p.numel() for p in model.parameters()))


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel that SDPA runs here.
flop_counter.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, get_raw=False)(
    _sdpa_cpu_flops
)
flop_counter.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=False)(
    _sdpa_cpu_backward_flops
)


def step_flops(
    arch: str, fused: bool, preset: str = "seed", n_genes: int = 2000, batch: int = 16, device: str = "cpu"
) -> int:
    """FLOPs of one training forward + backward as executed (matrix products and attention).

    The fused WB-DiT counts its cheaper ISTA (one GEMM per token, DESIGN.md) and its attention as
    SDPA computes it; the reference counts CRATE's three GEMMs and attention as two batched products.
    """
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(arch, n_genes=n_genes, num_classes=NUM_CLASSES, fused=fused, **PRESETS[preset]).to(dev)
    x = torch.randn(batch, n_genes, device=dev)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=dev)
    with flop_counter.FlopCounterMode(display=False) as counter:
        GaussianDiffusion().training_loss(model, x, y, torch.Generator(device=dev).manual_seed(0)).backward()
    return counter.get_total_flops()


def peak_matmul_fn(device: str = "cpu", n: int = 4096) -> tuple[Callable[[], None], int]:
    """A closure running one (n x n) @ (n x n) fp32 product (synchronized), and its FLOPs: the
    best rate the BLAS reaches on this device and torch's threads, the "peak" a step is put against."""
    dev = torch.device(device)
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)

    def matmul() -> None:
        torch.mm(a, b)
        sync(dev)

    return matmul, 2 * n**3


def fp32_peak_gflops(device: str = "cpu", n: int = 4096, repeats: int = 5) -> float:
    """Best GFLOP/s of ``peak_matmul_fn`` over ``repeats`` calls after one warm-up."""
    matmul, flops = peak_matmul_fn(device, n)
    return flops / min(interleaved({"mm": matmul}, repeats)["mm"]) / 1e9


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn: ``warmup`` untimed rounds, then ``rounds`` timed."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


class _CountingModel(torch.nn.Module):
    """Wraps a model; counts the rows it is called on (model calls per cell = rows / cells)."""

    def __init__(self, model: torch.nn.Module, forward: Callable):
        super().__init__()
        self.model, self.forward_fn, self.rows = model, forward, 0
        self.num_classes, self.label_sizes = model.num_classes, model.label_sizes

    def drop_labels(self, y, drop):
        return self.model.drop_labels(y, drop)

    def forward(self, x, t, y=None):
        self.rows += len(x)
        return self.forward_fn(x, t, y)


def sampler_settings(**overrides) -> dict:
    """``GaussianDiffusion.sample`` keywords: ``wbdit.sample``'s default sampler, guidance scale and
    interval (steps: the sampler's default), with ``overrides``."""
    return dict(
        dict(sampler=DEFAULT_SAMPLER, cfg_scale=DEFAULT_CFG_SCALE, cfg_interval=DEFAULT_CFG_INTERVAL), **overrides
    )


def sampling_pass(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    n_cells: int,
    batch_size: int,
    device: str = "cpu",
    compile: bool = False,
    seed: int = 0,
    **settings,
) -> dict:
    """Generate ``n_cells`` cells of a conditional ``model`` (random labels) in batches; time it.

    ``settings`` override ``sampler_settings()``, the sampler, steps and guidance of
    ``wbdit.sample``. ``compile``: the model under ``torch.compile(dynamic=False)`` (guided
    steps double the batch: one more graph), timed after a warm-up pass that compiles.
    Returns seconds, cells/s, model calls per cell and whether every generated value was finite.
    """
    dev = torch.device(device)
    settings = sampler_settings(**settings)
    model = model.to(dev).eval()
    ops.available()  # import the fast backends before compiling, as wbdit.train does
    counted = _CountingModel(model, torch.compile(model, dynamic=False) if compile else model)
    g = torch.Generator(device=dev).manual_seed(seed)
    y = torch.randint(0, model.num_classes, (n_cells,), device=dev, generator=g)

    finite = []

    def run(cells: int) -> None:
        for start in range(0, cells, batch_size):
            n = min(batch_size, cells - start)
            x = diffusion.sample(counted, n, model.n_genes, y=y[start : start + n], generator=g, device=dev, **settings)
            finite.append(torch.isfinite(x).all())
        sync(dev)

    with torch.inference_mode():
        warm = time.perf_counter()
        run(min(batch_size, n_cells))  # compiles, warms the caches and the ISTA matrix
        warm = time.perf_counter() - warm
        counted.rows = 0
        start, cpu = time.perf_counter(), time.process_time()
        run(n_cells)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return dict(
        seconds=seconds,
        cpu_seconds=cpu,
        cells_per_s=n_cells / seconds,
        warmup_s=warm,
        model_calls_per_cell=counted.rows / n_cells,
        finite=bool(torch.stack(finite).all()),
        batch_size=batch_size,
        compiled=compile,
        implementations=ops.report(),
        **settings,
    )


def _summary(xs: list[float]) -> str:
    return f"min {min(xs):.3f} / median {statistics.median(xs):.3f}"


def cmd_train(args: argparse.Namespace) -> None:
    matmul, matmul_flops = peak_matmul_fn()
    fns, flops = {"peak": matmul}, {"peak": matmul_flops}  # the peak is measured in every round too
    for name, (arch, fused) in VARIANTS.items():
        fns[name] = train_step_fn(arch, fused, batch=args.batch)[0]
        flops[name] = step_flops(arch, fused, batch=args.batch)
    compiled = {}
    if args.compile:
        for name in ("wbdit-fused", "dit-fused"):
            arch, fused = VARIANTS[name]
            step, _ = train_step_fn(arch, fused, batch=args.batch, compile=True)
            start = time.perf_counter()
            loss = step()  # compiles forward and backward
            compiled[name] = dict(
                compile_s=time.perf_counter() - start,
                first_loss=float(loss),
                eager_first_loss=float(train_step_fn(arch, fused, batch=args.batch)[0]()),
            )
            fns[name + "-compiled"] = step
            flops[name + "-compiled"] = flops[name]
    times = interleaved(fns, args.rounds)
    peaks = [matmul_flops / s / 1e9 for s in times["peak"]]
    print(
        f"CPU, seed configuration, batch {args.batch}, fp32, {torch.get_num_threads()} threads; {args.rounds} "
        f"rounds in turn; fp32 peak = a 4096^3 matmul in each round: {_summary(peaks)} GFLOP/s"
    )
    print("| variant | step s (min / median) | GFLOP per step | GFLOP/s (median) | of the round's peak (median) |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        if name == "peak":
            continue
        rate = flops[name] / statistics.median(ts) / 1e9
        of_peak = statistics.median((flops[name] / s) / (matmul_flops / p) for s, p in zip(ts, times["peak"]))
        print(f"| {name} | {_summary(ts)} | {flops[name] / 1e9:.1f} | {rate:.0f} | {of_peak:.0%} |")
    for num, den in (
        ("dit-ref", "wbdit-fused"),
        ("dit-fused", "wbdit-fused"),
        ("wbdit-ref", "wbdit-fused"),
        *((n, n + "-compiled") for n in compiled),
    ):
        ratios = [a / b for a, b in zip(times[num], times[den])]
        print(f"{num} / {den}: {_summary(ratios)} (round by round)")
    for name, info in compiled.items():
        print(
            f"{name} compiled: compile {info['compile_s']:.0f} s; first loss {info['first_loss']:.6f} "
            f"vs eager {info['eager_first_loss']:.6f}"
        )
    print(json.dumps(dict(flops=flops, times=times, compiled=compiled, implementations=ops.report())))


def cmd_sample(args: argparse.Namespace) -> None:
    from wbdit.sampling import sample  # anndata: only for this command

    kw = {}
    for item in args.settings:
        key, _, value = item.partition("=")
        kw[key] = (
            tuple(float(v) for v in value.split(","))
            if key == "cfg_interval"
            else value
            if key in ("sampler", "guidance")
            else float(value)
            if key in ("cfg_scale", "eta")
            else int(value)
        )
    start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    adata = sample(args.run, n_cells=args.cells, progress=False, **kw)
    end = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter() - start
    cpu = end.ru_utime - usage.ru_utime + end.ru_stime - usage.ru_stime
    print(
        json.dumps(
            dict(
                cells=adata.n_obs,
                wall_s=wall,
                cpu_s=cpu,
                threads=torch.get_num_threads(),
                settings=adata.uns["wbdit"],
                implementations=ops.report(),
            )
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--rounds", type=int, default=5)
    t.add_argument("--compile", action="store_true")
    t.set_defaults(func=cmd_train)
    s = sub.add_parser("sample")
    s.add_argument("run")
    s.add_argument("--cells", type=int, default=10000)
    s.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a wbdit.sample keyword, e.g. --set sampler=ddim --set cfg_interval=0,1 (repeatable)",
    )
    s.set_defaults(func=cmd_sample)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
