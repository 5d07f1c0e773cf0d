"""One denoising step's arithmetic: guidance and the samplers' shared update rule, on tensors.

`Denoiser` holds the network and the guidance rules; it knows nothing about which samples are in
flight. `model/batch.py` (the in-flight batch, one row per sample) runs ONE forward pass for all
in-flight samples, calls `guide` and `update` here, and writes the results back to its rows.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .cache import OFF, Cache, computed
from .samplers import (
    A_E,
    A_X,
    FULL_INTERVAL,
    K_0,
    K_E,
    K_P,
    K_X,
    MAX_LOG,
    MIN_LOG,
    NOISE_ON,
    check_interval,
    guided_range,
)


def forward_rows(cfg_scale: float, guided: bool = True) -> int:
    """Forward-pass rows a sample occupies in a step: a guided sample needs a null-class twin. A scale
    of 1 is no guidance; `guided` False is an iteration outside the sample's guidance interval."""
    return 2 if guided and cfg_scale != 1.0 else 1


def rows_per_iteration(sampler: str, steps: int, cfg_scale: float, interval=FULL_INTERVAL,
                       cache: Cache = OFF) -> tuple[int, ...]:
    """A sample's forward rows at each of its iterations, in order (what a scheduler must budget): 0 at an
    iteration its step cache skips (model/cache.py), exact since the cache's schedule is fixed in advance."""
    return _rows_per_iteration(sampler, steps, float(cfg_scale), *check_interval(interval), cache)


@lru_cache(maxsize=4096)
def _rows_per_iteration(sampler: str, steps: int, cfg_scale: float, lo: float, hi: float,
                        cache: Cache) -> tuple[int, ...]:
    guided = guided_range(sampler, steps, (lo, hi))
    runs = computed(cache, steps, guided if cfg_scale != 1.0 else range(0))
    return tuple(forward_rows(cfg_scale, i in guided) if runs[i] else 0 for i in range(steps))


class Denoiser:
    """The network plus the guidance rules of one DiT (float32 sampler arithmetic).

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
        self.sample_shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        self.null_class = cfg.num_classes
        if cfg_channels is None:
            cfg_channels = 3 if cfg.in_channels == 4 else cfg.in_channels
        if not 1 <= cfg_channels <= cfg.in_channels:
            raise ValueError(f"cfg_channels must be between 1 and {cfg.in_channels}, got {cfg_channels}")
        self.cfg_channels = cfg_channels
        self.clip_x0 = clip_x0
        self.device = next(model.parameters()).device

    # The forward in two parts, for the feature-level step cache (model/cache.py "taylor-features"): the
    # reference DiT's (the fast path fuses the final LayerNorm into the last block, so it has no features to
    # hand out); head(features(x, t, y), t, y) == model(x, t, y).
    def features(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The hidden state entering the final layer: (N, T, D) in the model's dtype."""
        return self.model.features(x, self.model.condition(t, y))

    def head(self, h: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The final layer on features h (N, T, D) at timesteps t and classes y: (N, C_out, H, W)."""
        m = self.model
        return m.head(h.to(m.dtype), m.condition(t, y))

    def guide(self, out: torch.Tensor, num_samples: int, num_guided: int,
              scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model output (B + G, 2C, H, W) -> guided eps (B, C, H, W) and variance values (B, C, H, W).

        Rows [0, B) are the samples, the first G of them guided; rows [B, B + G) are those G samples'
        null-class twins, and `scales` (G, 1, 1, 1) their guidance scales. The guided eps are written
        over the conditional rows of `out` (float32 models), which is consumed here.
        """
        c, g = self.channels, self.cfg_channels
        # With CUDA graphs `out` is the graph's static output buffer (in float32 models `.float()` is
        # the same storage): everything read from it is consumed before the next forward overwrites it.
        out = out.float()
        eps = out[:num_samples, :c]
        if num_guided:
            cond = eps[:num_guided, :g]
            uncond = out[num_samples:, :g]
            torch.addcmul(uncond, scales, cond - uncond, out=cond)  # uncond + scale * (cond - uncond)
        return eps, out[:num_samples, c:]

    def update(self, k: torch.Tensor, x: torch.Tensor, eps: torch.Tensor,
               x0_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The update rule of model/samplers.py without the noise term: (mean, x0), each (B, C, H, W).

        k: this iteration's coefficients column-first, (NUM_COEFFS, B, 1, 1, 1): k[A_X] scales x."""
        ax = k[A_X] * x
        x0 = torch.addcmul(ax, k[A_E], eps, value=-1)  # ax - a_e * eps
        if self.clip_x0 is not None:
            x0.clamp_(*self.clip_x0)
        eps_x0 = (ax - x0).div_(k[A_E])
        # k_x x + k_0 x0 + k_e eps_x0 + k_p x0_prev, summed in that order, one pass per term
        mean = (k[K_X] * x).addcmul_(k[K_0], x0).addcmul_(k[K_E], eps_x0).addcmul_(k[K_P], x0_prev)
        return mean, x0

    @staticmethod
    def log_variance(k: torch.Tensor, var_values: torch.Tensor) -> torch.Tensor:
        """The learned log-variance (B, C, H, W) from the variance outputs (B, C, H, W); k as in `update`."""
        frac = (var_values + 1) / 2
        return frac * k[MAX_LOG] + (1 - frac) * k[MIN_LOG]

    @classmethod
    def noise_scale(cls, k: torch.Tensor, var_values: torch.Tensor) -> torch.Tensor:
        """The standard deviation of the noise added after this iteration (B, C, H, W), 0 where the plan
        adds none."""
        return k[NOISE_ON] * torch.exp(0.5 * cls.log_variance(k, var_values))
