"""Suite stage "correctness": every CUDA path against the reference, fp32 and bf16, forward and backward.

Paths: the Triton MSSA and ISTA ops (``wbdit.kernels``), the C++/CUDA ops of ``wbdit._C``
(patch embedding, timestep embedding), and the whole WB-DiT and DiT with ``fused=True`` against
``fused=False`` on the same weights. Shapes: the seed shape and awkward ones (one token, token
counts that are no block multiple, head dims 64 / 96 / 128, widths that are no tile
multiple, large-magnitude inputs whose scores overflow exp without the running max).

Every expected value is the reference evaluated in float64 on the same (rounded) inputs, so an
error is the fast path's own. Metric: ||fast - ref|| / ||ref|| over the whole tensor (METHOD.md:
fp32 lands far under 1e-3, bf16 operands between 1e-3 and 1e-2; NaN never passes). The bounds
below are a few units of the dtype's rounding (bf16: u = 2^-8) or, for fp32 (tf32x3 tensor-core
products, about fp32 accuracy), a few hundred fp32 roundings; MSSA's scale the square of the
input scale, as its scores' cancellation does. Before each fast call the allocator's free memory
is filled with NaN, so an output element a kernel never writes shows up as NaN.

``WBDIT_STRICT_FUSED=1`` is set: a fast path that falls back to the reference raises.
"""

from __future__ import annotations

import os
import traceback

os.environ["WBDIT_STRICT_FUSED"] = "1"

import torch  # noqa: E402
from common import (  # noqa: E402
    HAS_CUDA,
    SEED_B,
    SEED_D,
    SEED_GENES,
    SEED_H,
    SEED_HEADS,
    SEED_N,
    SEED_PATCH,
    record,
    rel_err,
    shape_name,
    skip,
)

from wbdit import extension, ops, reference  # noqa: E402
from wbdit.kernels import ista as kista  # noqa: E402
from wbdit.kernels import mssa as kmssa  # noqa: E402
from wbdit.model import PRESETS, build_model  # noqa: E402

BOUND = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
MODEL_BOUND = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # three blocks of rounding on top

# (B, N, heads, head dim, input scale). Head dims 96 and 128 share the seed's BLOCK_D = 128 and 64
# has its own; each distinct tile costs a JIT compile inside this stage's minute, so head dim 32
# is left to the tests stage (tests/test_mssa.py).
MSSA_SHAPES = [
    (SEED_B, SEED_N, SEED_HEADS, SEED_D, 1.0),
    (3, 1, 2, 96, 1.0),
    (2, 7, 3, 96, 1.0),
    (1, 257, 1, 128, 1.0),
    (4, 200, 12, 64, 1.0),
    (1, 200, 2, 64, 10.0),
]
# (rows, width)
ISTA_SHAPES = [(SEED_B * SEED_N, SEED_H), (1, 32), (7, 96), (257, 160), (1028, 48)]
# (batch, genes, patch, hidden): genes not divisible by the patch pads and crops
PATCH_SHAPES = [(SEED_B, SEED_GENES, SEED_PATCH, SEED_H), (3, 53, 10, 16), (5, 50, 1, 40), (7, 203, 16, 96)]
DTYPES = (torch.float32, torch.bfloat16)
ETA, LMBDA = 0.1, 0.1


def poison() -> None:
    """Fill 1 GiB of the caching allocator's free memory with NaN bytes (0xFF is NaN in fp32 and
    bf16): the outputs allocated next are carved from it, so unwritten elements read NaN."""
    torch.empty(2**30, dtype=torch.uint8, device="cuda").fill_(255)


def check(path: str, dtype: torch.dtype, shape: str, errors: dict[str, float], bound: float) -> bool:
    ok = all(e <= bound for e in errors.values())
    record(
        "check",
        path=path,
        dtype=str(dtype).replace("torch.", ""),
        shape=shape,
        bound=bound,
        ok=ok,
        **{f"err_{k}": v for k, v in errors.items()},
    )
    return ok


def mssa_cases(gen: torch.Generator) -> bool:
    ok = True
    for dtype in DTYPES:
        for B, N, heads, d, scale in MSSA_SHAPES:
            w = (torch.randn(B, N, heads * d, generator=gen, device="cuda") * scale).to(dtype)
            dout = torch.randn(B, N, heads * d, generator=gen, device="cuda").to(dtype)
            w64 = w.double().requires_grad_()
            ref = reference.mssa(w64, heads)
            (ref_dw,) = torch.autograd.grad(ref, w64, dout.double())
            wf = w.clone().requires_grad_()
            poison()
            out = kmssa.mssa(wf, heads)
            poison()
            (dw,) = torch.autograd.grad(out, wf, dout)
            ok &= check(
                "triton mssa",
                dtype,
                shape_name(B, N, heads, d) + (f" scale {scale:g}" if scale != 1 else ""),
                {"out": rel_err(out, ref), "dw": rel_err(dw, ref_dw)},
                BOUND[dtype] * max(1.0, scale**2),
            )
    return ok


def ista_cases(gen: torch.Generator) -> bool:
    ok = True
    for dtype in DTYPES:
        for M, H in ISTA_SHAPES:
            x = torch.randn(M, H, generator=gen, device="cuda").to(dtype)
            # The model's dictionary scale: kaiming-uniform, entries of size ~ H^-1/2.
            D = (torch.randn(H, H, generator=gen, device="cuda") / H**0.5).to(dtype)
            dout = torch.randn(M, H, generator=gen, device="cuda").to(dtype)
            x64, D64 = x.double().requires_grad_(), D.double().requires_grad_()
            ref = reference.ista(x64, D64, ETA, LMBDA)
            ref_dx, ref_dD = torch.autograd.grad(ref, (x64, D64), dout.double())
            xf, Df = x.clone().requires_grad_(), D.clone().requires_grad_()
            poison()
            out = kista.ista(xf, Df, ETA, LMBDA)
            poison()
            dx, dD = torch.autograd.grad(out, (xf, Df), dout)
            ok &= check(
                "triton ista",
                dtype,
                shape_name(M, H),
                {"out": rel_err(out, ref), "dx": rel_err(dx, ref_dx), "dD": rel_err(dD, ref_dD)},
                BOUND[dtype],
            )
    return ok


def extension_cases(gen: torch.Generator) -> bool:
    if not extension.has_cuda():
        skip("C++/CUDA ops", "wbdit._C was built without CUDA kernels")
        return False
    ok = True
    for dtype in DTYPES:
        for B, G, p, H in PATCH_SHAPES:
            N = -(-G // p)
            x = torch.randn(B, G, generator=gen, device="cuda").to(dtype)
            W = (torch.randn(H, p, generator=gen, device="cuda") / p**0.5).to(dtype)
            b = torch.randn(H, generator=gen, device="cuda").to(dtype)
            pos = reference.sincos_pos_embed(N, H).to("cuda", dtype)
            dout = torch.randn(B, N, H, generator=gen, device="cuda").to(dtype)
            args64 = [t.double().requires_grad_(t is not pos) for t in (x, W, b, pos)]
            ref = reference.patch_embed(*args64)
            ref_grads = torch.autograd.grad(ref, args64[:3], dout.double())
            args = [t.clone().requires_grad_(t is not pos) for t in (x, W, b, pos)]
            poison()
            out = ops.patch_embed(*args, fused=True)
            assert ops.report()["patch_embed"] == "cuda-ext", ops.report()
            poison()
            grads = torch.autograd.grad(out, args[:3], dout)
            errors = {"out": rel_err(out, ref), **{f"d{n}": rel_err(g, r) for n, g, r in zip("xWb", grads, ref_grads)}}
            ok &= check("cuda-ext patch_embed", dtype, shape_name(B, G, p, H), errors, BOUND[dtype])
    for t in (
        torch.randint(0, 1000, (SEED_B,), generator=gen, device="cuda"),
        torch.rand(33, generator=gen, device="cuda") * 1000,
    ):
        for dim in (256, 2, 100):
            ref = reference.timestep_embedding(t.double(), dim)
            poison()
            out = ops.timestep_embedding(t, dim, fused=True)
            assert ops.report()["timestep_embedding"] == "cuda-ext", ops.report()
            # fp32 sin/cos of arguments up to 1000 rad: the argument's own rounding (1000 * 2^-24)
            # dominates, hence a bound in absolute terms of that size.
            err = (out.double() - ref.double()).abs().max().item()
            ok &= check(
                "cuda-ext timestep_embedding",
                torch.float32,
                f"{t.dtype} {shape_name(len(t), dim)}",
                {"max_abs": err},
                1e-4,
            )
    return ok


def model_cases(gen: torch.Generator) -> bool:
    """Whole models at the seed configuration: fused=True vs fused=False, same weights and draws."""
    ok = True
    for arch in ("wbdit", "dit"):
        for dtype in DTYPES:
            torch.manual_seed(0)
            model = build_model(arch, n_genes=SEED_GENES, num_classes=10, **PRESETS["seed"]).cuda()
            with torch.no_grad():  # DiT's zero init would hide the blocks: every weight random
                for p in model.parameters():
                    p.copy_(torch.randn_like(p) * 0.02)
            x = torch.randn(8, SEED_GENES, generator=gen, device="cuda")
            t = torch.randint(0, 1000, (8,), generator=gen, device="cuda")
            y = torch.randint(0, 10, (8,), generator=gen, device="cuda")
            results = {}
            for fused in (False, True):
                model.fused = fused
                model.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    out = model(x, t, y)
                loss = ((out.float() - x) ** 2).mean()
                loss.backward()
                results[fused] = (out.float(), torch.cat([p.grad.flatten().float() for p in model.parameters()]))
            errors = {
                "out": rel_err(results[True][0], results[False][0]),
                "grads": rel_err(results[True][1], results[False][1]),
            }
            ok &= check(f"{arch} fused vs reference", dtype, "seed config, batch 8", errors, MODEL_BOUND[dtype])
    return ok


def main() -> int:
    if not HAS_CUDA:
        for what in (
            "triton mssa",
            "triton ista",
            "cuda-ext patch_embed / timestep_embedding",
            "wbdit / dit fused vs reference",
        ):
            skip(what)
        return 0
    gen = torch.Generator(device="cuda").manual_seed(0)
    ok = True
    for cases in (mssa_cases, ista_cases, extension_cases, model_cases):
        try:  # one path's crash must not hide the others' results
            ok &= cases(gen)
        except Exception:
            traceback.print_exc()
            record("error", what=cases.__name__, error=traceback.format_exc(limit=3))
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
