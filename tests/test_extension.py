"""wbdit._C (csrc/) against the references in wbdit.reference, forward and backward.

The extension is expected to be built (``pip install --no-build-isolation -e .``): if it is not,
the import below fails and so does this file, because a silently skipped build is the failure
CI must catch. CUDA cases run only where a GPU is present.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import wbdit
from wbdit import extension, ops, reference
from wbdit.model import WhiteBoxDiT

CUDA = torch.cuda.is_available() and extension.has_cuda()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU and a CUDA build of wbdit._C")


def _inputs(B, G, p, H, dtype=torch.float32, device="cpu", N=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = -(-G // p) if N is None else N
    x = torch.randn(B, G, generator=g, dtype=torch.float64)
    w = torch.randn(H, p, generator=g, dtype=torch.float64) / p**0.5
    b = torch.randn(H, generator=g, dtype=torch.float64)
    pos = torch.randn(N, H, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (x, w, b, pos)]


def _grads(fn, args, grad_out, pos_grad=False):
    args = [a.detach().clone().requires_grad_(i < 3 or pos_grad) for i, a in enumerate(args)]
    out = fn(*args)
    out.backward(grad_out)
    return out.detach(), [a.grad for a in args if a.requires_grad]


# ------------------------------------------------------------------ patch_embed, CPU


@pytest.mark.parametrize("p", [1, 10, 16])
@pytest.mark.parametrize("B,G,H", [(1, 37, 24), (9, 203, 48), (4, 160, 32)])
def test_patch_embed_cpu_forward_backward(B, G, p, H):
    # G = 37 and 203 are multiples of neither 10 nor 16: the last patch is zero-padded.
    args = _inputs(B, G, p, H)
    grad_out = torch.randn(B, args[3].shape[0], H, generator=torch.Generator().manual_seed(1))
    out, grads = _grads(extension.patch_embed, args, grad_out)
    ref, ref_grads = _grads(reference.patch_embed, args, grad_out)
    assert out.shape == (B, -(-G // p), H) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("dx", "dW", "db"), grads, ref_grads):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


def test_patch_embed_cpu_float64_is_exact_to_rounding():
    args = _inputs(5, 53, 10, 40, dtype=torch.float64)
    grad_out = torch.randn(5, 6, 40, dtype=torch.float64)
    out, grads = _grads(extension.patch_embed, args, grad_out, pos_grad=True)
    ref, ref_grads = _grads(reference.patch_embed, args, grad_out, pos_grad=True)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    assert len(grads) == 4  # a trainable pos_embed gets its gradient too
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_patch_embed_backward_without_dx():
    # Training: x is data, so autograd asks for dW and db only and the kernel skips dx.
    x, w, b, pos = _inputs(4, 37, 10, 16)
    grad = torch.randn(4, 4, 16)
    dx, dw, db = torch.ops.wbdit.patch_embed_backward(grad, x, w, True)
    no_dx, dw2, db2 = torch.ops.wbdit.patch_embed_backward(grad, x, w, False)
    assert dx.shape == x.shape and no_dx.shape == (0,)
    assert torch.equal(dw, dw2) and torch.equal(db, db2)
    w.requires_grad_()
    out = extension.patch_embed(x, w, b, pos)
    (got,) = torch.autograd.grad(out, w, grad)
    torch.testing.assert_close(got, dw)


@pytest.mark.parametrize("N", [3, 8])
def test_patch_embed_cpu_crop_and_extra_padding(N):
    # N * p < G crops x (F.pad with a negative pad); N * p > G + p adds all-zero patches.
    args = _inputs(3, 53, 10, 16, N=N)
    grad_out = torch.randn(3, N, 16)
    out, grads = _grads(extension.patch_embed, args, grad_out)
    ref, ref_grads = _grads(reference.patch_embed, args, grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if N == 3:
        assert grads[0][:, 30:].eq(0).all()  # cropped genes get no gradient


def test_patch_embed_gradcheck():
    x, w, b, pos = (a.requires_grad_(i < 3) for i, a in enumerate(_inputs(2, 23, 4, 6, dtype=torch.float64)))
    assert torch.autograd.gradcheck(torch.ops.wbdit.patch_embed, (x, w, b, pos))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_patch_embed_cpu_half_precision(dtype):
    # Sums run in float32 and round once, so the result is within one rounding of the exact
    # (float32) reference on the same half-precision inputs.
    args = _inputs(4, 47, 10, 32, dtype=dtype)
    out = extension.patch_embed(*args)
    exact = reference.patch_embed(*(a.float() for a in args))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), exact, rtol=1e-2, atol=1e-2)
    grad_out = torch.randn(4, 5, 32).to(dtype)
    dx, dw, db = torch.ops.wbdit.patch_embed_backward(grad_out, args[0], args[1])
    _, exact_grads = _grads(reference.patch_embed, [a.float() for a in args], grad_out.float())
    for got, want in zip((dx, dw, db), exact_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=2e-2 * want.abs().max().item())


def test_patch_embed_rejects_bad_inputs():
    x, w, b, pos = _inputs(2, 20, 10, 8)
    with pytest.raises(RuntimeError, match="pos_embed must be"):
        torch.ops.wbdit.patch_embed(x, w, b, pos[:, :4])
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.wbdit.patch_embed(x, w.double(), b, pos)


# ------------------------------------------------------------------ timestep_embedding, CPU


@pytest.mark.parametrize("dim", [256, 2, 6, 100, 1000])
@pytest.mark.parametrize("max_period", [10000.0, 100.0])
def test_timestep_embedding_cpu_float_and_int(dim, max_period):
    g = torch.Generator().manual_seed(dim)
    for t in (
        torch.randint(0, 1000, (257,), generator=g),  # int64 diffusion steps
        torch.randint(0, 1000, (1,), generator=g).int(),
        torch.rand(33, generator=g) * 1000,  # float timesteps
        torch.rand(5, generator=g, dtype=torch.float64) * 1000,
    ):
        out = extension.timestep_embedding(t, dim, max_period)
        ref = reference.timestep_embedding(t, dim, max_period)
        assert out.shape == (t.shape[0], dim) and out.dtype == torch.float32
        # Same float32 frequencies and arguments as the reference; only libm's sin/cos vs
        # torch's differ, by at most an ulp or two of a value <= 1.
        torch.testing.assert_close(out, ref, rtol=0, atol=5e-7)


def test_timestep_embedding_huge_timesteps():
    t = torch.tensor([1e6, 1e9, 2.0**31 - 1, 1e20, 1e30, 3.0e38], dtype=torch.float32)
    ti = torch.tensor([2**40, 2**62, torch.iinfo(torch.int64).max], dtype=torch.int64)
    for tt in (t, ti):
        out = extension.timestep_embedding(tt, 256, 10000.0)
        assert torch.isfinite(out).all()
        cos, sin = out[:, :128], out[:, 128:]
        torch.testing.assert_close(cos**2 + sin**2, torch.ones_like(cos), rtol=0, atol=1e-6)
        # The arguments t * f_k are the reference's float32 products bit for bit, and both
        # sides reduce huge arguments exactly, so even here the results agree to an ulp.
        torch.testing.assert_close(out, reference.timestep_embedding(tt, 256, 10000.0), rtol=0, atol=5e-7)


def test_timestep_embedding_backward_matches_reference():
    t = (torch.rand(16) * 50).requires_grad_()
    grad = torch.randn(16, 64)
    (dt,) = torch.autograd.grad(extension.timestep_embedding(t, 64, 10000.0), t, grad)
    (dt_ref,) = torch.autograd.grad(reference.timestep_embedding(t, 64, 10000.0), t, grad)
    torch.testing.assert_close(dt, dt_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:fused=True but no fast implementation")
def test_timestep_embedding_rejects_odd_dim():
    with pytest.raises(RuntimeError, match="must be even"):
        torch.ops.wbdit.timestep_embedding(torch.arange(3), 7, 10000.0)
    with pytest.raises(ValueError, match="must be even"):  # through ops: the reference's error
        ops.timestep_embedding(torch.arange(3), 7, fused=True)


# ------------------------------------------------------------------ opcheck


def test_opcheck_patch_embed():
    x, w, b, pos = _inputs(3, 25, 10, 8)
    torch.library.opcheck(torch.ops.wbdit.patch_embed, (x, w, b, pos))
    torch.library.opcheck(
        torch.ops.wbdit.patch_embed, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), pos)
    )
    torch.library.opcheck(torch.ops.wbdit.patch_embed_backward, (torch.randn(3, 3, 8), x.detach(), w.detach()))
    torch.library.opcheck(torch.ops.wbdit.patch_embed_backward, (torch.randn(3, 3, 8), x.detach(), w.detach(), False))


def test_opcheck_timestep_embedding():
    torch.library.opcheck(torch.ops.wbdit.timestep_embedding, (torch.arange(5), 256, 10000.0))
    torch.library.opcheck(torch.ops.wbdit.timestep_embedding, ((torch.rand(4) * 9).requires_grad_(), 6, 100.0))


def test_torch_compile_traces_the_ops():
    x, w, b, pos = _inputs(2, 25, 10, 8)
    t = torch.arange(2)
    fn = torch.compile(
        lambda *a: extension.patch_embed(*a).sum(-1) + extension.timestep_embedding(t, 8)[:, :1],
        fullgraph=True,
        backend="eager",
    )
    torch.testing.assert_close(
        fn(x, w, b, pos), reference.patch_embed(x, w, b, pos).sum(-1) + reference.timestep_embedding(t, 8)[:, :1]
    )


# ------------------------------------------------------------------ dispatch through wbdit.ops


def test_ops_fused_uses_the_extension_on_cpu(monkeypatch):
    # Triton runs on CPU only under its interpreter; without it the extension is the fast path.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(ops.STRICT_ENV, "1")  # a fallback to the reference would raise
    x, w, b, pos = _inputs(2, 25, 10, 8)
    torch.testing.assert_close(ops.patch_embed(x, w, b, pos, fused=True), reference.patch_embed(x, w, b, pos))
    assert ops.report()["patch_embed"] == "cpu-ext"
    t = torch.arange(4)
    torch.testing.assert_close(ops.timestep_embedding(t, 256, 10000.0, fused=True), reference.timestep_embedding(t))
    assert ops.report()["timestep_embedding"] == "cpu-ext"
    assert "cpu-ext" in ops.available()["patch_embed"]


def test_whitebox_dit_fused_input_path_uses_the_extension(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    model = WhiteBoxDiT(n_genes=37, patch_size=10, hidden_size=32, depth=1, num_heads=2, fused=True)
    x, t = torch.randn(3, 37), torch.tensor([0, 500, 999])
    out = model(x, t)
    assert ops.report()["patch_embed"] == "cpu-ext"
    assert ops.report()["timestep_embedding"] == "cpu-ext"
    model.fused = False
    torch.testing.assert_close(out, model(x, t), rtol=1e-4, atol=1e-5)


def test_missing_extension_falls_back_to_the_reference_loudly():
    # A pure-Python install: wbdit._C cannot be imported. Run in a fresh interpreter, since this
    # one has loaded the library for good.
    code = """
import sys, warnings, torch
sys.modules["wbdit._C"] = None  # makes `from wbdit import _C` raise ImportError
from wbdit import ops, reference
x, w, b, pos = torch.randn(2, 25), torch.randn(8, 10), torch.randn(8), torch.randn(3, 8)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = ops.patch_embed(x, w, b, pos, fused=True)
    ops.patch_embed(x, w, b, pos, fused=True)
assert torch.equal(out, reference.patch_embed(x, w, b, pos))
assert ops.report()["patch_embed"] == "reference (fallback)"
assert len(caught) == 1 and "not built" in str(caught[0].message), [str(c.message) for c in caught]
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="0", WBDIT_STRICT_FUSED="0")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    strict = code.replace(
        "from wbdit import ops", "import os; os.environ['WBDIT_STRICT_FUSED'] = '1'\nfrom wbdit import ops"
    )
    run = subprocess.run([sys.executable, "-c", strict], capture_output=True, text=True, env=env)
    assert run.returncode != 0 and "RuntimeError" in run.stderr and "not built" in run.stderr, run.stderr


# ------------------------------------------------------------------ the CUDA build


def _cuda_toolkit_present() -> bool:
    """setup.py's rule: a root with bin/nvcc and include/cuda_runtime.h, from $CUDA_HOME,
    $CUDA_PATH, the real location of nvcc on PATH, or /usr/local/cuda*."""
    nvcc = shutil.which("nvcc")
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    roots += [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    roots += ["/usr/local/cuda"] + glob.glob("/usr/local/cuda-*")
    return any(
        os.path.isfile(os.path.join(r, "bin", "nvcc")) and os.path.isfile(os.path.join(r, "include", "cuda_runtime.h"))
        for r in roots
        if r
    )


def _cuobjdump() -> str | None:
    import triton  # bundles cuobjdump with its NVIDIA backend

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return shutil.which("cuobjdump") or (bundled if os.path.isfile(bundled) else None)


@pytest.mark.skipif(
    torch.version.cuda is None or not _cuda_toolkit_present() or os.environ.get("WBDIT_CUDA") == "0",
    reason="setup.py builds the CUDA kernels only with a CUDA torch and nvcc",
)
def test_cuda_kernels_were_compiled():
    # setup.py builds CUDA whenever torch has CUDA and nvcc is found, GPU or not: a compile
    # error in csrc/*.cu must fail here, on a CPU-only CI machine too.
    assert extension.has_cuda(), "wbdit._C was built without its CUDA kernels"
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump to list the cubins")
    (so,) = glob.glob(os.path.join(os.path.dirname(wbdit.__file__), "_C*.so"))
    listing = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    archs = set(re.findall(r"\.(sm_\d+a?)\.cubin", listing))
    assert archs, listing
    if not torch.cuda.is_available():  # no GPU at build time: setup.py's default arch list
        assert {"sm_80", "sm_90"} <= archs, listing


# ------------------------------------------------------------------ CUDA (needs a GPU)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,G,p,H", [(1, 37, 10, 24), (7, 203, 16, 96), (5, 50, 1, 40), (16, 2000, 10, 768)])
def test_patch_embed_cuda(dtype, B, G, p, H):
    args = _inputs(B, G, p, H, dtype=dtype, device="cuda")
    exact_args = [a.float() for a in args]
    grad_out = torch.randn(B, args[3].shape[0], H, device="cuda").to(dtype)
    out, grads = _grads(extension.patch_embed, args, grad_out)
    exact, exact_grads = _grads(reference.patch_embed, exact_args, grad_out.float())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), exact, rtol=tol, atol=tol)
    for name, got, want in zip(("dx", "dW", "db"), grads, exact_grads):
        assert got.dtype == dtype, name
        scale = want.abs().max().item()
        torch.testing.assert_close(got.float(), want, rtol=tol * 10, atol=tol * scale, msg=name)


@needs_cuda
def test_patch_embed_cuda_many_rows_and_crop():
    # B * N = 819200 rows: more than the 65535 * 8 rows one forward grid covers (grid-stride).
    args = _inputs(4096, 2000, 10, 8, device="cuda")
    torch.testing.assert_close(extension.patch_embed(*args), reference.patch_embed(*args), rtol=1e-5, atol=1e-5)
    args = _inputs(3, 53, 10, 16, device="cuda", N=3)
    grad_out = torch.randn(3, 3, 16, device="cuda")
    out, grads = _grads(extension.patch_embed, args, grad_out)
    ref, ref_grads = _grads(reference.patch_embed, args, grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_cuda
@pytest.mark.parametrize("dim", [256, 2, 100])
def test_timestep_embedding_cuda(dim):
    for t in (
        torch.randint(0, 1000, (257,), device="cuda"),
        torch.rand(33, device="cuda") * 1000,
        torch.rand(9, device="cuda").to(torch.bfloat16) * 1000,
        torch.tensor([1e6, 1e9, 1e30, 3e38], device="cuda"),
    ):
        out = extension.timestep_embedding(t, dim, 10000.0)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, reference.timestep_embedding(t, dim, 10000.0), rtol=0, atol=5e-7)


@needs_cuda
def test_ops_fused_uses_the_extension_on_cuda(monkeypatch):
    monkeypatch.setenv(ops.STRICT_ENV, "1")
    x, w, b, pos = _inputs(2, 25, 10, 8, device="cuda")
    ops.patch_embed(x, w, b, pos, fused=True)
    ops.timestep_embedding(torch.arange(4, device="cuda"), fused=True)
    for op in ("patch_embed", "timestep_embedding"):
        impls = ops.available()[op]
        assert "cuda-ext" in impls
        # The highest-priority CUDA implementation ran: cuda-ext unless a Triton kernel outranks it.
        assert ops.report()[op] == next(name for name in impls if name != "cpu-ext")


@needs_cuda
def test_opcheck_cuda():
    x, w, b, pos = _inputs(3, 25, 10, 8, device="cuda")
    torch.library.opcheck(torch.ops.wbdit.patch_embed, (x.requires_grad_(), w, b, pos))
    torch.library.opcheck(torch.ops.wbdit.patch_embed_backward, (torch.randn(3, 3, 8, device="cuda"), x.detach(), w))
    torch.library.opcheck(torch.ops.wbdit.timestep_embedding, (torch.arange(5, device="cuda"), 256, 10000.0))
