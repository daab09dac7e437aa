"""Training-step and sampling speed, measured side by side; importable by the other benchmarks.

    python benchmarks/speed.py train [--batch 16] [--rounds 5] [--compile]
    python benchmarks/speed.py sample RUN_DIR [--cells 10000] [wbdit.sample settings as KEY=VALUE]

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
import resource
import statistics
import time
from typing import Callable

import torch
from torch.utils import flop_counter

from wbdit import ops
from wbdit.diffusion import DEFAULT_CFG_INTERVAL, DEFAULT_CFG_SCALE, DEFAULT_SAMPLER, GaussianDiffusion
from wbdit.model import PRESETS, build_model
from wbdit.trainer import train_step

VARIANTS = {"wbdit-ref": ("wbdit", False), "wbdit-fused": ("wbdit", True), "dit-ref": ("dit", False),
            "dit-fused": ("dit", True)}  # as wbdit.compare.VARIANTS, without importing the evaluation layer
NUM_CLASSES = 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_fn(arch: str, fused: bool, preset: str = "seed", n_genes: int = 2000, batch: int = 16,
                  device: str = "cpu", compile: bool = False, seed: int = 0) -> tuple[Callable[[], torch.Tensor], dict]:
    """A closure running one trainer step on a fixed batch (B, n_genes) with 10 classes, and its info.

    ``compile``: the model under ``torch.compile(fullgraph=True, dynamic=False)``, as
    ``wbdit.train(compile=True)`` runs it; the first call compiles. Every call ends synchronized.
    The closure returns the step's loss; info holds the parameter count.
    """
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(arch, n_genes=n_genes, num_classes=NUM_CLASSES, fused=fused, **PRESETS[preset]).to(dev)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    net = torch.compile(model, fullgraph=True, dynamic=False) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diffusion = GaussianDiffusion()
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(batch, n_genes, device=dev, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=dev, generator=g)
    t, noise = diffusion.draw_t_noise(batch, n_genes, g, dev)  # the same draws every step and variant

    def step() -> torch.Tensor:
        loss = train_step(net, opt, diffusion, x, y, g, grad_clip=1.0, ema=ema, ema_decay=0.999, t=t, noise=noise)
        _sync(dev)
        return loss

    return step, dict(params=sum(p.numel() for p in model.parameters()))


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel that SDPA runs here.
flop_counter.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                                   get_raw=False)(_sdpa_cpu_flops)
flop_counter.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
                                   get_raw=False)(_sdpa_cpu_backward_flops)


def step_flops(arch: str, fused: bool, preset: str = "seed", n_genes: int = 2000, batch: int = 16,
               device: str = "cpu") -> int:
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


def fp32_peak_gflops(device: str = "cpu", n: int = 4096, repeats: int = 5) -> float:
    """Best GFLOP/s of an (n x n) @ (n x n) fp32 product on this device and torch's threads."""
    dev = torch.device(device)
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    torch.mm(a, b)
    _sync(dev)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(dev)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


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


def sampling_pass(model: torch.nn.Module, diffusion: GaussianDiffusion, n_cells: int, batch_size: int,
                  device: str = "cpu", compile: bool = False, seed: int = 0, **settings) -> dict:
    """Generate ``n_cells`` cells of a conditional ``model`` (random labels) in batches; time it.

    ``settings`` are ``GaussianDiffusion.sample``'s keywords; by default the sampler, steps and
    guidance of ``wbdit.sample`` (DEFAULT_SAMPLER, its DEFAULT_STEPS, DEFAULT_CFG_SCALE on
    DEFAULT_CFG_INTERVAL). ``compile``: the model under ``torch.compile(dynamic=False)`` (guided
    steps double the batch: one more graph), timed after a warm-up pass that compiles.
    Returns seconds, cells/s and model calls per cell.
    """
    dev = torch.device(device)
    settings = dict(dict(sampler=DEFAULT_SAMPLER, cfg_scale=DEFAULT_CFG_SCALE, cfg_interval=DEFAULT_CFG_INTERVAL),
                    **settings)
    model = model.to(dev).eval()
    counted = _CountingModel(model, torch.compile(model, dynamic=False) if compile else model)
    g = torch.Generator(device=dev).manual_seed(seed)
    y = torch.randint(0, model.num_classes, (n_cells,), device=dev, generator=g)

    def run(cells: int) -> None:
        for start in range(0, cells, batch_size):
            n = min(batch_size, cells - start)
            diffusion.sample(counted, n, model.n_genes, y=y[start : start + n], generator=g, device=dev, **settings)
        _sync(dev)

    with torch.inference_mode():
        warm = time.perf_counter()
        run(min(batch_size, n_cells))  # compiles, warms the caches and the ISTA matrix
        warm = time.perf_counter() - warm
        counted.rows = 0
        start, cpu = time.perf_counter(), time.process_time()
        run(n_cells)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return dict(seconds=seconds, cpu_seconds=cpu, cells_per_s=n_cells / seconds, warmup_s=warm,
                model_calls_per_cell=counted.rows / n_cells, batch_size=batch_size, compiled=compile,
                implementations=ops.report(), **{k: v for k, v in settings.items() if k != "cfg_interval"},
                cfg_interval=settings["cfg_interval"])


def _summary(xs: list[float]) -> str:
    return f"min {min(xs):.3f} / median {statistics.median(xs):.3f}"


def cmd_train(args: argparse.Namespace) -> None:
    peak = fp32_peak_gflops()
    fns, flops = {}, {}
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
            compiled[name] = dict(compile_s=time.perf_counter() - start, first_loss=float(loss),
                                  eager_first_loss=float(train_step_fn(arch, fused, batch=args.batch)[0]()))
            fns[name + "-compiled"] = step
            flops[name + "-compiled"] = flops[name]
    times = interleaved(fns, args.rounds)
    print(f"CPU, seed configuration, batch {args.batch}, fp32, {torch.get_num_threads()} threads; "
          f"fp32 peak (4096^3 matmul, best of 5): {peak:.0f} GFLOP/s; {args.rounds} rounds in turn")
    print("| variant | step s (min / median) | GFLOP per step | GFLOP/s (median) | of peak |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        rate = flops[name] / statistics.median(ts) / 1e9
        print(f"| {name} | {_summary(ts)} | {flops[name] / 1e9:.1f} | {rate:.0f} | {rate / peak:.0%} |")
    for num, den in (("dit-ref", "wbdit-fused"), ("dit-fused", "wbdit-fused"), ("wbdit-ref", "wbdit-fused"),
                     *((n, n + "-compiled") for n in compiled)):
        ratios = [a / b for a, b in zip(times[num], times[den])]
        print(f"{num} / {den}: {_summary(ratios)} (round by round)")
    for name, info in compiled.items():
        print(f"{name} compiled: compile {info['compile_s']:.0f} s; first loss {info['first_loss']:.6f} "
              f"vs eager {info['eager_first_loss']:.6f}")
    print(json.dumps(dict(peak_gflops=peak, flops=flops, times=times, compiled=compiled, implementations=ops.report())))


def cmd_sample(args: argparse.Namespace) -> None:
    from wbdit.sampling import sample  # anndata: only for this command

    kw = {}
    for item in args.settings:
        key, _, value = item.partition("=")
        kw[key] = tuple(float(v) for v in value.split(",")) if key == "cfg_interval" else \
            value if key in ("sampler", "guidance") else float(value) if key in ("cfg_scale", "eta") else int(value)
    start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    adata = sample(args.run, n_cells=args.cells, progress=False, **kw)
    end = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter() - start
    cpu = end.ru_utime - usage.ru_utime + end.ru_stime - usage.ru_stime
    print(json.dumps(dict(cells=adata.n_obs, wall_s=wall, cpu_s=cpu, threads=torch.get_num_threads(),
                          settings=adata.uns["wbdit"], implementations=ops.report())))


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
    s.add_argument("settings", nargs="*", help="wbdit.sample keywords as KEY=VALUE (cfg_interval=LO,HI)")
    s.set_defaults(func=cmd_sample)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
