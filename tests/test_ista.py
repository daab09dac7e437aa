"""The Triton ISTA op (wbdit.kernels.ista) equals wbdit.reference.ista, forward and backward.

Without a GPU the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set before
Triton is imported). Expected values come from the reference in float64. GPU-only cases
(16-bit dtypes, the seed shape) skip without CUDA.
"""

import pytest
import torch

pytest.importorskip("triton")  # tests/conftest.py runs Triton through its interpreter without a GPU

from closeness import assert_close_to_max as _close

from wbdit import ops, reference
from wbdit.kernels import ista as kista

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

# (leading shape of x, H, eta, lambda, input scale): a single row, rows not a multiple of any
# block, H not a multiple of the tiles (48, 96), default and non-default eta/lambda, inputs of
# large magnitude, and 1028 rows, enough for the dD reduction to split into fp32 partial sums.
CASES = [
    pytest.param((1, 1), 32, 0.1, 0.1, 1.0, id="1x1x32"),
    pytest.param((2, 7), 96, 0.3, 0.05, 1.0, id="2x7x96"),
    pytest.param((3, 200), 48, 1.5, 0.2, 1.0, id="3x200x48"),
    pytest.param((1, 257), 128, 0.1, 0.1, 1.0, id="1x257x128"),
    pytest.param((4, 7), 64, 0.25, 0.5, 100.0, id="4x7x64-large"),
    pytest.param((4, 257), 32, 0.7, 0.01, 1.0, id="4x257x32-split"),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _inputs(lead, H, scale, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, H, generator=g) * scale
    D = torch.randn(H, H, generator=g) / H**0.5
    dout = torch.randn(*lead, H, generator=g)
    return x.to(DEVICE, dtype), D.to(DEVICE, dtype), dout.to(DEVICE, dtype)


def _expected(x, D, dout, eta, lmbda, gate=None):
    """out, r = x - x D^T, dx and dD of the reference, in float64.

    With ``gate`` (a 0/1 tensor like x) the gradients are those of ``gate * z`` instead of
    ``relu(z)``, where ``relu(z) = reference.ista``: on GPU-sized inputs some pre-activations z lie
    within rounding of 0, and a kernel that gates them the other way is right but moves their
    gradient by a whole dout; tests pass the kernel's own gate ``out > 0`` and check separately
    that it agrees with the reference's almost everywhere.
    """
    x64, D64 = x.double().requires_grad_(), D.double().requires_grad_()
    out = reference.ista(x64, D64, eta, lmbda)
    if gate is None:
        dx, dD = torch.autograd.grad(out, (x64, D64), dout.double())
    else:
        z = x64 + eta * (x64 @ D64 - (x64 @ D64.t()) @ D64) - eta * lmbda  # reference.ista's argument of relu
        torch.testing.assert_close(torch.relu(z), out)
        dx, dD = torch.autograd.grad(z * gate.double(), (x64, D64), dout.double())
    r = (x64 - x64 @ D64.t()).detach()
    return out.detach(), r, dx, dD


@pytest.mark.parametrize("lead,H,eta,lmbda,scale", CASES)
def test_kernels_write_every_element_and_match_reference(lead, H, eta, lmbda, scale):
    x, D, dout = _inputs(lead, H, scale, seed=H * 7 + len(lead))
    exp_out, exp_r, exp_dx, exp_dD = _expected(x, D, dout, eta, lmbda)
    assert (exp_out > 0).any() and (exp_out == 0).any()  # the ReLU mask matters in this case
    x2, dout2 = x.reshape(-1, H), dout.reshape(-1, H)
    # Poisoned outputs: an element the kernels skip stays NaN and fails _close.
    r, out = torch.full_like(x2, float("nan")), torch.full_like(x2, float("nan"))
    kista.forward_into(x2, D, eta, lmbda, r, out)
    _close(out, exp_out.reshape(-1, H))
    _close(r, exp_r.reshape(-1, H))
    dx, dD = torch.full_like(x2, float("nan")), torch.full_like(D, float("nan"))
    kista.backward_into(dout2, x2, D, r, out, eta, dx, dD)
    _close(dx, exp_dx.reshape(-1, H))
    _close(dD, exp_dD)


@pytest.mark.parametrize("lead,H", [((3, 7), 160), ((4, 257), 32)])
def test_16bit_tile_configs(monkeypatch, lead, H):
    """The (larger) tiles the heuristics pick for 16-bit inputs, run on fp32 data: the interpreter
    cannot multiply 16-bit tiles, but block sizes, masks and the dD split are what this checks."""
    for name in ("forward_specs", "backward_specs"):
        specs = getattr(kista, name)
        monkeypatch.setattr(kista, name, lambda shape, specs=specs: specs(shape._replace(dtype=torch.bfloat16)))
    x, D, dout = _inputs(lead, H, 1.0, seed=H)
    exp_out, exp_r, exp_dx, exp_dD = _expected(x, D, dout, 0.3, 0.05)
    x2, dout2 = x.reshape(-1, H), dout.reshape(-1, H)
    r, out = torch.full_like(x2, float("nan")), torch.full_like(x2, float("nan"))
    kista.forward_into(x2, D, 0.3, 0.05, r, out)
    _close(r, exp_r.reshape(-1, H))
    dx, dD = torch.full_like(x2, float("nan")), torch.full_like(D, float("nan"))
    kista.backward_into(dout2, x2, D, r, out, 0.3, dx, dD)
    _close(out, exp_out.reshape(-1, H))
    _close(dx, exp_dx.reshape(-1, H))
    _close(dD, exp_dD)


def test_dd_reduction_splits_for_many_rows():
    shape = kista.IstaShape(4 * 257, 32, torch.float32)
    (*_, dd_spec) = kista.backward_specs(shape)
    assert kista.dd_splits(shape, dd_spec.constexprs["BLOCK_N"], dd_spec.constexprs["BLOCK_K"]) > 1


@pytest.mark.parametrize("lead,H", [((2, 7), 96), ((5,), 32)])
def test_autograd_matches_reference(lead, H):
    x, D, dout = _inputs(lead, H, 1.0, seed=3)
    exp_out, _, exp_dx, exp_dD = _expected(x, D, dout, 0.2, 0.05)
    x.requires_grad_()
    D.requires_grad_()
    out = kista.ista(x, D, 0.2, 0.05)
    dx, dD = torch.autograd.grad(out, (x, D), dout)
    assert out.shape == x.shape
    _close(out.detach(), exp_out)
    _close(dx, exp_dx)
    _close(dD, exp_dD)


def test_dispatch_runs_triton():
    x, D, _ = _inputs((2, 7), 32, 1.0, seed=5)
    out = ops.ista(x, D, 0.1, 0.1, fused=True)
    assert ops.report()["ista"] == "triton"
    _close(out, reference.ista(x.double(), D.double(), 0.1, 0.1))


def test_opcheck():
    x, D, dout = _inputs((1, 7), 32, 1.0, seed=9)
    torch.library.opcheck(kista.ista_fwd, (x.requires_grad_(), D.requires_grad_(), 0.3, 0.05))
    out, r = kista.ista_fwd(x.detach(), D.detach(), 0.3, 0.05)
    torch.library.opcheck(kista.ista_bwd, (dout, x.detach(), D.detach(), r, out, 0.3))


def test_compiles_without_graph_breaks():
    x, D, dout = _inputs((2, 7), 32, 1.0, seed=11)
    fn = torch.compile(kista.ista, backend="aot_eager", fullgraph=True)
    D.requires_grad_()
    (dD,) = torch.autograd.grad(fn(x, D, 0.1, 0.1), D, dout)
    _close(dD, _expected(x, D.detach(), dout, 0.1, 0.1)[3])


def test_16bit_inputs_give_16bit_outputs():
    x, D, dout = _inputs((2, 7), 32, 1.0, seed=13, dtype=torch.bfloat16)
    exp_out, _, exp_dx, exp_dD = _expected(x, D, dout, 0.1, 0.1)
    x.requires_grad_()
    D.requires_grad_()
    out = kista.ista(x, D, 0.1, 0.1)
    dx, dD = torch.autograd.grad(out, (x, D), dout)
    assert out.dtype == dx.dtype == dD.dtype == torch.bfloat16
    _close(out.detach(), exp_out, rel=2e-2)
    _close(dx, exp_dx, rel=2e-2)
    _close(dD, exp_dD, rel=2e-2)


def test_autocast_runs_in_the_autocast_dtype():
    x, D, _ = _inputs((2, 7), 32, 1.0, seed=15)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = kista.ista(x, D, 0.1, 0.1)
    assert out.dtype == torch.bfloat16
    _close(out, reference.ista(x.double(), D.double(), 0.1, 0.1), rel=2e-2)


def test_rejects_mixed_dtypes():
    x, D, _ = _inputs((1, 7), 32, 1.0, seed=17)
    with pytest.raises(TypeError, match="one dtype"):
        kista.ista(x, D.to(torch.bfloat16), 0.1, 0.1)


@cuda_only
@pytest.mark.parametrize("dtype,lead,H", [
    (torch.bfloat16, (256, 200), 768), (torch.bfloat16, (3, 257), 96), (torch.bfloat16, (1, 1), 1024),
    (torch.float16, (256, 200), 768),
])
def test_gpu_16bit_matches_reference(dtype, lead, H):
    x, D, dout = _inputs(lead, H, 1.0, seed=19, dtype=dtype)
    exp_out = _expected(x, D, dout, 0.1, 0.1)[0]
    x.requires_grad_()
    D.requires_grad_()
    out = kista.ista(x, D, 0.1, 0.1)
    dx, dD = torch.autograd.grad(out, (x, D), dout)
    _close(out.detach(), exp_out, rel=2e-2)
    assert ((out > 0) == (exp_out > 0)).double().mean() > 0.999
    _, _, exp_dx, exp_dD = _expected(x.detach(), D.detach(), dout, 0.1, 0.1, gate=out.detach() > 0)
    _close(dx, exp_dx, rel=2e-2)
    _close(dD, exp_dD, rel=3e-2)


@cuda_only
def test_gpu_fp32_seed_shape():
    x, D, dout = _inputs((256, 200), 768, 1.0, seed=23)
    exp_out = _expected(x, D, dout, 0.1, 0.1)[0]
    x.requires_grad_()
    D.requires_grad_()
    out = kista.ista(x, D, 0.1, 0.1)
    dx, dD = torch.autograd.grad(out, (x, D), dout)
    _close(out.detach(), exp_out)
    assert ((out > 0) == (exp_out > 0)).double().mean() > 0.99999
    _, _, exp_dx, exp_dD = _expected(x.detach(), D.detach(), dout, 0.1, 0.1, gate=out.detach() > 0)
    _close(dx, exp_dx)
    _close(dD, exp_dD, rel=5e-5)  # fp32 sums over 51200 rows
