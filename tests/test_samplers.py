"""Samplers against exact answers: DPM-Solver++(2M) on Gaussian data with the exact denoiser,
its first step against DDIM, x0 clipping, and guidance limited to an interval of t."""

from __future__ import annotations

import math

import pytest
import torch

from wbdit.diffusion import DEFAULT_STEPS, GaussianDiffusion, guidance_active

G = 64
MU = torch.linspace(-1, 1, G)
S = torch.linspace(0.05, 1.5, G)  # thin and wide genes: the thin ones are hard for few steps


class GaussianDenoiser:
    """The exact model for data x0 ~ N(MU, diag(S^2)): E[x0 | x_t] in the diffusion's parametrisation."""

    num_classes = None

    def __init__(self, diffusion: GaussianDiffusion):
        self.a = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float64)
        self.prediction = diffusion.prediction
        self.rows = []  # batch size of every call

    def __call__(self, x, t, y):
        self.rows.append(len(x))
        a = self.a[t].float()[:, None]
        x0 = MU + a.sqrt() * S**2 / (a * S**2 + 1 - a) * (x - a.sqrt() * MU)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return {"epsilon": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.prediction]


def exact_ode_solution(diffusion: GaussianDiffusion, x_T: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE from t = T-1 to the clean end maps N(sqrt(a) MU, v) to N(MU, S^2) affinely."""
    a = float(diffusion.alphas_cumprod[-1])
    return MU + S / (a * S**2 + 1 - a) ** 0.5 * (x_T - math.sqrt(a) * MU)


def draw(diffusion, sampler, steps, n=500, **kw):
    model = GaussianDenoiser(diffusion)
    out = diffusion.sample(model, n, G, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(1), **kw)
    x_T = torch.randn(n, G, generator=torch.Generator().manual_seed(1))  # the sampler's first draw
    return out, exact_ode_solution(diffusion, x_T), model


def rmse(a, b) -> float:
    return (a - b).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_dpmpp_2m_follows_the_exact_ode_in_few_steps(prediction):
    diffusion = GaussianDiffusion(prediction=prediction)
    dpm, exact, model = draw(diffusion, "dpm++2m", 10)
    ddim, _, _ = draw(diffusion, "ddim", 10)
    assert len(model.rows) == 10  # one model call per step without guidance
    # Measured: 0.027 against DDIM-10's 0.17 (second order in log-SNR against first order in t).
    assert rmse(dpm, exact) < 0.04
    assert rmse(dpm, exact) < 0.25 * rmse(ddim, exact)
    ddim50, _, _ = draw(diffusion, "ddim", 50)
    assert rmse(dpm, exact) < rmse(ddim50, exact)


def test_predictions_give_the_same_samples():
    outs = [draw(GaussianDiffusion(prediction=p), "dpm++2m", 8)[0] for p in ("epsilon", "x0", "v")]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=2e-4)


def test_first_step_is_a_ddim_step():
    diffusion = GaussianDiffusion(prediction="v")
    g = torch.Generator().manual_seed(0)
    x, x0 = torch.randn(4, G, generator=g), torch.randn(4, G, generator=g)
    t, s = 700, 400
    a = float(diffusion.alphas_cumprod[t])
    eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
    x_next, (kept, h) = diffusion._dpmpp_2m_step(x, x0, t, s, None)
    torch.testing.assert_close(x_next, diffusion._ddim_step(x0, eps, t, s, 0.0, None), rtol=1e-5, atol=1e-5)
    assert kept is x0 and h == pytest.approx(diffusion.log_snr[s] - diffusion.log_snr[t])
    assert diffusion._dpmpp_2m_step(x, x0, t, -1, None)[0] is x0  # to the clean end: x0 itself


def test_timesteps_are_even_in_log_snr_and_skip_t0():
    diffusion = GaussianDiffusion()
    ts = diffusion.timesteps(10, "dpm++2m")
    assert len(ts) == 10 and ts[0] == 999 and ts[-1] > 0 and ts == sorted(ts, reverse=True)
    gaps = -torch.diff(torch.as_tensor(diffusion.log_snr[ts]))
    assert gaps.max() / gaps.min() < 1.3  # even up to rounding t to integers
    assert diffusion.timesteps(10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]  # DDIM's: unchanged


def test_x0_is_clipped_to_per_gene_bounds():
    diffusion = GaussianDiffusion(prediction="x0")
    lo, hi = MU - 0.1, MU + 0.1  # far inside the data's spread: clipping is active everywhere
    out, _, _ = draw(diffusion, "dpm++2m", 6, clip=(lo, hi))
    assert ((out >= lo) & (out <= hi)).all()  # the last step returns the clipped x0
    assert (out == lo).any() and (out == hi).any()


class Conditional(GaussianDenoiser):
    """The Gaussian denoiser with labels: the null class (label 3) shifts nothing, a class shifts MU."""

    num_classes = 3
    label_sizes = [3]

    def drop_labels(self, y, drop):
        return torch.where(drop, torch.full_like(y, 3), y)

    def __call__(self, x, t, y):
        return super().__call__(x, t, y) + 0.1 * (y[:, None] < 3)


def test_guidance_only_inside_the_interval():
    diffusion = GaussianDiffusion()
    y = torch.zeros(5, dtype=torch.long)
    ts = diffusion.timesteps(10, "dpm++2m")
    inside = [t for t in ts if 0.3 <= t / 1000 <= 0.8]
    assert 0 < len(inside) < len(ts)
    model = Conditional(diffusion)
    diffusion.sample(model, 5, G, y=y, steps=10, cfg_scale=2.0, cfg_interval=(0.3, 0.8))
    assert model.rows == [10 if 0.3 <= t / 1000 <= 0.8 else 5 for t in ts]  # guided steps: cond + uncond
    full, none = Conditional(diffusion), Conditional(diffusion)
    diffusion.sample(full, 5, G, y=y, steps=10, cfg_scale=2.0)
    diffusion.sample(none, 5, G, y=y, steps=10, cfg_scale=2.0, cfg_interval=(0.0, 0.0))
    assert full.rows == [10] * 10 and none.rows == [5] * 10
    with pytest.raises(ValueError, match="cfg_interval"):
        diffusion.sample(model, 5, G, y=y, cfg_scale=2.0, cfg_interval=(0.8, 0.3))


def test_guidance_active():
    assert guidance_active(999, 1000, None)
    assert guidance_active(500, 1000, (0.5, 1.0)) and not guidance_active(499, 1000, (0.5, 1.0))


def test_default_steps():
    diffusion = GaussianDiffusion()
    model = GaussianDenoiser(diffusion)
    diffusion.sample(model, 2, G)
    assert len(model.rows) == DEFAULT_STEPS["dpm++2m"]
    short = GaussianDiffusion(num_timesteps=4)  # fewer timesteps than the default steps: steps=T
    model = GaussianDenoiser(short)
    short.sample(model, 2, G)
    assert model.rows and len(model.rows) == len(short.timesteps(4, "dpm++2m"))  # distinct ones: 3 of 4


def test_eta_only_for_ddim():
    diffusion = GaussianDiffusion()
    with pytest.raises(ValueError, match="eta=1.0 applies to the ddim sampler only"):
        diffusion.sample(GaussianDenoiser(diffusion), 2, G, eta=1.0)
