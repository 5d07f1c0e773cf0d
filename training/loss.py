"""The paper's training objective: eps MSE plus the variational bound for the learned variance.

Used by the training script of the embedded model; inference never imports it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from model.schedule import base_tables


def _gather(table: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
    v = torch.as_tensor(table, device=t.device)[t].float()
    return v.view(-1, *([1] * (ndim - 1)))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log p(x) for data quantised to 256 levels in [-1, 1] (nats, elementwise)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return -torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def diffusion_loss(model, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean loss over the batch: MSE(eps) + VB term (bits/dim) that trains only the variance."""
    tb = base_tables()
    n, c = x0.shape[:2]
    t = torch.randint(0, len(tb.betas), (n,), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    nd = x0.ndim
    x_t = _gather(tb.sqrt_alphas_cumprod, t, nd) * x0 + _gather(tb.sqrt_one_minus_alphas_cumprod, t, nd) * noise

    out = model(x_t, t, y)
    eps, var_values = out[:, :c], out[:, c:]
    mse = ((noise - eps) ** 2).mean(dim=tuple(range(1, nd)))

    # VB term on a frozen eps: it trains the variance output only (Nichol & Dhariwal).
    frac = (var_values + 1) / 2
    log_var = frac * _gather(tb.log_betas, t, nd) + (1 - frac) * _gather(tb.posterior_log_variance_clipped, t, nd)
    pred_x0 = (
        _gather(tb.sqrt_recip_alphas_cumprod, t, nd) * x_t
        - _gather(tb.sqrt_recipm1_alphas_cumprod, t, nd) * eps.detach()
    )
    mean = _gather(tb.posterior_mean_coef1, t, nd) * pred_x0 + _gather(tb.posterior_mean_coef2, t, nd) * x_t
    true_mean = _gather(tb.posterior_mean_coef1, t, nd) * x0 + _gather(tb.posterior_mean_coef2, t, nd) * x_t
    true_log_var = _gather(tb.posterior_log_variance_clipped, t, nd)
    kl = 0.5 * (
        -1.0 + log_var - true_log_var + torch.exp(true_log_var - log_var)
        + (true_mean - mean) ** 2 * torch.exp(-log_var)
    )
    kl = kl.mean(dim=tuple(range(1, nd))) / math.log(2.0)
    nll = _discretized_gaussian_nll(x0, mean, 0.5 * log_var).mean(dim=tuple(range(1, nd))) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    return (mse + vb).mean()
