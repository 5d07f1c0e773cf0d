"""Decoders from the sampler's space to uint8 RGB pixels: the SD VAE for latent models, identity for
pixel-space models."""

from __future__ import annotations

from pathlib import Path

import torch

LATENT_SCALE = 0.18215  # SD VAE scaling factor used by DiT


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3) uint8, rounded as the reference's save_image does."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous()


class PixelDecoder:
    """A pixel-space model's output already is the image, in `data_range`."""

    def __init__(self, data_range: tuple[float, float] = (-1.0, 1.0)):
        self.data_range = data_range

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.data_range
        return (x.float() - lo) / (hi - lo) * 2 - 1  # (N, C, H, W) in [-1, 1]


class VAEDecoder:
    """diffusers' AutoencoderKL decoder: latents (N, 4, h, w) -> images (N, 3, 8h, 8w) in [-1, 1].

    The SD VAE overflows in float16, so it runs in float32 unless told otherwise.
    """

    def __init__(self, vae, scale: float | None = None):
        self.vae = vae
        self.scale = float(scale if scale is not None else getattr(vae.config, "scaling_factor", LATENT_SCALE))

    @classmethod
    def from_folder(cls, folder: str | Path, *, device=None, dtype=torch.float32) -> VAEDecoder:
        from diffusers import AutoencoderKL  # heavy import, only for latent models

        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(
                f"{folder}: no VAE config.json here; point the VAE path at a diffusers AutoencoderKL folder "
                "(e.g. a local copy of stabilityai/sd-vae-ft-ema)"
            )
        vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        return cls(vae.to(device).eval().requires_grad_(False))

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(latents.to(dtype) / self.scale).sample.float()
