"""Suite stage "ops": per-op speed at the seed shape, a short tile sweep, the winners file.

Seed shape, bf16 (the trainer's autocast dtype): MSSA on w (256, 200, 768) with 8 heads of 96;
ISTA on x (51200, 768); the C++/CUDA patch embedding on (256, 2000) genes, patch 10, hidden 768.

1. Sweep: for each Triton kernel in ``wbdit.tuning.SWEEP``, time its heuristic configuration and
   each alternative (``tuning.forced``), alone, on the same inputs; an alternative whose output
   differs from the heuristic's by more than bf16 rounding is rejected. The fastest wins; the
   heuristic keeps its place unless beaten by more than 2 % (a margin for do_bench's run-to-run
   spread, not yet measured on this GPU), so the file does not flip on noise. Winners go to
   ``$TUNING_OUT`` (the suite: ``$OUT/tuning.json``) after each kernel, merged with the other
   architectures' entries of the winners file in force.
2. Each op, forward and forward + backward, with the winners against its best alternative:
   MSSA vs ``scaled_dot_product_attention(w, w, w)`` on the flash, cuDNN and memory-efficient
   backends (each where it accepts the inputs) and the eager reference; ISTA vs cuBLAS
   (``torch.addmm``: x + x B in one GEMM, then the threshold and ReLU; ``wbdit.fastpaths.ista_apply``),
   the bare GEMM x B as a floor, and the eager reference; the extension's ops vs the reference.

Times: ``triton.testing.do_bench`` medians in ms (CUDA events, L2 flushed between calls).
TFLOP/s and GB/s use the kernels' own cost models (``flops_and_bytes``): GEMM FLOPs without
padding, compulsory bytes; the same numbers for every implementation of an op.
"""

from __future__ import annotations

import datetime
import json
import os
import traceback
from typing import Callable

import torch
import torch.nn.functional as F
import triton
from common import (
    HAS_CUDA,
    SEED_B,
    SEED_D,
    SEED_GENES,
    SEED_H,
    SEED_HEADS,
    SEED_N,
    SEED_PATCH,
    bench_ms,
    record,
    rel_err,
    skip,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

from wbdit import extension, fastpaths, reference, tuning
from wbdit.kernels import ista as kista
from wbdit.kernels import mssa as kmssa

ETA, LMBDA = 0.1, 0.1
NOISE = 0.02  # a winner must beat the heuristic by more than this (a margin for do_bench's spread)
AGREE = 1e-2  # an alternative's output vs the heuristic's (both bf16): a few bf16 roundings
# The constexprs of each kernel's config tuple, in order; warps and stages follow.
LAYOUT = {
    "mssa_fwd": ("BLOCK_M", "BLOCK_N"),
    "mssa_bwd": ("BLOCK_M", "BLOCK_N"),
    "ista_fwd": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    "ista_bwd_dx": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    "ista_bwd_dB": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
}


def spec_config(specs, kernel: str) -> tuple:
    (spec,) = [s for s in specs if s.name == kernel]
    return tuple(spec.constexprs[k] for k in LAYOUT[kernel]) + (spec.num_warps, spec.num_stages)


def _flat(out) -> torch.Tensor:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return torch.cat([o.float().flatten() for o in outs])


class Winners:
    """The winners file this run writes: the file in force, with this GPU's entry replaced."""

    def __init__(self, path: str | None):
        self.path = path
        self.arch = tuning.current_arch()
        self.data = {a: e for a, e in tuning.load().items() if a != self.arch}
        p = torch.cuda.get_device_properties(0)
        self.entry = {
            "device": p.name,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "date": datetime.date.today().isoformat(),
            "shape": "seed, bf16: MSSA B=256 N=200 8 x 96, ISTA 51200 x 768",
            "configs": {},
            "ms": {},
        }

    def add(self, kernel: str, key: str, config: tuple, ms: dict) -> None:
        self.entry["configs"].setdefault(kernel, {})[key] = list(config)
        self.entry["ms"].setdefault(kernel, {})[key] = ms
        if self.path:
            with open(self.path, "w") as f:
                json.dump({**self.data, self.arch: self.entry}, f, indent=1)
            os.environ[tuning.ENV] = self.path  # the comparisons below launch with the winners


def sweep(kernel: str, key: str, specs_fn: Callable[[], list], run: Callable[[], object], winners: Winners) -> None:
    """Time ``run`` (one launch of the op containing ``kernel``) with the heuristic and each
    alternative config; record every time and the winner."""
    with tuning.for_arch(None):  # the heuristic, whatever winners file is in force
        heuristic = spec_config(specs_fn(), kernel)
        expected = _flat(run())
        times = {heuristic: bench_ms(run)}
    record("sweep", kernel=kernel, key=key, config=heuristic, role="heuristic", ms=times[heuristic])
    for config in tuning.SWEEP[kernel][key]:
        config = tuple(config)
        with tuning.forced({kernel: config}):
            if spec_config(specs_fn(), kernel) != config:
                skip(f"{kernel} sweep", "its kernel module does not ask wbdit.tuning.choose for this config")
                return
            err = rel_err(_flat(run()), expected)
            if err > AGREE:
                record("sweep", kernel=kernel, key=key, config=config, role="rejected", err=err)
                continue
            times[config] = bench_ms(run)
        record("sweep", kernel=kernel, key=key, config=config, role="alternative", ms=times[config], err=err)
    best = min(times, key=times.get)
    if times[best] > (1 - NOISE) * times[heuristic]:
        best = heuristic
    winners.add(kernel, key, best, {"heuristic": times[heuristic], "winner": times[best]})
    record(
        "winner",
        kernel=kernel,
        key=key,
        config=best,
        ms=times[best],
        heuristic=heuristic,
        heuristic_ms=times[heuristic],
        speedup=times[heuristic] / times[best],
    )


def compare(op: str, pass_: str, impls: dict[str, Callable[[], object]], flops: int, nbytes: int) -> None:
    """Time each implementation of one op and pass; an implementation that raises is recorded as such."""

    for name, fn in impls.items():
        try:
            fn()
            ms = bench_ms(fn)
        except Exception as exc:  # e.g. an SDPA backend that does not take these inputs
            record("op", op=op, pass_=pass_, impl=name, error=f"{type(exc).__name__}: {str(exc)[:200]}")
            continue
        record(
            "op",
            op=op,
            pass_=pass_,
            impl=name,
            ms=ms,
            tflops=flops / ms / 1e9,
            gbs=nbytes / ms / 1e6,
            tuning=tuning.describe() if name == "triton" else None,
        )


def _grad(fn: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...], dout: torch.Tensor):
    return lambda: torch.autograd.grad(fn(), inputs, dout)


def mssa_stage(winners: Winners) -> None:
    B, N, heads, d, dtype = SEED_B, SEED_N, SEED_HEADS, SEED_D, torch.bfloat16
    shape = kmssa.MssaShape(B, N, heads, d, dtype)
    key = tuning.config_key(dtype, 128)
    w = torch.randn(B, N, heads * d, device="cuda", dtype=dtype)
    dout = torch.randn_like(w)
    out, lse = kmssa.mssa_fwd(w, heads)
    sweep("mssa_fwd", key, lambda: kmssa.forward_specs(shape), lambda: kmssa.mssa_fwd(w, heads)[0], winners)
    sweep(
        "mssa_bwd", key, lambda: kmssa.backward_specs(shape), lambda: kmssa.mssa_bwd(dout, w, out, lse, heads), winners
    )

    def sdpa(backend):
        def fn(x):
            xh = x.view(B, N, heads, d).transpose(1, 2)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(xh, xh, xh).transpose(1, 2).reshape(B, N, heads * d)

        return fn

    impls = {
        "triton": lambda x: kmssa.mssa(x, heads),
        "sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "reference (eager)": lambda x: reference.mssa(x, heads),
    }
    wg = w.detach().clone().requires_grad_()
    for pass_, backward in (("fwd", False), ("fwd+bwd", True)):
        flops, nbytes = kmssa.flops_and_bytes(shape, backward)
        if backward:
            fns = {n: _grad(lambda f=f: f(wg), (wg,), dout) for n, f in impls.items()}
        else:
            fns = {n: (lambda f=f: f(w)) for n, f in impls.items()}
        compare("mssa", pass_, fns, flops, nbytes)


def ista_stage(winners: Winners) -> None:
    M, H, dtype = SEED_B * SEED_N, SEED_H, torch.bfloat16
    shape = kista.IstaShape(M, H, dtype)
    key = tuning.config_key(dtype, H)
    x = torch.randn(M, H, device="cuda", dtype=dtype)
    dout = torch.randn_like(x)
    # The trainer keeps D as an fp32 master weight under bf16 autocast.
    D = (torch.rand(H, H, device="cuda") * 2 - 1) * (3 / H) ** 0.5
    Bm = fastpaths.ista_matrix(D, ETA)
    out = kista.ista_fwd(x, Bm, ETA * LMBDA)
    sweep("ista_fwd", key, lambda: kista.forward_specs(shape), lambda: kista.ista_fwd(x, Bm, ETA * LMBDA), winners)
    for kernel in ("ista_bwd_dx", "ista_bwd_dB"):
        sweep(kernel, key, lambda: kista.backward_specs(shape), lambda: kista.ista_bwd(dout, x, Bm, out), winners)

    Bb = Bm.to(dtype)
    xg, Dg = x.detach().clone().requires_grad_(), D.detach().clone().requires_grad_()
    Dg16 = D.to(dtype).requires_grad_()  # the reference runs in the autocast dtype, as under autocast
    for pass_, backward in (("fwd", False), ("fwd+bwd", True)):
        flops, nbytes = kista.flops_and_bytes(shape, backward)
        if backward:
            fns = {
                "triton": _grad(lambda: kista.ista(xg, Dg, ETA, LMBDA), (xg, Dg), dout),
                "cublas addmm + epilogue": _grad(
                    lambda: fastpaths.ista_apply(xg, fastpaths.ista_matrix(Dg, ETA).to(dtype), ETA * LMBDA),
                    (xg, Dg),
                    dout,
                ),
                "reference (eager)": _grad(lambda: reference.ista(xg, Dg16, ETA, LMBDA), (xg, Dg16), dout),
            }
        else:
            fns = {
                "triton": lambda: kista.ista(x, D, ETA, LMBDA),
                "cublas addmm + epilogue": lambda: fastpaths.ista_apply(
                    x, fastpaths.ista_matrix(D, ETA).to(dtype), ETA * LMBDA
                ),
                "cublas gemm x B alone (floor)": lambda: x @ Bb,
                "reference (eager)": lambda: reference.ista(x, D.to(dtype), ETA, LMBDA),
            }
        compare("ista", pass_, fns, flops, nbytes)


def extension_stage() -> None:
    if not extension.has_cuda():
        skip("patch_embed / timestep_embedding speed", "wbdit._C was built without CUDA kernels")
        return
    B, G, p, H, dtype = SEED_B, SEED_GENES, SEED_PATCH, SEED_H, torch.bfloat16
    N = G // p
    x = torch.randn(B, G, device="cuda", dtype=dtype)
    W = torch.randn(H, p, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(H, device="cuda", dtype=dtype, requires_grad=True)
    pos = reference.sincos_pos_embed(N, H).to("cuda", dtype)
    dout = torch.randn(B, N, H, device="cuda", dtype=dtype)
    # As in training, W and b need gradients and x does not: the backward is dW = dout^T patches
    # (one more GEMM) and db, reading dout and x once more.
    flops = {False: 2 * B * N * p * H, True: 4 * B * N * p * H}
    nbytes = {False: (B * G + N * H + B * N * H) * 2, True: (2 * B * G + N * H + 2 * B * N * H) * 2}
    for pass_, backward in (("fwd", False), ("fwd+bwd", True)):
        impls = {"cuda-ext": extension.patch_embed, "reference (eager)": reference.patch_embed}
        fns = {
            n: (_grad(lambda f=f: f(x, W, b, pos), (W, b), dout) if backward else (lambda f=f: f(x, W, b, pos)))
            for n, f in impls.items()
        }
        compare("patch_embed", pass_, fns, flops[backward], nbytes[backward])
    t = torch.randint(0, 1000, (B,), device="cuda")
    compare(
        "timestep_embedding",
        "fwd",
        {
            "cuda-ext": lambda: extension.timestep_embedding(t, 256),
            "reference (eager)": lambda: reference.timestep_embedding(t, 256),
        },
        0,
        B * 256 * 4,
    )


def main() -> int:
    if not HAS_CUDA:
        for kernel, keys in tuning.SWEEP.items():
            for key, configs in keys.items():
                skip(f"{kernel} {key} sweep: heuristic + {len(configs)} alternatives")
        skip("per-op speed: mssa, ista, patch_embed, timestep_embedding vs alternatives")
        return 0
    winners = Winners(os.environ.get("TUNING_OUT"))
    ok = True
    for part in (lambda: mssa_stage(winners), lambda: ista_stage(winners), extension_stage):
        try:
            part()
        except Exception:
            traceback.print_exc()
            record("error", what="ops", error=traceback.format_exc(limit=3))
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
