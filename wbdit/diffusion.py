"""Gaussian diffusion: noise schedules, the training loss, and the DDPM and DDIM samplers.

Notation (Ho et al. 2020; Song et al. 2021): ``a_t = prod_{s<=t} (1 - beta_s)``,
``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``. The model predicts eps ("epsilon"), x0
("x0") or ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0`` ("v").
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from wbdit.nvtx import nvtx_range

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("epsilon", "x0", "v")
SAMPLERS = ("ddim", "ddpm")


def make_betas(schedule: str, num_timesteps: int) -> np.ndarray:
    """Betas (T,) float64: "linear" 1e-4..0.02 scaled to T (DDPM), or "cosine" (Nichol & Dhariwal)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if schedule == "linear":
        scale = 1000 / num_timesteps
        # Below T=20 the scaled end exceeds 1 (1 - beta < 0): cap as the cosine schedule does.
        return np.minimum(np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64), 0.999)
    if schedule == "cosine":
        s = 0.008
        f = lambda t: math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(num_timesteps)])
    raise ValueError(f"unknown noise schedule {schedule!r}; choose from {SCHEDULES}")


class GaussianDiffusion:
    """Forward process, loss and samplers for a model ``model(x_t, t, y) -> prediction``."""

    def __init__(self, num_timesteps: int = 1000, schedule: str = "linear", prediction: str = "epsilon"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction target {prediction!r}; choose from {PREDICTIONS}")
        self.config = dict(num_timesteps=num_timesteps, schedule=schedule, prediction=prediction)
        self.num_timesteps, self.prediction = num_timesteps, prediction
        self.betas = make_betas(schedule, num_timesteps)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        a, a_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.posterior_variance = self.betas * (1 - a_prev) / (1 - a)
        self.posterior_mean_coef1 = self.betas * np.sqrt(a_prev) / (1 - a)
        self.posterior_mean_coef2 = (1 - a_prev) * np.sqrt(1 - self.betas) / (1 - a)

    @staticmethod
    def _at(arr: np.ndarray, t: Tensor, like: Tensor) -> Tensor:
        """arr[t] as a (B, 1) tensor of ``like``'s dtype and device."""
        return torch.as_tensor(arr, device=like.device)[t].to(like.dtype)[:, None]

    # ------------------------------------------------------------ forward process

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample x_t ~ q(x_t | x0) with the given noise."""
        a = self._at(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def q_posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of q(x_{t-1} | x_t, x0)."""
        return self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t

    def target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the model is trained to predict."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "x0":
            return x0
        a = self._at(self.alphas_cumprod, t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def eps_and_x0(self, out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Convert a model prediction into (eps, x0) at x_t."""
        a = self._at(self.alphas_cumprod, t, x_t)
        if self.prediction == "epsilon":
            return out, (x_t - (1 - a).sqrt() * out) / a.sqrt()
        if self.prediction == "x0":
            return (x_t - a.sqrt() * out) / (1 - a).sqrt(), out
        x0 = a.sqrt() * x_t - (1 - a).sqrt() * out
        return (1 - a).sqrt() * x_t + a.sqrt() * out, x0

    def draw_t_noise(
        self, n: int, n_features: int, generator: torch.Generator | None,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    ) -> tuple[Tensor, Tensor]:
        """The training loss's random draws for n rows: t (n,) uniform in [0, T), noise (n, n_features).

        Distributed training draws them for the whole global batch on every rank (same
        generator state everywhere) and keeps its own rows, so the draws do not depend on
        the number of ranks.
        """
        t = torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)
        return t, torch.randn((n, n_features), device=device, dtype=dtype, generator=generator)

    def training_loss(
        self, model: Callable, x0: Tensor, y: Tensor | None, generator: torch.Generator | None = None,
        t: Tensor | None = None, noise: Tensor | None = None,
    ) -> Tensor:
        """Mean squared error of the model's prediction at uniformly drawn t with Gaussian noise.

        ``t`` (B,) and ``noise`` (B, G) are drawn from ``generator`` by ``draw_t_noise`` unless given.
        """
        if t is None or noise is None:
            t, noise = self.draw_t_noise(x0.shape[0], x0.shape[1], generator, x0.device, x0.dtype)
        out = model(self.q_sample(x0, t, noise), t, y)
        return F.mse_loss(out.float(), self.target(x0, t, noise).float())

    # ------------------------------------------------------------ sampling

    def _predict(self, model, x_t, t, y, cfg_scale, clip):
        """(eps, x0) with classifier-free guidance on the model output and x0 clipped to ``clip``."""
        tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        if y is not None and cfg_scale != 1.0:
            null = torch.full_like(y, model.num_classes)
            both = model(torch.cat([x_t, x_t]), torch.cat([tt, tt]), torch.cat([y, null]))
            cond, uncond = both.float().chunk(2)
            out = uncond + cfg_scale * (cond - uncond)
        else:
            out = model(x_t, tt, y).float()
        eps, x0 = self.eps_and_x0(out, x_t, tt)
        if clip is not None:
            x0 = x0.clamp(*clip)
            a = self._at(self.alphas_cumprod, tt, x_t)
            eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return eps, x0, tt

    def timesteps(self, steps: int) -> list[int]:
        """``steps`` distinct timesteps from T-1 down to 0, evenly spaced."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be in 1..{self.num_timesteps}, got {steps}")
        # From T-1 down, so that even steps=1 starts from pure noise (not from t=0).
        return sorted({int(round(s)) for s in np.linspace(self.num_timesteps - 1, 0, steps)}, reverse=True)

    @torch.no_grad()
    def sample(
        self,
        model: Callable,
        n: int,
        n_features: int,
        y: Tensor | None = None,
        sampler: str = "ddim",
        steps: int = 50,
        eta: float = 0.0,
        cfg_scale: float = 1.0,
        clip: tuple[float, float] | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        progress: bool = False,
    ) -> Tensor:
        """Draw n samples (n, n_features) float32.

        "ddpm": ancestral sampling through all T steps with the posterior variance.
        "ddim": ``steps`` steps, ``eta`` = 0 deterministic, 1 = DDPM-like noise.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
        if n < 1 or n_features < 1:
            raise ValueError(f"need n >= 1 samples of n_features >= 1, got n={n}, n_features={n_features}")
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be >= 0, got {eta}")
        if not math.isfinite(cfg_scale):
            raise ValueError(f"cfg_scale must be finite, got {cfg_scale}")
        if y is None and cfg_scale != 1.0:
            raise ValueError(f"cfg_scale={cfg_scale} needs class labels y (classifier-free guidance of a conditional model)")
        x = torch.randn((n, n_features), device=device, generator=generator)
        seq = list(range(self.num_timesteps - 1, -1, -1)) if sampler == "ddpm" else self.timesteps(steps)
        prev_seq = seq[1:] + [-1]
        for t, t_prev in tqdm(list(zip(seq, prev_seq)), desc=f"{sampler} sampling", disable=not progress, leave=False):
            with nvtx_range(f"sample_step t={t}"):
                eps, x0, tt = self._predict(model, x, t, y, cfg_scale, clip)
                noise = torch.randn(x.shape, device=x.device, generator=generator) if t > 0 else None
                if sampler == "ddpm":
                    x = self.q_posterior_mean(x0, x, tt)
                    if noise is not None:
                        x = x + self._at(self.posterior_variance, tt, x).sqrt() * noise
                else:
                    x = self._ddim_step(x0, eps, t, t_prev, eta, noise)
        return x

    def _ddim_step(self, x0: Tensor, eps: Tensor, t: int, t_prev: int, eta: float, noise: Tensor | None) -> Tensor:
        a = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if noise is not None and sigma > 0:
            x = x + sigma * noise
        return x
