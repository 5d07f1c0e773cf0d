"""Timestep, class and position embeddings of DiT, exactly as the paper's reference code computes them."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (N,) -> (N, dim), [cos, sin] order.

    The frequencies are exp(-ln(max_period) * i / half) for i < half: divided by half (128), not by
    half - 1 as diffusers' port does; that small drift changes every image.
    """
    half = dim // 2
    # Built on t's device: no host-to-device copy, so the forward can be captured in a CUDA graph.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t (N,) -> (N, D): sinusoid, then Linear -> SiLU -> Linear (keys mlp.0, mlp.2)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = timestep_frequencies(t, self.frequency_size)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """y (N,) -> (N, D). Row `num_classes` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, with_null_class: bool):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + int(with_null_class), hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE's), (grid_size**2, dim), computed in float64 as the
    reference does with numpy, then returned as float32.

    The first half of the channels encodes the column index (the reference's meshgrid puts w first),
    the second half the row index; each half is [sin, cos] over dim/4 frequencies.
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        omega = torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0)
        omega = 1.0 / 10000**omega  # (dim/4,)
        out = pos.reshape(-1)[:, None] * omega[None]  # (G*G, dim/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (G*G, dim/2)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()  # (G*G, dim)
