"""`sample`: the whole denoising loop for a batch, as a plain loop over the in-flight batch (model/batch.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .batch import Join, SlotBatch
from .cache import OFF
from .denoise import Denoiser
from .samplers import FULL_INTERVAL, Sampling


def sample(
    dit,
    noise: torch.Tensor,
    labels,
    *,
    cfg_scale: float | Sequence[float],
    steps: int,
    sampler: str = "ddpm",
    cfg_channels: int | None = None,
    generator: Sequence[torch.Generator] | None = None,
    seeds: Sequence[int] | None = None,
    clip_x0: tuple[float, float] | None = None,
    guidance_interval: tuple[float, float] | Sequence[tuple[float, float]] = FULL_INTERVAL,
    cache=OFF,
) -> torch.Tensor:
    """Denoise `noise` (N, C, H, W) into samples (N, C, H, W), float32.

    cfg_scale: one value or one per sample (1 = no guidance). guidance_interval: (lo, hi), or one per
    sample: guide only the iterations whose timestep t has lo <= t / 999 <= hi (the default (0, 1) is
    every iteration, the paper's guidance). cache: a step-caching rule for every sample (model/cache.py;
"off" runs the network at every iteration). Per-step noise (DDPM) for sample k comes
    from generator[k] if given, else from the counter-based generator keyed by seeds[k] (drawn from
    torch's global RNG when neither is given).
    """
    n = noise.shape[0]
    labels = [int(v) for v in torch.as_tensor(labels).reshape(-1).tolist()]
    scales = [float(cfg_scale)] * n if isinstance(cfg_scale, (int, float)) else [float(s) for s in cfg_scale]
    if len(labels) != n or len(scales) != n:
        raise ValueError(f"need one label and one cfg_scale per sample ({n}), got {len(labels)} and {len(scales)}")
    pairs = list(guidance_interval)
    intervals = [tuple(v) for v in pairs] if pairs and isinstance(pairs[0], (tuple, list)) else [tuple(pairs)] * n
    if len(intervals) != n:
        raise ValueError(f"need one guidance_interval, or one per sample ({n}), got {len(intervals)}")
    if generator is not None and len(generator) != n:
        raise ValueError(f"generator must be a list of {n} torch.Generator, one per sample")
    if seeds is None:
        seeds = torch.randint(0, 2**63 - 1, (n,)).tolist()
    batch = SlotBatch(Denoiser(dit, cfg_channels=cfg_channels, clip_x0=clip_x0), capacity=n)
    joins = [Join(k, labels[k], int(seeds[k]), Sampling(sampler, steps, scales[k], intervals[k], cache))
             for k in range(n)]
    batch.join(joins, x=noise, generators=generator)
    for _ in range(steps):
        batch.step()
    return batch.read(range(n))
