"""Pipeline: VAE decode parity, batch invariance of seeded generation, defaults and class names."""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURES, rel_err
from safetensors.torch import load_file
from test_forward_parity import hub_style_copy

from model import Join, Pipeline, initial_noise
from model.samplers import Sampling


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(FIXTURES / "tiny_dit_diffusers")


def test_vae_decode_matches_diffusers(pipe):
    ref = load_file(str(FIXTURES / "tiny_dit_vae_reference.safetensors"))
    assert rel_err(pipe.decoder(ref["latents"]), ref["decoded"]) <= 1e-4


def test_generate_returns_rgb_images(pipe):
    images = pipe.generate([1, 2], seeds=[3, 4], sampler="ddim", steps=4, cfg_scale=2.0)
    assert images.shape == (2, 64, 64, 3) and images.dtype == torch.uint8


def test_same_seed_alone_and_in_a_mixed_batch(pipe):
    """Sample k depends only on its own seed and settings, whatever shares its forward passes."""
    alone = pipe.generate([5], seeds=[1234], sampler="ddpm", steps=8, cfg_scale=4.0)[0]
    batch = pipe.new_batch()
    batch.join([Join(0, 5, 1234, Sampling("ddpm", 8, 4.0))])
    batch.step()  # stagger the batch: the others start one step later than the sample under test
    batch.join([Join(1, 17, 99, Sampling("ddim", 8, 1.0)), Join(2, 400, 7, Sampling("dpm-solver++", 8, 2.5)),
                Join(3, 999, 2**40, Sampling("ddpm", 8, 1.5))])
    for _ in range(7):
        batch.step()
    together = pipe.decode(batch.read([0]))[0]
    assert (alone.int() - together.int()).abs().max().item() <= 1


def test_initial_noise_depends_only_on_the_seed():
    a = initial_noise([5, 6, 7], (4, 8, 8))
    b = initial_noise([7], (4, 8, 8))
    assert torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])
    big = initial_noise(list(range(16)), (4, 32, 32))
    assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1) < 0.02


def test_class_names_from_id2label_and_defaults(tmp_path):
    root = hub_style_copy(tmp_path, class_name="Transformer2DModel", bin_weights=True, id2label=True)
    p = Pipeline.from_pretrained(root)
    assert p.info.class_names[3] == "class 3, synonym"
    assert p.info.image_size == 64 and p.info.space == "latent"
    assert (p.info.defaults.sampler, p.info.defaults.steps, p.info.defaults.cfg_scale) == ("ddpm", 250, 4.0)


def test_imagenet_names_for_checkpoints_without_names():
    p = Pipeline.from_pretrained(FIXTURES / "tiny_dit.pt", vae=FIXTURES / "tiny_dit_diffusers" / "vae")
    assert len(p.info.class_names) == 1000
    assert p.info.class_names[0] == "tench, Tinca tinca" and p.info.class_names[207] == "golden retriever"


def test_latent_checkpoint_without_vae_asks_for_one():
    with pytest.raises(ValueError, match="needs a VAE"):
        Pipeline.from_pretrained(FIXTURES / "tiny_dit.safetensors")


def test_checkpoint_plus_vae_folder():
    p = Pipeline.from_pretrained(FIXTURES / "tiny_dit.pt", vae=FIXTURES / "tiny_dit_diffusers" / "vae")
    assert p.generate([0], seeds=[0], sampler="ddim", steps=2).shape == (1, 64, 64, 3)


def test_out_of_range_class_is_rejected(pipe):
    with pytest.raises(ValueError, match="outside"):
        pipe.generate([1000], seeds=[0], sampler="ddim", steps=2)
