"""DiT inference core: pure PyTorch (+ diffusers for the VAE). Knows nothing of HTTP or settings.

    dit = model.load_dit("DiT-XL-2-256x256.pt")             # network, from any checkpoint form
    x = model.sample(dit, noise, labels, cfg_scale=4.0, steps=250)  # the paper's DDPM sampler
    pipe = model.Pipeline.from_pretrained("weights/fashion_dit.safetensors")
    images = pipe.generate([0, 1], seeds=[1, 2])            # uint8 (N, H, W, 3)
"""

from .batch import Join, SlotBatch
from .checkpoint import CheckpointError
from .config import PRESETS, DiTConfig, preset
from .denoise import Denoiser
from .dit import DiT
from .loading import load_dit
from .noise import initial_noise
from .pipeline import Defaults, ModelInfo, Pipeline
from .samplers import SAMPLERS
from .sampling import sample

__all__ = [
    "CheckpointError", "PRESETS", "DiTConfig", "preset", "Denoiser", "Join", "SlotBatch", "DiT", "load_dit",
    "initial_noise", "Defaults", "ModelInfo", "Pipeline", "SAMPLERS", "sample",
]
