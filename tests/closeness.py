"""Tolerances shared by the kernel tests.

``assert_close_to_max``: relative to the expected tensor's largest magnitude.
``assert_within_bound``: elementwise against an error bound, built with an ``Fp32Arith`` error
model of the arithmetic the kernel runs (first order in the unit roundoff, worst case over the
order of every sum, so it holds whichever BLAS or tensor-core path computes the products).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FP32_U = 2.0**-24  # unit roundoff of fp32, round to nearest


def assert_close_to_max(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to ``rel`` of the expected tensor's largest magnitude; NaN or inf never passes."""
    assert torch.isfinite(actual).all()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rel, atol=rel * max(scale, 1e-30))


class Fp32Arith(NamedTuple):
    """First-order error model of a kernel's fp32 arithmetic.

    A product sum of n terms t_k = x_k y_k, summed in any order (sequential, pairwise, blocked,
    with or without FMA), computes sum t_k (1 + a_k) + sum_steps e_step with |a_k| <= ``mul``
    and each addition's |e_step| <= ``add`` |its result| <= ``add`` sum |t_k|: the classical
    gamma_n bound |error| <= (mul + n add) sum |t_k| (Higham, Accuracy and Stability, 3.1).
    """

    u: float  # one elementwise fp32 operation (add, multiply, divide, convert)
    mul: float  # relative error of one product inside a dot
    add: float  # relative error of one addition inside a dot
    adds_per_term: int  # additions per term of a dot (tf32x3 runs three dots)
    exp2: float  # relative error of exp2
    log2: float  # absolute error of log2 (log2 units), per unit of |result| and at least once

    def gamma(self, n: int) -> float:
        """Bound on |computed - exact| / sum |t_k| for a product sum of n terms."""
        return self.mul + (self.adds_per_term * n + 2) * self.add

    def sum_error(self, abs_sum: torch.Tensor, abs_minor: torch.Tensor, n: int) -> torch.Tensor:
        """Bound on the error of a sum of n terms with sum |t| = ``abs_sum`` whose terms other
        than the largest have sum |t| <= ``abs_minor``.

        The gamma bound, or, sharper when one term dominates (a softmax row near one-hot): an
        addition's rounding error is at most the smaller operand (the larger one is itself a
        float that close), and every operand that is not the running sum holding the largest
        term is a partial sum of the minor terms; the products keep their relative error.
        """
        return torch.minimum(self.gamma(n) * abs_sum, n * abs_minor + (self.mul + self.add) * abs_sum)


# The Triton interpreter: tl.dot is numpy's fp32 matmul (OpenBLAS; the kernel differs per CPU,
# which changes the order of the sums but not this bound), elementwise math is numpy's fp32
# (exp2 and log2 within 4 ulp = 8 u).
FP32_IEEE = Fp32Arith(u=FP32_U, mul=FP32_U, add=FP32_U, adds_per_term=1, exp2=8 * FP32_U, log2=8 * FP32_U)

# A GPU's tf32x3 dot (Triton's 3xTF32: a = a_hi + a_lo with tf32 parts, a b ~ a_hi b_hi + a_hi b_lo
# + a_lo b_hi in three tf32 tensor-core dots). Each tf32 part keeps 11 significant bits, so even
# with truncating conversions the dropped a_lo b_lo and the residuals of a_lo and b_lo are each
# <= 2^-20 |a b| (mul = 3 * 2^-20 = 48 u); tensor cores accumulate in fp32 but may truncate
# (add = 2 u); the three dots add 3 terms per product. ex2.approx / lg2.approx: within 2^-20.
FP32_TF32X3 = Fp32Arith(u=FP32_U, mul=48 * FP32_U, add=2 * FP32_U, adds_per_term=3, exp2=16 * FP32_U, log2=16 * FP32_U)


def fp32_arith(t: torch.Tensor) -> Fp32Arith:
    """The error model of the kernels' fp32 path on ``t``'s device."""
    return FP32_TF32X3 if t.is_cuda else FP32_IEEE


def assert_within_bound(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str = "") -> None:
    """|actual - expected| <= bound elementwise; NaN or inf in actual never passes."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert torch.isfinite(bound).all() and (bound >= 0).all(), f"{what}: bad bound"
    err = (actual.double() - expected.double()).abs()
    ratio = err / bound.double().clamp_min(1e-300)
    worst = int(ratio.argmax())
    if not (err <= bound).all():  # NaN compares False, so it fails here too
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
        raise AssertionError(
            f"{what}: {int((err > bound).sum())} of {err.numel()} elements exceed the error bound; worst at {idx}: "
            f"|{actual.flatten()[worst].item():.9g} - {expected.flatten()[worst].item():.9g}| = "
            f"{err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g} "
            f"(x{ratio.flatten()[worst].item():.3g})"
        )
