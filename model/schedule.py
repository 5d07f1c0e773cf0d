"""The paper's diffusion schedule (float64 tables, as the reference computes them) and its respacing.

Linear betas 1e-4..0.02 over 1000 steps. A respaced schedule of N steps keeps the timesteps
round(i * 999 / (N - 1)); its betas are recomputed from the kept alphas_cumprod so that the
respaced chain has the same marginals. The model always sees the original integer timestep.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02


def linear_betas(num_steps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    scale = 1000 / num_steps
    return np.linspace(scale * BETA_START, scale * BETA_END, num_steps, dtype=np.float64)


def respaced_timesteps(num_steps: int, total: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The kept original timesteps, ascending: round(i * (total-1)/(N-1)).

    Accumulates the stride as a float and rounds half to even, like the reference, so that the
    rare ties land on the same side.
    """
    if not 1 <= num_steps <= total:
        raise ValueError(f"steps must be between 1 and {total}, got {num_steps}")
    stride = 1 if num_steps <= 1 else (total - 1) / (num_steps - 1)
    taken, cur = [], 0.0
    for _ in range(num_steps):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


@dataclass(frozen=True)
class DiffusionTables:
    """Per-index coefficient tables (float64) of a (possibly respaced) diffusion chain.

    Index i refers to timesteps[i] of the original process; index 0 is the least noisy.
    """

    timesteps: np.ndarray  # (S,) original integer timesteps, ascending
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_mean_coef1: np.ndarray  # multiplies the predicted x0
    posterior_mean_coef2: np.ndarray  # multiplies x_t
    posterior_log_variance_clipped: np.ndarray
    log_betas: np.ndarray

    @property
    def sqrt_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(self.alphas_cumprod)

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(1.0 - self.alphas_cumprod)


def _tables(betas: np.ndarray, timesteps: np.ndarray) -> DiffusionTables:
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # The posterior variance is 0 at index 0; the reference uses index 1's value there ("clipped").
    post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.log(betas)
    return DiffusionTables(
        timesteps=timesteps,
        betas=betas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        posterior_log_variance_clipped=post_log_var,
        log_betas=np.log(betas),
    )


@cache
def base_tables() -> DiffusionTables:
    return _tables(linear_betas(), np.arange(NUM_TRAIN_TIMESTEPS))


@lru_cache(maxsize=256)
def respaced_tables(num_steps: int) -> DiffusionTables:
    """Tables of the N-step respaced chain (the paper's DDPM and DDIM sampling)."""
    base = base_tables()
    kept = respaced_timesteps(num_steps)
    ac = base.alphas_cumprod[kept]
    betas = 1.0 - ac / np.append(1.0, ac[:-1])
    return _tables(betas, np.asarray(kept))
