"""Gaussian diffusion against closed forms (float64 numpy) and sampler equivalences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wbdit.diffusion import GaussianDiffusion, make_betas
from wbdit.model import WhiteBoxDiT


def closed_form_alphas_cumprod(T: int) -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- schedules


def test_linear_schedule_is_ddpm():
    betas = make_betas("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999)
    np.testing.assert_allclose(GaussianDiffusion().alphas_cumprod, closed_form_alphas_cumprod(1000), rtol=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 100, 10])
def test_schedules_are_sane(schedule, T):
    d = GaussianDiffusion(num_timesteps=T, schedule=schedule)
    assert ((d.betas > 0) & (d.betas < 1)).all()
    a = d.alphas_cumprod
    assert (np.diff(a) < 0).all() and 0 < a[-1] < a[0] < 1
    assert a[-1] < 0.1  # the last step is (nearly) pure noise
    assert np.isfinite(d.posterior_variance).all() and (d.posterior_variance >= 0).all()


def test_cosine_schedule_closed_form():
    T, s = 50, 0.008
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    want = np.minimum(1 - f[1:] / f[:-1], 0.999)
    np.testing.assert_allclose(make_betas("cosine", T), want, rtol=1e-12)
    np.testing.assert_allclose(GaussianDiffusion(T, "cosine").alphas_cumprod[:-1], f[1:-1] / f[0], rtol=1e-6)


def test_short_linear_schedule_stays_valid():
    betas = make_betas("linear", 10)  # 1000 / T scaling would give betas up to 2
    assert betas.max() == 0.999 and betas[0] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="num_timesteps must be >= 1"):
        GaussianDiffusion(num_timesteps=0)


def test_bad_schedule_or_prediction():
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        GaussianDiffusion(schedule="quadratic")
    with pytest.raises(ValueError, match="unknown prediction target 'score'"):
        GaussianDiffusion(prediction="score")


# ---------------------------------------------------------------- forward process and posterior


def test_q_sample_closed_form():
    d = GaussianDiffusion()
    x0, noise = rand(6, 7, seed=1), rand(6, 7, seed=2)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    a = closed_form_alphas_cumprod(1000)[t.numpy()][:, None]
    want = np.sqrt(a) * x0.numpy() + np.sqrt(1 - a) * noise.numpy()
    np.testing.assert_allclose(d.q_sample(x0, t, noise).numpy(), want, rtol=1e-12, atol=1e-12)
    out32 = d.q_sample(x0.float(), t, noise.float())
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), want, rtol=1e-5, atol=1e-6)


def test_posterior_closed_form():
    T = 1000
    d = GaussianDiffusion(T)
    beta = np.linspace(1e-4, 0.02, T)
    a = closed_form_alphas_cumprod(T)
    a_prev = np.concatenate([[1.0], a[:-1]])
    np.testing.assert_allclose(d.posterior_variance, beta * (1 - a_prev) / (1 - a), rtol=1e-10)
    assert d.posterior_variance[0] == 0.0
    x0, xt = rand(5, 4, seed=3), rand(5, 4, seed=4)
    t = torch.tensor([0, 1, 2, 400, 999])
    tn = t.numpy()[:, None]
    want = (np.sqrt(a_prev[tn]) * beta[tn] / (1 - a[tn])) * x0.numpy() + (
        np.sqrt(1 - beta[tn]) * (1 - a_prev[tn]) / (1 - a[tn])
    ) * xt.numpy()
    np.testing.assert_allclose(d.q_posterior_mean(x0, xt, t).numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_is_consistent_with_the_marginals(schedule):
    """Averaging q(x_{t-1} | x_t, x0) over q(x_t | x0) gives back q(x_{t-1} | x0)."""
    d = GaussianDiffusion(200, schedule)
    a, a_prev = d.alphas_cumprod, d.alphas_cumprod_prev
    c1, c2 = d.posterior_mean_coef1, d.posterior_mean_coef2
    np.testing.assert_allclose(c1 + c2 * np.sqrt(a), np.sqrt(a_prev), rtol=1e-10)  # means
    np.testing.assert_allclose(d.posterior_variance + c2**2 * (1 - a), 1 - a_prev, rtol=1e-8, atol=1e-14)  # variances


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_prediction_conversions_invert(prediction):
    d = GaussianDiffusion(prediction=prediction)
    x0, noise = rand(5, 9, seed=5), rand(5, 9, seed=6)
    t = torch.tensor([0, 3, 250, 700, 999])
    xt = d.q_sample(x0, t, noise)
    eps, x0_hat = d.eps_and_x0(d.target(x0, t, noise), xt, t)
    torch.testing.assert_close(eps, noise, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-8, atol=1e-6)  # x0 from eps at t=999 amplifies rounding
    if prediction == "v":
        a = torch.from_numpy(closed_form_alphas_cumprod(1000))[t][:, None]
        torch.testing.assert_close(d.target(x0, t, noise), a.sqrt() * noise - (1 - a).sqrt() * x0)


def test_training_loss_is_mse_against_the_target_with_the_generators_draws():
    d = GaussianDiffusion()
    x0 = rand(8, 6, seed=7, dtype=torch.float32)
    seen = {}

    def zero_model(xt, t, y):
        seen.update(xt=xt, t=t)
        return torch.zeros_like(xt)

    loss = d.training_loss(zero_model, x0, None, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (8,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(seen["xt"], d.q_sample(x0, t, noise))
    torch.testing.assert_close(loss, noise.square().mean())


# ---------------------------------------------------------------- samplers


def test_timesteps():
    d = GaussianDiffusion(100)
    assert d.timesteps(100) == list(range(99, -1, -1))
    assert d.timesteps(1) == [99]  # one step starts from pure noise
    s = GaussianDiffusion(1000).timesteps(50)
    assert len(s) == 50 and s[0] == 999 and s[-1] == 0 and s == sorted(s, reverse=True)
    for bad in (0, 101, -1):
        with pytest.raises(ValueError, match="steps must be in 1..100"):
            d.timesteps(bad)


def _model(num_classes=3, seed=0, n_genes=12):
    torch.manual_seed(seed)
    m = WhiteBoxDiT(n_genes=n_genes, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero outputs: the zero-initialised layers get random weights
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def test_ddim_step_eta1_mean_is_the_ddpm_posterior_mean():
    d = GaussianDiffusion(1000)
    x0, noise = rand(4, 5, seed=8), rand(4, 5, seed=9)
    for t in (1, 2, 37, 500, 999):
        tt = torch.full((4,), t)
        xt = d.q_sample(x0, tt, noise)
        eps, _ = d.eps_and_x0(noise, xt, tt)
        step = d._ddim_step(x0, eps, t, t - 1, eta=1.0, noise=None)  # noise-free part: the mean
        torch.testing.assert_close(step, d.q_posterior_mean(x0, xt, tt), rtol=1e-9, atol=1e-9)
        a, a_prev = d.alphas_cumprod[t], d.alphas_cumprod[t - 1]
        sigma = math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        assert sigma**2 == pytest.approx(d.posterior_variance[t], rel=1e-9)


@pytest.mark.parametrize("conditional", [True, False])
@pytest.mark.parametrize("clip", [None, (-1.0, 1.0)])
def test_ddim_all_steps_eta1_equals_ddpm(conditional, clip):
    d = GaussianDiffusion(60)
    model = _model(3 if conditional else None)
    y = torch.tensor([0, 1, 2, 3, 1]) if conditional else None  # 3 is the null class
    kw = dict(n=5, n_features=12, y=y, clip=clip)
    ddpm = d.sample(model, sampler="ddpm", generator=torch.Generator().manual_seed(4), **kw)
    ddim = d.sample(model, sampler="ddim", steps=60, eta=1.0, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.isfinite(ddpm).all() and ddpm.std() > 0.1
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-4)
    other = d.sample(model, sampler="ddpm", generator=torch.Generator().manual_seed(5), **kw)
    assert (other - ddpm).abs().max() > 0.1  # the comparison is not vacuous


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_ddim_all_steps_eta1_equals_ddpm_other_predictions(prediction):
    d = GaussianDiffusion(30, prediction=prediction)
    model = _model(3)
    kw = dict(n=4, n_features=12, y=torch.tensor([0, 1, 2, 3]), clip=(-2.0, 2.0))
    ddpm = d.sample(model, sampler="ddpm", generator=torch.Generator().manual_seed(1), **kw)
    ddim = d.sample(model, sampler="ddim", steps=30, eta=1.0, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.isfinite(ddpm).all() and ddpm.std() > 0.1
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-4)


def test_ddim_eta0_is_deterministic_given_the_seed():
    d = GaussianDiffusion(100)
    model = _model()
    y = torch.tensor([0, 2, 1])
    run = lambda seed, **kw: d.sample(
        model,
        3,
        12,
        y=y,
        sampler="ddim",
        steps=10,  # noqa: E731
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )
    a, b = run(1), run(1)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert not torch.equal(a, run(2))
    # eta=0 uses no noise after the start: the same x_T gives the same samples whatever follows.
    x_T = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))
    calls = []
    d.sample(
        lambda x, t, yy: calls.append(x.clone()) or model(x, t, yy),
        3,
        12,
        y=y,
        sampler="ddim",
        steps=10,
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(calls[0], x_T) and len(calls) == 10


def test_ddim_one_step_returns_the_x0_prediction_from_noise():
    d = GaussianDiffusion(100)
    model = _model(None)
    out = d.sample(model, 4, 12, sampler="ddim", steps=1, generator=torch.Generator().manual_seed(0))
    x_T = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 99)
    _, x0 = d.eps_and_x0(model(x_T, t), x_T, t)
    torch.testing.assert_close(out, x0)


@pytest.mark.parametrize("scale", [1.0, 0.0, 2.5])
def test_classifier_free_guidance(scale):
    """One DDIM step from T-1 returns x0 of the guided eps: uncond + s (cond - uncond)."""
    d = GaussianDiffusion(100)
    model = _model(3)
    y = torch.tensor([0, 1, 2, 1])
    out = d.sample(
        model, 4, 12, y=y, sampler="ddim", steps=1, cfg_scale=scale, generator=torch.Generator().manual_seed(0)
    )
    x_T = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 99)
    cond, uncond = model(x_T, t, y), model(x_T, t, torch.full_like(y, 3))
    assert (cond - uncond).abs().max() > 1e-3  # labels matter in this model
    _, x0 = d.eps_and_x0(uncond + scale * (cond - uncond), x_T, t)
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)
    if scale == 1.0:
        _, x0_cond = d.eps_and_x0(cond, x_T, t)
        torch.testing.assert_close(out, x0_cond, rtol=1e-5, atol=1e-5)


def test_sampler_validates_arguments():
    d = GaussianDiffusion(20)
    model = _model(3)
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        d.sample(model, 2, 12, y=y, sampler="euler")
    with pytest.raises(ValueError, match="steps must be in 1..20"):
        d.sample(model, 2, 12, y=y, steps=0)
    with pytest.raises(ValueError, match="steps must be in 1..20"):
        d.sample(model, 2, 12, y=y, steps=21)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        d.sample(model, 2, 12, y=y, eta=-0.5)
    with pytest.raises(ValueError, match="n >= 1"):
        d.sample(model, 0, 12, y=y[:0])
    with pytest.raises(ValueError, match="cfg_scale=3.0 needs class labels"):
        d.sample(_model(None), 2, 12, cfg_scale=3.0)
    with pytest.raises(ValueError, match="cfg_scale must be finite"):
        d.sample(model, 2, 12, y=y, cfg_scale=float("nan"))


def test_clip_bounds_the_x0_prediction():
    d = GaussianDiffusion(50)
    model = _model(None)
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(5.0)  # a model predicting huge eps
    free = d.sample(model, 3, 12, steps=5, generator=torch.Generator().manual_seed(0))
    clipped = d.sample(model, 3, 12, steps=5, clip=(-0.5, 0.5), generator=torch.Generator().manual_seed(0))
    assert free.abs().max() > 1
    assert clipped.min() >= -0.5 - 1e-6 and clipped.max() <= 0.5 + 1e-6
    lo, hi = torch.full((12,), -0.2), torch.linspace(0.0, 0.4, 12)  # per-gene bounds
    per_gene = d.sample(model, 3, 12, steps=5, clip=(lo, hi), generator=torch.Generator().manual_seed(0))
    assert (per_gene >= lo - 1e-6).all() and (per_gene <= hi + 1e-6).all()
