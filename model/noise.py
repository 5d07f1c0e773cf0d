"""Counter-based Gaussian noise: sample k's noise depends only on (its seed, draw index), never on its
batch mates, its position in a batch or the device's RNG state.

A 32-bit integer hash of (seed, draw, element) gives two uniforms per element pair; Box-Muller turns
them into normals. It is plain tensor arithmetic (int64 holding 32-bit values, so no multiply
overflows), so the same code runs on the CPU and inside CUDA graphs, and the same seed gives the same
noise on either device up to float rounding of log/cos.

Draw 0 is the initial noise x_T; draw i + 1 is the noise added after denoising iteration i.
"""

from __future__ import annotations

import functools
import math

import torch

_MASK = 0xFFFFFFFF
_MULT = 0x45D9F3B  # < 2**31, so (x < 2**32) * _MULT < 2**63 fits int64


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (xorshift-multiply rounds) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * _MULT) & _MASK
    x = x ^ (x >> 16)
    x = (x * _MULT) & _MASK
    return x ^ (x >> 16)


def stream_keys(seeds: torch.Tensor) -> torch.Tensor:
    """(N,) 64-bit seeds -> (N,) 32-bit per-seed keys (the part of a stream's key that its draw index
    does not change: a batch computes it once per sample, not once per step)."""
    lo, hi = seeds & _MASK, (seeds >> 32) & _MASK
    return _mix(_mix(lo) ^ hi)


def gaussian(seeds: torch.Tensor, draws: torch.Tensor, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """Standard normal noise (N, *shape), float32; row n is a function of (seeds[n], draws[n]) only."""
    seeds = torch.as_tensor(seeds, dtype=torch.int64, device=device)
    draws = torch.as_tensor(draws, dtype=torch.int64, device=seeds.device)
    return keyed_gaussian(stream_keys(seeds), draws, shape)


def keyed_gaussian(keys: torch.Tensor, draws: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`gaussian` from the seeds' `stream_keys` (N,): the same values, with the per-seed hashing done."""
    numel = math.prod(shape)
    pairs = (numel + 1) // 2
    key = _mix(keys ^ (draws & _MASK))[:, None]  # (N, 1)
    # Element pair p hashes counters 2p and 2p + 1, both in one pass; counter ^ key stays below 2**32.
    h = _mix(_counters(2 * pairs, keys.device) ^ key)  # (N, 2P)
    # 24-bit uniforms in the open interval (0, 1): log(u1) stays finite.
    u = ((h >> 8).float() + 0.5) * (1.0 / 16777216.0)
    u1, u2 = u[:, 0::2], u[:, 1::2]  # (N, P) each
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * math.pi) * u2
    z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)  # (N, 2P)
    return (z[:, :numel] if numel % 2 else z).view(len(keys), *shape)


@functools.lru_cache(maxsize=16)
def _counters(n: int, device: torch.device) -> torch.Tensor:
    """(1, n) int64 element counters, made once per size and device (not in every step)."""
    return torch.arange(n, dtype=torch.int64, device=device)[None]


def initial_noise(seeds, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """x_T for each seed: (N, *shape)."""
    seeds = torch.as_tensor(seeds, dtype=torch.int64, device=device)
    return gaussian(seeds, torch.zeros_like(seeds), shape)
