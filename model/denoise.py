"""The per-step sampling API: a set of in-flight samples advanced together, one forward per step.

Each `SampleState` carries its own sampler, step count, position, guidance scale, class, seed and
history. `Denoiser.step(states)` turns them into the inputs (x, t, y) of ONE forward pass, guided
samples adding a null-class row (scale 1 adds none), then advances every sample from the output.
The server's scheduler drives this directly; `model.sample` is a plain loop over it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import noise as noise_lib
from .samplers import A_E, A_X, K_0, K_E, K_P, K_X, MAX_LOG, MIN_LOG, NOISE_ON, SamplerPlan, plan


@dataclass(eq=False)
class SampleState:
    """One sample in flight. `x` is (C, H, W) float32 on the model's device."""

    x: torch.Tensor
    label: int
    cfg_scale: float
    plan: SamplerPlan
    seed: int = 0
    generator: torch.Generator | None = None  # if set, per-step noise comes from it instead of the seed
    index: int = 0  # iterations done so far
    x0_prev: torch.Tensor | None = field(default=None, repr=False)  # last predicted x0 (DPM-Solver++)

    @classmethod
    def create(cls, x: torch.Tensor, label: int, *, sampler: str, steps: int, cfg_scale: float = 1.0,
               seed: int = 0, generator: torch.Generator | None = None) -> SampleState:
        if cfg_scale < 1.0:
            raise ValueError(f"cfg_scale must be >= 1, got {cfg_scale}")
        return cls(x=x, label=label, cfg_scale=float(cfg_scale), plan=plan(sampler, steps), seed=seed,
                   generator=generator)

    @property
    def done(self) -> bool:
        return self.index >= self.plan.steps

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def timestep(self) -> int:
        return self.plan.timesteps[self.index]


@dataclass
class ForwardBatch:
    """Inputs of one forward pass: rows [0, B) are the samples, rows [B, B + G) their null-class twins."""

    x: torch.Tensor  # (B + G, C, H, W)
    t: torch.Tensor  # (B + G,) int64
    y: torch.Tensor  # (B + G,) int64
    guided: torch.Tensor  # (G,) index into [0, B) of the guided samples
    scales: torch.Tensor  # (G, 1, 1, 1) their guidance scales

    @property
    def rows(self) -> int:
        return self.x.shape[0]


class Denoiser:
    """Advances in-flight samples of one DiT by one step each (float32 sampler arithmetic).

    cfg_channels: how many eps channels guidance applies to. The paper's code guides only the first 3
    of the 4 latent channels (its published FID comes from that quirk), so None means 3 for 4-channel
    latent models and all channels otherwise. clip_x0: clamp the predicted x0 to this range
    (pixel-space models); None for latent models, as in the paper.
    """

    def __init__(self, model, *, cfg_channels: int | None = None, clip_x0: tuple[float, float] | None = None):
        self.model = model
        self.forward = model  # the reference path; Pipeline.use_fast_path swaps in FastDiT / CUDA graphs
        cfg = model.config
        self.channels = cfg.in_channels
        self.null_class = cfg.num_classes
        if cfg_channels is None:
            cfg_channels = 3 if cfg.in_channels == 4 else cfg.in_channels
        if not 1 <= cfg_channels <= cfg.in_channels:
            raise ValueError(f"cfg_channels must be between 1 and {cfg.in_channels}, got {cfg_channels}")
        self.cfg_channels = cfg_channels
        self.clip_x0 = clip_x0
        self.device = next(model.parameters()).device

    def build_inputs(self, states: list[SampleState]) -> ForwardBatch:
        guided = [k for k, s in enumerate(states) if s.guided]
        x = torch.stack([s.x for s in states])  # (B, C, H, W)
        t = [s.timestep for s in states]
        y = [s.label for s in states]
        if guided:
            x = torch.cat([x, x[guided]])  # (B + G, C, H, W)
            t += [t[k] for k in guided]
            y += [self.null_class] * len(guided)
        scales = [states[k].cfg_scale for k in guided]
        dev = self.device
        return ForwardBatch(
            x=x,
            t=torch.tensor(t, dtype=torch.int64).to(dev, non_blocking=True),
            y=torch.tensor(y, dtype=torch.int64).to(dev, non_blocking=True),
            guided=torch.tensor(guided, dtype=torch.int64).to(dev, non_blocking=True),
            scales=torch.tensor(scales, dtype=torch.float32).view(-1, 1, 1, 1).to(dev, non_blocking=True),
        )

    def guide(self, batch: ForwardBatch, out: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Model output (B + G, 2C, H, W) -> guided eps (B, C, H, W) and variance values (B, C, H, W)."""
        c, g = self.channels, self.cfg_channels
        out = out.float()
        eps = out[:num_samples, :c]
        var_values = out[:num_samples, c:]
        if batch.guided.numel():
            cond = eps.index_select(0, batch.guided)[:, :g]
            uncond = out[num_samples:, :g]
            eps = eps.clone()
            eps[batch.guided, :g] = uncond + batch.scales * (cond - uncond)
        return eps, var_values

    def step_noise(self, states: list[SampleState], shape: tuple[int, ...]) -> torch.Tensor:
        """Noise for the current iteration of every state: (B, C, H, W)."""
        if all(s.generator is None for s in states):
            seeds = torch.tensor([s.seed for s in states], dtype=torch.int64)
            draws = torch.tensor([s.index + 1 for s in states], dtype=torch.int64)
            return noise_lib.gaussian(seeds.to(self.device), draws.to(self.device), shape)
        rows = []
        for s in states:
            if s.generator is not None:
                rows.append(torch.randn(shape, generator=s.generator, device=s.generator.device).to(self.device))
            else:
                z = noise_lib.gaussian(torch.tensor([s.seed]), torch.tensor([s.index + 1]), shape)[0]
                rows.append(z.to(self.device))
        return torch.stack(rows)

    def coefficients(self, states: list[SampleState]) -> torch.Tensor:
        """(B, NUM_COEFFS, 1, 1, 1) float32 coefficient rows for the current iteration of each state."""
        rows = torch.from_numpy(np.stack([s.plan.coeffs[s.index] for s in states]))
        return rows.float().to(self.device, non_blocking=True)[:, :, None, None, None]

    def posterior(self, states: list[SampleState], x: torch.Tensor, eps: torch.Tensor, var_values: torch.Tensor,
                  x0_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The update rule of model/samplers.py: (mean, log_var, noise_on, x0), each (B, C, H, W)."""
        k = self.coefficients(states).unbind(1)  # NUM_COEFFS x (B, 1, 1, 1)
        x0 = k[A_X] * x - k[A_E] * eps
        if self.clip_x0 is not None:
            x0 = x0.clamp(*self.clip_x0)
        eps_x0 = (k[A_X] * x - x0) / k[A_E]
        mean = k[K_X] * x + k[K_0] * x0 + k[K_E] * eps_x0 + k[K_P] * x0_prev
        frac = (var_values + 1) / 2
        log_var = frac * k[MAX_LOG] + (1 - frac) * k[MIN_LOG]
        return mean, log_var, k[NOISE_ON], x0

    @torch.no_grad()
    def step(self, states: list[SampleState]) -> None:
        """Advance every state (none may be done) by one iteration, with one forward pass."""
        if not states:
            return
        batch = self.build_inputs(states)
        out = self.forward(batch.x, batch.t, batch.y)  # (B + G, 2C, H, W); the model casts x to its dtype
        n = len(states)
        eps, var_values = self.guide(batch, out, n)
        x = batch.x[:n].float()
        x0_prev = torch.stack([s.x0_prev if s.x0_prev is not None else torch.zeros_like(s.x) for s in states])
        mean, log_var, noise_on, x0 = self.posterior(states, x, eps, var_values, x0_prev)
        x_next = mean
        if any(s.plan.stochastic for s in states):
            x_next = mean + noise_on * torch.exp(0.5 * log_var) * self.step_noise(states, tuple(x.shape[1:]))
        for s, xn, x0s in zip(states, x_next.unbind(0), x0.unbind(0), strict=True):
            s.x = xn
            s.x0_prev = x0s
            s.index += 1
