"""Cheap previews of the predicted clean sample x0 while a sample is being denoised.

Pixel-space models: x0 already is the image. Latent models: a VAE decode per preview would cost as much
as several denoising steps, so a linear map from the latent channels to RGB, one pixel per latent
position (1/8 of the image's side), stands in for it. The map is fitted once, at start-up, from the
loaded VAE: decode random latents, average-pool the images to the latent grid, least squares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def fit_latent_rgb(decoder, channels: int, size: int = 8, samples: int = 16, seed: int = 0) -> torch.Tensor:
    """(channels + 1, 3) float32: [latent, 1] @ map ≈ the decoded image, pooled to the latent grid, in [-1, 1].

    decoder: latents (N, C, h, w) -> images (N, 3, 8h, 8w) in [-1, 1] (model.decoders.VAEDecoder). The
    latents are drawn as the sampler's x0 is distributed: unit Gaussian (DiT's latents are scaled so).
    """
    g = torch.Generator().manual_seed(seed)
    device = next(decoder.vae.parameters()).device
    z = torch.randn(samples, channels, size, size, generator=g).to(device)  # (N, C, h, w)
    images = decoder(z).float()  # (N, 3, 8h, 8w)
    pooled = F.adaptive_avg_pool2d(images, size)  # (N, 3, h, w)
    x = torch.cat([z, torch.ones_like(z[:, :1])], 1).permute(0, 2, 3, 1).reshape(-1, channels + 1)  # (N*h*w, C+1)
    y = pooled.permute(0, 2, 3, 1).reshape(-1, 3)  # (N*h*w, 3)
    return torch.linalg.lstsq(x.cpu().double(), y.cpu().double()).solution.float()


def latent_rgb(x0: torch.Tensor, rgb_map: torch.Tensor) -> torch.Tensor:
    """Latents (N, C, h, w) -> images (N, 3, h, w) in [-1, 1] through the fitted map."""
    m = rgb_map.to(x0.device)
    out = torch.einsum("nchw,cr->nrhw", x0.float(), m[:-1]) + m[-1][None, :, None, None]
    return out.clamp(-1, 1)
