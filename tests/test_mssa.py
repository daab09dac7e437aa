"""The Triton MSSA op (wbdit.kernels.mssa) equals wbdit.reference.mssa, forward and backward.

Without a GPU the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set before
Triton is imported). Expected values come from the reference in float64, so the tolerances
measure the kernels' own fp32 error; the fp32 dW of the kernels is held to its first-order
rounding-error bound (``_dw_error_bound``), which holds whatever BLAS kernel or tensor-core path
runs the products. GPU-only cases (16-bit dtypes, the seed shape) skip without CUDA.
"""

import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")  # tests/conftest.py runs Triton through its interpreter without a GPU

from closeness import Fp32Arith, assert_within_bound, fp32_arith
from closeness import assert_close_to_max as _close

from wbdit import ops, reference
from wbdit.kernels import mssa as kmssa
from wbdit.kernels.common import dot_precision

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

# (batch, N, heads, head dim, input scale): every N in {1, 7, 200, 257} and head dim in
# {32, 64, 96, 128}, batch 1 and several, 96 (not a power of two) at N = 200 (not a multiple of
# any block), and inputs of large magnitude whose scores (~800) overflow exp unless the online
# softmax subtracts its running max.
CASES = [
    (2, 1, 2, 32, 1.0),
    (3, 7, 2, 64, 1.0),
    (1, 7, 3, 96, 1.0),
    (1, 200, 2, 96, 1.0),
    (1, 257, 1, 128, 1.0),
    (2, 257, 1, 32, 1.0),
    (1, 200, 2, 64, 10.0),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _inputs(B, N, heads, d, scale, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(B, N, heads * d, generator=g) * scale
    dout = torch.randn(B, N, heads * d, generator=g)
    return w.to(DEVICE, dtype), dout.to(DEVICE, dtype)


def _expected(w, dout, heads):
    """out, lse (B, heads, N, log2 units as the kernels store it) and dw of the reference, in float64."""
    w64 = w.double().requires_grad_()
    out = reference.mssa(w64, heads)
    (dw,) = torch.autograd.grad(out, w64, dout.double())
    B, N, C = w.shape
    wh = w64.detach().view(B, N, heads, C // heads).transpose(1, 2)
    lse = torch.logsumexp(wh @ wh.transpose(-1, -2) * (C // heads) ** -0.5, dim=-1) * math.log2(math.e)
    return out.detach(), lse, dw


def _dw_error_bound(w, dout, heads, arith: Fp32Arith):
    """Elementwise first-order bound on |dW_kernel - dW| for fp32 w, dout (B, N, heads * d).

    Every rounding of the forward and backward kernels (module docstring of wbdit.kernels.mssa)
    is bounded with ``arith``, evaluated on the exact (float64) intermediates, and propagated
    linearly; each sum's bound is its worst case over summation orders. Dominant terms on large
    inputs, of order u c |w|^2 |dO|: the backward recomputes P from a fresh score against the
    forward's lse (two roundings of one score), and dP - delta subtracts two roundings of sums
    of size |dO_i| |w|.
    """
    assert w.dtype == dout.dtype == torch.float32
    B, N, C = w.shape
    d = C // heads
    c = d**-0.5
    u = arith.u
    shape = kmssa.MssaShape(B, N, heads, d, w.dtype)
    nb_f = -(-N // kmssa.forward_specs(shape)[0].constexprs["BLOCK_N"])  # key blocks of the forward
    nb_b = -(-N // kmssa.backward_specs(shape)[1].constexprs["BLOCK_N"])
    W = w.detach().double().view(B, N, heads, d).transpose(1, 2)
    D = dout.detach().double().view(B, N, heads, d).transpose(1, 2)
    aW, aD = W.abs(), D.abs()
    S = c * W @ W.mT  # natural units; the kernels' log2 units scale every term below by log2(e)
    P = S.softmax(-1)
    lse = S.logsumexp(-1, keepdim=True)
    M = S.amax(-1, keepdim=True)
    Out = P @ W  # the forward's O
    X = D @ W.mT - (D * Out).sum(-1, keepdim=True)  # dP - delta
    dS = P * X
    PS = (P * S).sum(-1, keepdim=True)

    # One computation of the scores: a d-term dot, then the multiply by c log2(e).
    eS = c * arith.gamma(d) * (aW @ aW.mT) + u * S.abs()
    # The largest probability of a row and the mass of the others. The kernel's running max is
    # the exact argmax unless two scores tie within 2 eS; rows with pmax > 2/3 cannot tie.
    assert (2 * eS).amax() < math.log(2), "scores too large for this bound"
    pmax, jmax = P.max(-1, keepdim=True)
    tie = 3 * (1 - pmax) >= 1
    minor = torch.where(tie, torch.ones_like(pmax), 1 - pmax)
    PaW = P @ aW
    R = torch.where(tie, PaW, PaW - pmax * aW.gather(-2, jmax.expand(-1, -1, -1, d)))  # minor part of P|W|

    # Forward. 2^(s - m): score, the rounding of s - m, exp2, and the fp32 rounding of c log2(e)
    # (it scales all scores alike, so it acts like S_ij - (P S)_i).
    rho_f = eS + arith.exp2 + u * (S - M).abs() + u * (S - PS).abs()
    # l: N positive terms plus one add per key block; the rescales by alpha touch only the
    # partial sums before the row's maximum arrives (afterwards alpha = 2^0 = 1 exactly).
    l_acc = arith.sum_error(torch.ones_like(minor), minor, N + nb_f) + nb_f * u * minor
    l_alpha = (nb_f * (arith.exp2 + u) + u * (M - S.amin(-1, keepdim=True))) * minor
    # lse = m + log2(l), in natural units (a log2-unit error times ln 2).
    e_lse = (
        (P * rho_f).sum(-1, keepdim=True)
        + l_acc
        + l_alpha
        + u * lse.abs()
        + math.log(2) * arith.log2 * ((lse - M) / math.log(2)).clamp_min(1)
    )
    # O = acc / l shares p and alpha with l: p's errors move O along w_j - O (bounded with
    # Cauchy-Schwarz), then acc's sum, acc's rescales, l's own rounding and the division.
    spread = ((P @ W.square()) - Out.square()).clamp_min(0).sqrt()
    e_O = (
        (P * rho_f.square()).sum(-1, keepdim=True).sqrt() * spread
        + arith.sum_error(PaW, R, N + nb_f)
        + nb_f * u * R
        + (l_acc + u) * Out.abs()
    )
    e_delta = arith.gamma(d) * (aD * Out.abs()).sum(-1, keepdim=True) + (aD * e_O).sum(-1, keepdim=True)

    # Backward: P_IJ = 2^(s_IJ - L_I) and (P_JI)^T = 2^(s_IJ - L_J) with a fresh score s_IJ.
    rho = eS + e_lse + u * (S - lse).abs() + arith.exp2 + u * (S - PS).abs()
    rho_t = eS + e_lse.mT + u * (S - lse.mT).abs() + arith.exp2 + u * (S - PS.mT).abs()
    e_X = arith.gamma(d) * (aD @ aW.mT) + e_delta + u * X.abs()
    e_Xt = arith.gamma(d) * (aW @ aD.mT) + e_delta.mT + u * X.mT.abs()
    # c (dS + dS^T): two products, their sum, the fp32 c and the multiply.
    e_ds = c * (
        P * (e_X + (rho + u) * X.abs()) + P.mT * (e_Xt + (rho_t + u) * X.mT.abs()) + 3 * u * (dS.abs() + dS.mT.abs())
    )
    # dW_I = sum_J c (dS + dS^T)_IJ W_J + (P_JI)^T dO_J: propagated errors, then the 2N-term sum.
    terms = c * (dS + dS.mT).abs() @ aW + P.mT @ aD
    bound = e_ds @ aW + (P.mT * rho_t) @ aD + arith.gamma(2 * N + 2 * nb_b) * terms
    return bound.transpose(1, 2).reshape(B, N, C)


@pytest.mark.parametrize("B,N,heads,d,scale", CASES)
def test_kernels_write_every_element_and_match_reference(B, N, heads, d, scale):
    w, dout = _inputs(B, N, heads, d, scale, seed=N * 131 + d)
    exp_out, exp_lse, exp_dw = _expected(w, dout, heads)
    # Poisoned outputs: an element the kernels skip stays NaN and fails _close.
    out = torch.full_like(w, float("nan"))
    lse = torch.full((B, heads, N), float("nan"), device=DEVICE)
    kmssa.forward_into(w, heads, out, lse)
    _close(out, exp_out)
    _close(lse, exp_lse)
    dw = torch.full_like(w, float("nan"))
    kmssa.backward_into(dout, w, out, lse, heads, dw)
    # The flash backward loses accuracy of order u c |w|^2 |dO| on large inputs (module docstring
    # of wbdit.kernels.mssa); how much depends on the BLAS kernel, so hold dW to its error bound.
    assert_within_bound(dw, exp_dw, _dw_error_bound(w, dout, heads, fp32_arith(w)), "dw")


@pytest.mark.parametrize("B,N,heads,d", [(2, 7, 2, 32), (1, 200, 2, 96), (1, 257, 1, 64)])
def test_16bit_tile_configs(monkeypatch, B, N, heads, d):
    """The (larger) tiles the heuristics pick for 16-bit inputs, run on fp32 data: the interpreter
    cannot multiply 16-bit tiles, but block sizes and masks are what this checks."""

    def fp32_products(specs):
        # The 16-bit tiles, with the fp32 products (tf32x3 on a GPU) that fp32 data needs.
        return [
            s._replace(constexprs={**s.constexprs, "DOT_PRECISION": dot_precision(torch.float32)})
            if "DOT_PRECISION" in s.constexprs
            else s
            for s in specs
        ]

    for name in ("forward_specs", "backward_specs"):
        specs = getattr(kmssa, name)
        monkeypatch.setattr(
            kmssa, name, lambda shape, specs=specs: fp32_products(specs(shape._replace(dtype=torch.bfloat16)))
        )
    w, dout = _inputs(B, N, heads, d, 1.0, seed=N + d)
    exp_out, exp_lse, exp_dw = _expected(w, dout, heads)
    out, lse = torch.full_like(w, float("nan")), torch.full((B, heads, N), float("nan"), device=DEVICE)
    kmssa.forward_into(w, heads, out, lse)
    dw = torch.full_like(w, float("nan"))
    kmssa.backward_into(dout, w, out, lse, heads, dw)
    _close(out, exp_out)
    _close(lse, exp_lse)
    _close(dw, exp_dw)


@pytest.mark.parametrize("B,N,heads,d", [(2, 7, 2, 96), (1, 200, 1, 32)])
def test_autograd_matches_reference(B, N, heads, d):
    w, dout = _inputs(B, N, heads, d, 1.0, seed=7)
    exp_out, _, exp_dw = _expected(w, dout, heads)
    w.requires_grad_()
    out = kmssa.mssa(w, heads)
    (dw,) = torch.autograd.grad(out, w, dout)
    _close(out.detach(), exp_out)
    _close(dw, exp_dw)


def test_dispatch_runs_triton():
    w, _ = _inputs(1, 7, 2, 32, 1.0, seed=3)
    out = ops.mssa(w, 2, fused=True)
    assert ops.report()["mssa"] == "triton"
    _close(out, reference.mssa(w.double(), 2))


def test_opcheck():
    w, dout = _inputs(1, 7, 2, 32, 1.0, seed=5)
    torch.library.opcheck(kmssa.mssa_fwd, (w.requires_grad_(), 2))
    out, lse = kmssa.mssa_fwd(w.detach(), 2)
    torch.library.opcheck(kmssa.mssa_bwd, (dout, w.detach(), out, lse, 2))


def test_compiles_without_graph_breaks():
    w, dout = _inputs(2, 7, 2, 32, 1.0, seed=9)
    fn = torch.compile(kmssa.mssa, backend="aot_eager", fullgraph=True)
    w.requires_grad_()
    (dw,) = torch.autograd.grad(fn(w, 2), w, dout)
    _close(dw, _expected(w.detach(), dout, 2)[2])


def test_16bit_inputs_give_16bit_outputs():
    w, dout = _inputs(2, 7, 2, 32, 1.0, seed=11, dtype=torch.bfloat16)
    exp_out, _, exp_dw = _expected(w, dout, 2)
    w.requires_grad_()
    out = kmssa.mssa(w, 2)
    (dw,) = torch.autograd.grad(out, w, dout)
    assert out.dtype == dw.dtype == torch.bfloat16
    _close(out.detach(), exp_out, rel=2e-2)
    _close(dw, exp_dw, rel=2e-2)


def test_rejects_unsupported_inputs():
    with pytest.raises(ValueError, match="head dims up to 128"):
        kmssa.mssa(torch.randn(1, 4, 256, device=DEVICE), 1)
    with pytest.raises(ValueError, match="divisible"):
        kmssa.mssa(torch.randn(1, 4, 66, device=DEVICE), 4)


def test_without_triton_the_import_fails_cleanly_and_ops_says_why():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "try:\n    import wbdit.kernels\nexcept ImportError:\n    pass\nelse:\n    sys.exit('imported')\n"
        "from wbdit import ops\nprint(ops.available()['unavailable'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "triton: ModuleNotFoundError" in proc.stdout  # a subclass of ImportError


@cuda_only
@pytest.mark.parametrize(
    "dtype,B,N,heads,d",
    [
        (torch.bfloat16, 256, 200, 8, 96),
        (torch.bfloat16, 4, 257, 4, 128),
        (torch.bfloat16, 8, 200, 12, 64),
        (torch.bfloat16, 2, 1, 2, 32),
        (torch.float16, 256, 200, 8, 96),
    ],
)
def test_gpu_16bit_matches_reference(dtype, B, N, heads, d):
    w, dout = _inputs(B, N, heads, d, 1.0, seed=13, dtype=dtype)
    exp_out, _, exp_dw = _expected(w, dout, heads)
    w.requires_grad_()
    out = kmssa.mssa(w, heads)
    (dw,) = torch.autograd.grad(out, w, dout)
    _close(out.detach(), exp_out, rel=2e-2)
    _close(dw, exp_dw, rel=3e-2)


@cuda_only
def test_gpu_fp32_seed_shape():
    w, dout = _inputs(256, 200, 8, 96, 1.0, seed=17)
    exp_out, _, exp_dw = _expected(w, dout, 8)
    w.requires_grad_()
    out = kmssa.mssa(w, 8)
    (dw,) = torch.autograd.grad(out, w, dout)
    _close(out.detach(), exp_out)
    _close(dw, exp_dw)
