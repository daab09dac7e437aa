"""Every fast path of the ISTA step equals wbdit.reference.ista, forward and backward (dx and dD).

The fast paths compute ``relu(x + x B - eta lambda)`` with ``B = eta (D - D^T D)`` (DESIGN.md,
"Cheaper math, same function"): the Triton kernels (``wbdit.kernels.ista``, through the
interpreter without a GPU) and the torch one-GEMM op (``wbdit.fastpaths.ista_one_gemm``,
registered as "cpu-1gemm" for CPU and "cublas-1gemm" for CUDA tensors: on CUDA it is cuBLAS).
Expected values: the reference and its autograd in float64, on the very same (rounded) inputs.

Tolerances are elementwise worst-case rounding-error bounds (``_Bounds``), valid for any order
of summation, so they hold for every BLAS kernel (OPENBLAS_CORETYPE) and GPU, not just for the
one the test happened to run on. Gradients are compared with the fast path's own ReLU mask:
where a pre-activation lies within rounding of 0 a path may gate it either way, and that moves
its gradient by a whole dout; the test checks that the masks differ only there.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("triton")  # tests/conftest.py runs Triton through its interpreter without a GPU

from wbdit import fastpaths, ops, reference
from wbdit.kernels import ista as kista
from wbdit.model import ISTA

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

PATHS = {"triton": kista.ista, "torch": fastpaths.ista_one_gemm}

# (leading shape of x, H, eta, lambda, input scale): a single row, rows not a multiple of any
# block, H not a multiple of the tiles (48, 96), default and non-default eta/lambda, inputs of
# large magnitude, and 1028 rows, enough for the Triton dB reduction to split into partial sums.
CASES = [
    pytest.param((1, 1), 32, 0.1, 0.1, 1.0, id="1x1x32"),
    pytest.param((2, 7), 96, 0.3, 0.05, 1.0, id="2x7x96"),
    pytest.param((3, 200), 48, 1.5, 0.2, 1.0, id="3x200x48"),
    pytest.param((1, 257), 128, 0.1, 0.1, 1.0, id="1x257x128"),
    pytest.param((4, 7), 64, 0.25, 0.5, 100.0, id="4x7x64-large"),
    pytest.param((4, 257), 32, 0.7, 0.01, 1.0, id="4x257x32-split"),
]

# Unit roundoff of each storage dtype (round to nearest).
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _inputs(lead, H, scale, seed, dtype=torch.float32, d_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, H, generator=g, dtype=torch.float64) * scale
    D = torch.randn(H, H, generator=g, dtype=torch.float64) / H**0.5
    dout = torch.randn(*lead, H, generator=g, dtype=torch.float64)
    return x.to(DEVICE, dtype), D.to(DEVICE, d_dtype or dtype), dout.to(DEVICE, dtype)


def _gamma(n: int, u: float) -> float:
    """Worst-case relative error of an n-term floating-point sum of products (Higham's gamma_n)."""
    assert n * u < 0.5, "no useful bound"
    return n * u / (1 - n * u)


class _Bounds:
    """Exact results (float64, autograd of the reference) and elementwise error bounds for one
    fast path on inputs x (..., H), D (H, H), dout; ``gate``: the path's ReLU mask ``out > 0``.

    Model: B is formed in the matrix dtype (fp32; float64 for float64 D) with H-term sums and
    rounded once to x's dtype; each GEMM sums with unit ``u_acc`` per term; results are rounded
    to x's dtype (unit u) at most three times (GEMM result, residual, threshold). |B| is bounded
    by ``absB = eta (|D| + |D|^T |D|)``.
    """

    def __init__(self, path, x, D, dout, eta, lmbda, gate=None):
        H = x.shape[-1]
        u = UNIT[x.dtype]
        u_mat = UNIT[torch.promote_types(D.dtype, torch.float32)]
        # Triton fp32 on a GPU multiplies in tf32x3: each product drops a_lo b_lo and rounds the
        # low parts to tf32, about 3 * 2^-22 of |a b|; the interpreter multiplies in numpy fp32.
        u_acc = 2.0**-20 if path == "triton" and x.is_cuda else UNIT[torch.float32]
        if x.dtype == torch.float64:
            u_acc = u
        x64, D64, dout64 = x.double().requires_grad_(), D.double().requires_grad_(), dout.double()
        with torch.enable_grad():
            z = x64 + eta * (x64 @ D64 - (x64 @ D64.t()) @ D64) - eta * lmbda  # reference.ista's relu argument
            out = reference.ista(x64, D64, eta, lmbda)
            torch.testing.assert_close(torch.relu(z), out, rtol=1e-12, atol=1e-12)
            self.gate = (z > 0).double() if gate is None else gate.double()
            dx, dD = torch.autograd.grad(z * self.gate, (x64, D64), dout64)
        self.out, self.z, self.dx, self.dD = out.detach(), z.detach(), dx, dD

        x64, D64 = x64.detach(), D64.detach()
        ax, aD = x64.abs(), D64.abs()
        absB = eta * (aD + aD.t() @ aD)
        eps_B = _gamma(H + 2, u_mat) + u  # forming B, then rounding it to x's dtype
        thr = eta * lmbda
        self.out_bound = (_gamma(H + 2, u_acc) + 3 * u) * (ax + ax @ absB + thr) + eps_B * (ax @ absB)

        g = (dout64 * self.gate).reshape(-1, H)
        ag = g.abs()
        self.dx_bound = ((_gamma(H + 2, u_acc) + 2 * u) * (ag + ag @ absB.t()) + eps_B * (ag @ absB.t())).view_as(x)
        x2 = x64.reshape(-1, H)
        self.dB = x2.t() @ g
        dB_bound = (_gamma(x2.shape[0] + 1, u_acc) + u) * (x2.abs().t() @ ag)
        adB = self.dB.abs()
        self.dD_bound = (
            eta * (dB_bound + aD @ (dB_bound + dB_bound.t()))
            + _gamma(H + 2, u_mat) * eta * (adB + aD @ (adB + adB.t()))
            + UNIT[D.dtype] * dD.abs()
        )
        self.dB_bound = dB_bound

    def check_mask(self, out):
        """The path's ReLU mask differs from the exact one only where |z| is within the bound."""
        flipped = (out.double() > 0) != (self.z > 0)
        assert (self.z.abs()[flipped] <= self.out_bound[flipped]).all(), "ReLU mask differs beyond rounding"


def _within(actual, expected, bound, what):
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    err = (actual.double() - expected).abs()
    worst = (err / bound.clamp_min(1e-300)).max().item()
    assert (err <= bound).all(), f"{what}: error {worst:.3g}x its rounding bound (max error {err.max().item():.3g})"


def _run_path(path, x, D, dout, eta, lmbda):
    x, D = x.clone().requires_grad_(), D.clone().requires_grad_()
    out = PATHS[path](x, D, eta, lmbda)
    dx, dD = torch.autograd.grad(out, (x, D), dout)
    return out.detach(), dx, dD


# ------------------------------------------------------------------ every path vs the reference


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("lead,H,eta,lmbda,scale", CASES)
def test_fp32_matches_reference(path, lead, H, eta, lmbda, scale):
    x, D, dout = _inputs(lead, H, scale, seed=H * 7 + len(lead))
    out, dx, dD = _run_path(path, x, D, dout, eta, lmbda)
    exp = _Bounds(path, x, D, dout, eta, lmbda, gate=out > 0)
    assert (exp.out > 0).any() and (exp.out == 0).any()  # the ReLU mask matters in this case
    assert out.shape == x.shape and dx.shape == x.shape and dD.shape == D.shape
    exp.check_mask(out)
    _within(out, exp.out, exp.out_bound, "out")
    _within(dx, exp.dx, exp.dx_bound, "dx")
    _within(dD, exp.dD, exp.dD_bound, "dD")


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_dtype", ["like x", torch.float32], ids=["D-16bit", "D-fp32"])
@pytest.mark.parametrize("lead,H", [((1, 1), 32), ((2, 7), 96), ((3, 200), 48)])
def test_16bit_matches_reference(path, dtype, d_dtype, lead, H):
    """16-bit x (and D, or an fp32 D as autocast's master weight): B formed in fp32 and rounded
    once. On CPU the Triton interpreter computes in fp32 on the rounded values (its 16-bit tl.dot
    is wrong); the torch path runs 16-bit GEMMs for real."""
    x, D, dout = _inputs(lead, H, 1.0, seed=H + 1, dtype=dtype, d_dtype=None if d_dtype == "like x" else d_dtype)
    out, dx, dD = _run_path(path, x, D, dout, 0.3, 0.05)
    assert out.dtype == dx.dtype == dtype and dD.dtype == D.dtype
    exp = _Bounds(path, x, D, dout, 0.3, 0.05, gate=out > 0)
    exp.check_mask(out)
    _within(out, exp.out, exp.out_bound, "out")
    _within(dx, exp.dx, exp.dx_bound, "dx")
    _within(dD, exp.dD, exp.dD_bound, "dD")


@pytest.mark.parametrize("lead,H", [((2, 7), 96), ((1, 257), 32)])
def test_float64_identity(lead, H):
    """The identity itself, free of rounding: the torch path in float64 equals autograd of the
    reference's three-GEMM form, forward and both gradients, to float64 rounding."""
    x, D, dout = _inputs(lead, H, 1.0, seed=29, dtype=torch.float64)
    out, dx, dD = _run_path("torch", x, D, dout, 0.3, 0.05)
    exp = _Bounds("torch", x, D, dout, 0.3, 0.05)
    assert torch.equal(out > 0, exp.out > 0)
    for got, want in ((out, exp.out), (dx, exp.dx), (dD, exp.dD)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13 * want.abs().max().item())


def test_bf16_error_at_width_768_is_no_worse_than_the_reference():
    """The stated bf16 error (kernels/ista.py): at H = 768, 600 rows, the one-GEMM path's error
    against exact arithmetic stays within its bound, and its RMS error (out, and dx, dD with each
    path's own mask) is below the bf16 reference's, which rounds x D^T, x D^T D and x D each."""
    x, D, dout = _inputs((600,), 768, 1.0, seed=31, dtype=torch.bfloat16)
    fast = _run_path("torch", x, D, dout, 0.1, 0.1)
    exp = _Bounds("torch", x, D, dout, 0.1, 0.1, gate=fast[0] > 0)
    _within(fast[0], exp.out, exp.out_bound, "out")
    _within(fast[1], exp.dx, exp.dx_bound, "dx")
    _within(fast[2], exp.dD, exp.dD_bound, "dD")

    xr, Dr = x.clone().requires_grad_(), D.clone().requires_grad_()
    ref_out = reference.ista(xr, Dr, 0.1, 0.1)
    ref = (ref_out.detach(), *torch.autograd.grad(ref_out, (xr, Dr), dout))
    ref_exp = _Bounds("torch", x, D, dout, 0.1, 0.1, gate=ref[0] > 0)

    def rms(got, want):
        return ((got.double() - want).norm() / want.norm()).item()

    for i, name in enumerate(("out", "dx", "dD")):
        want = (exp.out, exp.dx, exp.dD)[i]
        ref_want = (ref_exp.out, ref_exp.dx, ref_exp.dD)[i]
        assert rms(fast[i], want) < 4 * 2.0**-8 and rms(fast[i], want) <= rms(ref[i], ref_want), name


# ------------------------------------------------------------------ Triton kernels, launched directly


@pytest.mark.parametrize("lead,H,eta,lmbda,scale", CASES)
def test_kernels_write_every_element(lead, H, eta, lmbda, scale):
    x, D, dout = _inputs(lead, H, scale, seed=H * 7 + len(lead))
    x2, dout2 = x.reshape(-1, H), dout.reshape(-1, H)
    B = fastpaths.ista_matrix(D, eta)
    # Poisoned outputs: an element the kernels skip stays NaN and fails.
    out = torch.full_like(x2, float("nan"))
    kista.forward_into(x2, B, eta * lmbda, out)
    exp = _Bounds("triton", x2, D, dout2, eta, lmbda, gate=out > 0)
    _within(out, exp.out, exp.out_bound, "out")
    dx, dB = torch.full_like(x2, float("nan")), torch.full_like(B, float("nan"))
    kista.backward_into(dout2, x2, B, out, dx, dB)
    _within(dx, exp.dx, exp.dx_bound, "dx")
    _within(dB, exp.dB, exp.dB_bound, "dB")


@pytest.mark.parametrize("lead,H", [((3, 7), 160), ((4, 257), 32)])
def test_16bit_tile_configs(monkeypatch, lead, H):
    """The (larger) tiles the heuristics pick for 16-bit inputs, run on fp32 data: the interpreter
    cannot multiply 16-bit tiles, but block sizes, masks and the dB split are what this checks."""
    for name in ("forward_specs", "backward_specs"):
        specs = getattr(kista, name)
        monkeypatch.setattr(kista, name, lambda shape, specs=specs: specs(shape._replace(dtype=torch.bfloat16)))
    x, D, dout = _inputs(lead, H, 1.0, seed=H)
    x2, dout2 = x.reshape(-1, H), dout.reshape(-1, H)
    B = fastpaths.ista_matrix(D, 0.3)
    out = torch.full_like(x2, float("nan"))
    kista.forward_into(x2, B, 0.3 * 0.05, out)
    dx, dB = torch.full_like(x2, float("nan")), torch.full_like(B, float("nan"))
    kista.backward_into(dout2, x2, B, out, dx, dB)
    exp = _Bounds("triton", x2, D, dout2, 0.3, 0.05, gate=out > 0)
    _within(out, exp.out, exp.out_bound, "out")
    _within(dx, exp.dx, exp.dx_bound, "dx")
    _within(dB, exp.dB, exp.dB_bound, "dB")


def test_db_reduction_splits_for_many_rows():
    shape = kista.IstaShape(4 * 257, 32, torch.float32)
    (_, db_spec) = kista.backward_specs(shape)
    assert kista.db_splits(shape, db_spec.constexprs["BLOCK_N"], db_spec.constexprs["BLOCK_K"]) > 1


def test_cost_model_counts_one_gemm_forward_two_backward():
    M, H = 3200, 768
    fwd, fwd_bytes = kista.flops_and_bytes(kista.IstaShape(M, H, torch.bfloat16), backward=False)
    both, both_bytes = kista.flops_and_bytes(kista.IstaShape(M, H, torch.bfloat16), backward=True)
    assert fwd == 2 * M * H * H + 2 * H**3
    assert both - fwd == 4 * M * H * H + 2 * H**3
    assert fwd_bytes == 2 * M * H * 2 + 3 * H * H * 4
    assert both_bytes - fwd_bytes == 6 * M * H * 2 + 5 * H * H * 4


# ------------------------------------------------------------------ dispatch, custom ops, compile


def test_dispatch_runs_triton_under_the_interpreter_or_on_cuda():
    x, D, _ = _inputs((2, 7), 32, 1.0, seed=5)
    out = ops.ista(x, D, 0.1, 0.1, fused=True)
    assert ops.report()["ista"] == "triton"
    exp = _Bounds("triton", x, D, torch.ones_like(x), 0.1, 0.1)
    _within(out, exp.out, exp.out_bound, "out")


def test_torch_paths_are_registered_and_run_on_cpu(monkeypatch):
    assert {"triton", "cpu-1gemm", "cublas-1gemm"} <= set(ops.available()["ista"])
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # Triton declines CPU tensors: the torch path runs
    x, D, _ = _inputs((2, 7), 32, 1.0, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the reference
        out = ops.ista(x.cpu(), D.cpu(), 0.1, 0.1, fused=True)
    assert ops.report()["ista"] == "cpu-1gemm"
    exp = _Bounds("torch", x.cpu(), D.cpu(), torch.ones_like(x.cpu()), 0.1, 0.1)
    _within(out, exp.out, exp.out_bound, "out")


def test_opcheck():
    x, D, dout = _inputs((1, 7), 32, 1.0, seed=9)
    B = fastpaths.ista_matrix(D, 0.3)
    torch.library.opcheck(fastpaths._ista_matrix, (D.clone().requires_grad_(), 0.3))
    torch.library.opcheck(fastpaths.ista_apply, (x.clone().requires_grad_(), B.clone().requires_grad_(), 0.015))
    torch.library.opcheck(kista.ista_fwd, (x.clone().requires_grad_(), B.clone().requires_grad_(), 0.015))
    out = kista.ista_fwd(x, B, 0.015)
    torch.library.opcheck(kista.ista_bwd, (dout, x, B, out))


@pytest.mark.parametrize("path", list(PATHS))
def test_compiles_without_graph_breaks(path):
    x, D, dout = _inputs((2, 7), 32, 1.0, seed=11)
    fn = torch.compile(PATHS[path], backend="aot_eager", fullgraph=True)
    D.requires_grad_()
    out = fn(x, D, 0.1, 0.1)
    (dD,) = torch.autograd.grad(out, D, dout)
    exp = _Bounds(path, x, D.detach(), dout, 0.1, 0.1, gate=out.detach() > 0)
    _within(dD, exp.dD, exp.dD_bound, "dD")


@pytest.mark.parametrize("path", list(PATHS))
def test_autocast_runs_in_the_autocast_dtype(path):
    x, D, _ = _inputs((2, 7), 32, 1.0, seed=15)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = PATHS[path](x, D, 0.1, 0.1)
    assert out.dtype == torch.bfloat16
    xb = x.to(torch.bfloat16)  # autocast rounds x; B comes from the fp32 D
    exp = _Bounds(path, xb, D, torch.ones_like(xb), 0.1, 0.1)
    _within(out, exp.out, exp.out_bound, "out")


@pytest.mark.parametrize("path", list(PATHS))
def test_precomputed_B_gives_the_same_result(path):
    x, D, _ = _inputs((2, 7), 48, 1.0, seed=17)
    B = fastpaths.ista_matrix(D, 0.2)
    assert B.dtype == torch.float32 and B.shape == D.shape
    assert torch.equal(PATHS[path](x, D, 0.2, 0.05, B), PATHS[path](x, D, 0.2, 0.05))


def test_precomputed_B_is_refused_while_D_needs_a_gradient():
    x, D, _ = _inputs((2, 7), 32, 1.0, seed=19)
    B = ops.ista_matrix(D, 0.1)
    with pytest.raises(ValueError, match="constant D"):
        ops.ista(x, D.requires_grad_(), 0.1, 0.1, fused=True, B=B)
    with torch.no_grad():
        ops.ista(x, D, 0.1, 0.1, fused=True, B=B)


# ------------------------------------------------------------------ B formed once while D is constant


def _counting_ista_matrix(monkeypatch) -> list:
    calls = []
    real = ops.ista_matrix

    def counted(D, eta):
        calls.append(D.data_ptr())
        return real(D, eta)

    monkeypatch.setattr(ops, "ista_matrix", counted)
    return calls


def _module_expected(module, x):
    return reference.ista(x.double(), module.D.detach().double(), module.eta, module.lmbda)


def test_module_forms_B_once_while_D_is_constant_and_again_when_D_changes(monkeypatch):
    calls = _counting_ista_matrix(monkeypatch)
    module = ISTA(48).to(DEVICE)
    module.fused = True
    x = _inputs((2, 7), 48, 1.0, seed=21)[0]

    def check(out):
        exp = _Bounds("triton", x, module.D.detach(), torch.ones_like(x), module.eta, module.lmbda)
        _within(out, exp.out, exp.out_bound, "out")

    with torch.no_grad():
        check(module(x))
        check(module(x))
        assert len(calls) == 1
        module.D.mul_(0.5)  # in place, as an optimizer or EMA update
        check(module(x))
        assert len(calls) == 2
        module.load_state_dict({"D": torch.randn_like(module.D) * 0.1})
        check(module(x))
        assert len(calls) == 3
        module.D.data = torch.randn_like(module.D) * 0.1  # new storage
        check(module(x))
        assert len(calls) == 4
        check(module(x))
        assert len(calls) == 4


def test_module_forms_B_per_call_while_training(monkeypatch):
    calls = _counting_ista_matrix(monkeypatch)
    module = ISTA(32).to(DEVICE)
    module.fused = True
    x, _, dout = _inputs((2, 7), 32, 1.0, seed=23)
    out = module(x)
    (dD,) = torch.autograd.grad(out, module.D, dout)
    assert calls == [] and module._constant_B is None  # formed inside the op, differentiably
    exp = _Bounds("triton", x, module.D.detach(), dout, module.eta, module.lmbda, gate=out.detach() > 0)
    _within(dD, exp.dD, exp.dD_bound, "dD")
    module.fused = False
    with torch.no_grad():
        module(x)
    assert calls == []  # the reference has no B


# ------------------------------------------------------------------ GPU-only cases


@cuda_only
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(
    "dtype,lead,H",
    [
        (torch.bfloat16, (256, 200), 768),
        (torch.bfloat16, (3, 257), 96),
        (torch.bfloat16, (1, 1), 1024),
        (torch.float16, (256, 200), 768),
        (torch.float32, (256, 200), 768),
    ],
)
def test_gpu_matches_reference(path, dtype, lead, H):
    x, D, dout = _inputs(lead, H, 1.0, seed=19, dtype=dtype)
    out, dx, dD = _run_path(path, x, D, dout, 0.1, 0.1)
    exp = _Bounds(path, x, D, dout, 0.1, 0.1, gate=out > 0)
    exp.check_mask(out)
    _within(out, exp.out, exp.out_bound, "out")
    _within(dx, exp.dx, exp.dx_bound, "dx")
    _within(dD, exp.dD, exp.dD_bound, "dD")
