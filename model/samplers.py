"""The three samplers as per-iteration coefficient plans over one shared update rule.

Every sampler step here is, per sample and with eps the (guided) noise prediction,

    x0     = clip(a_x * x - a_e * eps)                            predicted clean sample
    eps'   = (a_x * x - x0) / a_e                                 eps re-derived from x0 (DDIM)
    mean   = k_x * x + k_0 * x0 + k_e * eps' + k_p * x0_prev      x0_prev: last iteration's x0
    logvar = f * max_log + (1 - f) * min_log,  f = (v + 1) / 2    v: the learned-variance output
    x_next = mean + noise_on * exp(logvar / 2) * noise

so a batch that mixes samplers, step counts and positions is advanced by one vectorised expression
with one coefficient row per sample. Each sampler only fills its rows:

- "ddpm": the paper's ancestral sampler with learned variance over the respaced schedule.
- "ddim": eta = 0 over the same respacing (deterministic).
- "dpm-solver++": 2nd-order multistep (midpoint), as diffusers' DPMSolverMultistepScheduler with its
  defaults (linear betas 1e-4..0.02 in float32, "linspace" timesteps, final sigma 0, first order on
  the first and last step).

Coefficients are computed once per (sampler, steps) in float64 and cached.

Guidance interval (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval"): a sample is
guided at an iteration iff lo <= t / 999 <= hi, t the original timestep the model sees there. Since a
plan's timesteps only decrease, the guided iterations of a plan form one contiguous run.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .cache import OFF, Cache
from .schedule import NUM_TRAIN_TIMESTEPS, respaced_tables

SAMPLERS = ("ddpm", "ddim", "dpm-solver++")
FULL_INTERVAL = (0.0, 1.0)  # guided at every iteration: the paper's classifier-free guidance

# Column order of a coefficient row.
A_X, A_E, K_X, K_0, K_E, K_P, MAX_LOG, MIN_LOG, NOISE_ON = range(9)
NUM_COEFFS = 9


@dataclass(frozen=True)
class SamplerPlan:
    """What one sampler does at each of its iterations, in the order they run (most noisy first)."""

    sampler: str
    timesteps: tuple[int, ...]  # original integer timestep the model sees at each iteration
    coeffs: np.ndarray  # (steps, NUM_COEFFS) float64

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def stochastic(self) -> bool:
        return bool(self.coeffs[:, NOISE_ON].any())


def _respaced_plan(sampler: str, steps: int) -> SamplerPlan:
    tb = respaced_tables(steps)
    rows = []
    for i in reversed(range(steps)):  # respaced index i, from the noisiest down to 0
        r = np.zeros(NUM_COEFFS)
        r[A_X], r[A_E] = tb.sqrt_recip_alphas_cumprod[i], tb.sqrt_recipm1_alphas_cumprod[i]
        if sampler == "ddpm":
            r[K_X], r[K_0] = tb.posterior_mean_coef2[i], tb.posterior_mean_coef1[i]
            r[MAX_LOG], r[MIN_LOG] = tb.log_betas[i], tb.posterior_log_variance_clipped[i]
            r[NOISE_ON] = float(i != 0)  # no noise is added at the last step (t = 0)
        else:  # ddim, eta = 0
            r[K_0] = np.sqrt(tb.alphas_cumprod_prev[i])
            r[K_E] = np.sqrt(1.0 - tb.alphas_cumprod_prev[i])
        rows.append(r)
    return SamplerPlan(sampler, tuple(int(t) for t in tb.timesteps[::-1]), np.stack(rows))


def dpm_solver_timesteps(steps: int) -> np.ndarray:
    """diffusers' "linspace" spacing: from 999 down, not reaching 0."""
    return np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps + 1).round()[::-1][:-1].astype(np.int64)


def _dpm_solver_plan(steps: int) -> SamplerPlan:
    # diffusers builds its schedule in float32; keep that so the sigmas are the same numbers.
    betas = torch.linspace(1e-4, 0.02, NUM_TRAIN_TIMESTEPS, dtype=torch.float32)
    ac = torch.cumprod(1.0 - betas, dim=0).numpy()
    timesteps = dpm_solver_timesteps(steps)
    all_sigmas = ((1 - ac) / ac) ** 0.5
    sigmas = np.interp(timesteps, np.arange(len(all_sigmas)), all_sigmas)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64)
    alphas = 1.0 / np.sqrt(sigmas**2 + 1.0)
    sig = sigmas * alphas
    with np.errstate(divide="ignore"):
        lambdas = np.log(alphas) - np.log(sig)  # +inf at the final sigma 0

    rows = []
    for i in range(steps):
        r = np.zeros(NUM_COEFFS)
        r[A_X], r[A_E] = 1.0 / alphas[i], sig[i] / alphas[i]
        h = lambdas[i + 1] - lambdas[i]
        phi = alphas[i + 1] * (np.exp(-h) - 1.0)  # alpha_t (e^-h - 1); e^-inf = 0 at the last step
        r[K_X] = sig[i + 1] / sig[i]
        if i == 0 or i == steps - 1:  # first order: no history yet, or the final step
            r[K_0] = -phi
        else:  # second order, midpoint: D = x0 + (x0 - x0_prev) / (2 r0)
            half_inv_r0 = 0.5 * h / (lambdas[i] - lambdas[i - 1])
            r[K_0] = -phi * (1.0 + half_inv_r0)
            r[K_P] = phi * half_inv_r0
        rows.append(r)
    return SamplerPlan("dpm-solver++", tuple(int(t) for t in timesteps), np.stack(rows))


@lru_cache(maxsize=512)
def plan(sampler: str, steps: int) -> SamplerPlan:
    """The cached plan of `sampler` over `steps` iterations."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"steps must be between 1 and {NUM_TRAIN_TIMESTEPS}, got {steps}")
    if sampler == "dpm-solver++":
        if len(set(dpm_solver_timesteps(steps).tolist())) != steps:
            raise ValueError(f"dpm-solver++ cannot take {steps} steps: its timestep spacing would repeat a "
                             "timestep; use fewer steps")
        return _dpm_solver_plan(steps)
    return _respaced_plan(sampler, steps)


def check_interval(interval) -> tuple[float, float]:
    """(lo, hi) as floats, or ValueError: two numbers with 0 <= lo < hi <= 1."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be two numbers [lo, hi], got {interval!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= lo < hi <= 1, got [{lo:g}, {hi:g}]")
    return lo, hi


class SettingError(ValueError):
    """A generation setting the samplers cannot run; `field` names it (sampler, steps, cfg_scale,
    guidance_interval or cache) and the message says what would do."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Sampling:
    """What one generation runs with, checked together: a known sampler that can take this many steps, a
    guidance scale >= 1 (1 = no guidance), an interval [lo, hi] with 0 <= lo < hi <= 1, and a step-caching
    rule (model/cache.py: "off", a preset name, a mapping or a Cache)."""

    sampler: str
    steps: int
    cfg_scale: float
    guidance_interval: tuple[float, float] = FULL_INTERVAL
    cache: Cache = OFF

    def __post_init__(self):
        try:  # the sampler's own limits too (DPM-Solver++ cannot take 1000 steps)
            plan(self.sampler, self.steps)
        except ValueError as e:
            raise SettingError("steps" if self.sampler in SAMPLERS else "sampler", str(e)) from None
        if not self.cfg_scale >= 1.0:
            raise SettingError("cfg_scale", f"cfg_scale must be >= 1, got {self.cfg_scale}")
        try:  # (lo, hi) floats, whatever sequence came (JSON gives a list)
            interval = check_interval(self.guidance_interval)
        except ValueError as e:
            raise SettingError("guidance_interval", str(e)) from None
        try:
            cache = Cache.parse(self.cache)
        except (TypeError, ValueError) as e:
            raise SettingError("cache", str(e)) from None
        object.__setattr__(self, "cfg_scale", float(self.cfg_scale))
        object.__setattr__(self, "guidance_interval", interval)
        object.__setattr__(self, "cache", cache)

    @property
    def guided(self) -> range:
        """The iterations at which guidance is on (empty for a scale of 1)."""
        return guided_range(self.sampler, self.steps, self.guidance_interval) if self.cfg_scale != 1.0 else range(0)


def guided_range(sampler: str, steps: int, interval=FULL_INTERVAL) -> range:
    """The iterations of `plan(sampler, steps)` at which guidance is on: one contiguous run, maybe empty
    (an interval narrower than the plan's timestep spacing can fall between two timesteps)."""
    return _guided_range(sampler, steps, *check_interval(interval))


@lru_cache(maxsize=4096)
def _guided_range(sampler: str, steps: int, lo: float, hi: float) -> range:
    on = [i for i, t in enumerate(plan(sampler, steps).timesteps) if lo <= t / (NUM_TRAIN_TIMESTEPS - 1) <= hi]
    return range(on[0], on[-1] + 1) if on else range(0)
