"""What dit-fetch knows how to get, where from, and under which licence."""

from __future__ import annotations

from dataclasses import dataclass

DIT_LICENSE = ("CC-BY-NC 4.0 (Meta, facebookresearch/DiT): non-commercial use only; "
               "see the model card of the source")
VAE_LICENSE = "MIT (Stability AI, sd-vae-ft-ema / sd-vae-ft-mse); see the model card of the source"


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # "hub": a Hugging Face model repo (its API publishes sha256 of large files); "url": plain files
    location: str  # the hub repo id, or a path under the files URL
    license: str
    note: str = ""


SOURCES = {s.name: s for s in [
    Source("DiT-XL-2-256", "hub", "facebook/DiT-XL-2-256", DIT_LICENSE,
           "diffusers pipeline folder with its VAE (sd-vae-ft-ema); serve with --model weights/DiT-XL-2-256"),
    Source("DiT-XL-2-512", "hub", "facebook/DiT-XL-2-512", DIT_LICENSE,
           "diffusers pipeline folder with its VAE; serve with --model weights/DiT-XL-2-512"),
    Source("DiT-XL-2-256-original", "url", "DiT/models/DiT-XL-2-256x256.pt", DIT_LICENSE,
           "the original checkpoint; serve with --model weights/DiT-XL-2-256-original/DiT-XL-2-256x256.safetensors "
           "--vae weights/sd-vae-ft-ema"),
    Source("DiT-XL-2-512-original", "url", "DiT/models/DiT-XL-2-512x512.pt", DIT_LICENSE,
           "the original checkpoint; serve with --model weights/DiT-XL-2-512-original/DiT-XL-2-512x512.safetensors "
           "--vae weights/sd-vae-ft-ema"),
    Source("sd-vae-ft-ema", "hub", "stabilityai/sd-vae-ft-ema", VAE_LICENSE, "the VAE of the paper's FID numbers"),
    Source("sd-vae-ft-mse", "hub", "stabilityai/sd-vae-ft-mse", VAE_LICENSE, "an alternative VAE decoder"),
]}

# Files of a hub repo worth fetching; everything else (README, images, .gitattributes) is skipped.
WANTED_SUFFIXES = (".json", ".safetensors", ".bin", ".pt")
