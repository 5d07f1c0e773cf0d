"""x0 previews: the latent-to-RGB map fitted from a VAE, and the engine's preview cadence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import FIXTURES
from test_engine_core import Harness

from model import Pipeline
from model.previews import fit_latent_rgb, latent_rgb


class LinearVAE:
    """A decoder that IS a per-pixel linear map (upsampled 8x): the fit must recover it exactly."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        self.vae = torch.nn.Linear(1, 1)  # only for its device
        self.weight, self.bias = weight, bias

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        rgb = torch.einsum("nchw,cr->nrhw", z, self.weight) + self.bias[None, :, None, None]
        return F.interpolate(rgb, scale_factor=8, mode="nearest")


def test_the_fit_recovers_a_linear_decoder():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 3, generator=g) * 0.2, torch.randn(3, generator=g) * 0.1
    fitted = fit_latent_rgb(LinearVAE(weight, bias), 4)
    assert torch.allclose(fitted[:-1], weight, atol=1e-5) and torch.allclose(fitted[-1], bias, atol=1e-5)


def test_the_fixture_vae_preview_beats_a_flat_colour():
    pipe = Pipeline.from_pretrained(FIXTURES / "tiny_dit_diffusers")
    z = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    reference = F.adaptive_avg_pool2d(pipe.decoder(z).float(), 8)  # the real decode, at the latent grid
    error = (latent_rgb(z, fit_latent_rgb(pipe.decoder, 4)) - reference).pow(2).mean()
    flat = (reference - reference.mean((0, 2, 3), keepdim=True)).pow(2).mean()
    assert error < flat
    images = pipe.preview(z)
    assert images.shape == (8, 8, 8, 3) and images.dtype == torch.uint8


def test_previews_every_tenth_of_the_steps_never_the_last_and_only_when_asked():
    h = Harness()
    h.runner.step_seconds = 0.3  # past the 250 ms limit between two previews at every step
    wants, plain = h.request(class_id=3, steps=20, images=2, previews=True), h.request(class_id=4, steps=20)
    h.submit(wants, plain)
    h.run()
    shown = [(o.id, o.step, o.preview.shape) for o in h.outputs if o.preview is not None]
    assert [step for _, step, _ in shown] == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert all(id_ == wants.id and shape == (2, 2, 2, 3) for id_, _, shape in shown)


def test_previews_at_most_every_quarter_second():
    h = Harness()  # 10 ms per step
    r = h.request(steps=100, previews=True)
    h.submit(r)
    h.run()
    assert [o.step for o in h.outputs if o.preview is not None] == [10, 40, 70]  # every 10 steps, 250 ms apart
