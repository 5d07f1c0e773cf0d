"""Sampler parity with the original DiT diffusion code (DDIM, DDPM) and diffusers (DPM-Solver++)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from model import Denoiser, Join, SlotBatch, sample
from model.samplers import Sampling, plan
from model.schedule import respaced_timesteps

SAMPLE_TOL = 1e-3

DDIM_CASES = [(10, 1.0, 3), (10, 1.5, 3), (10, 4.0, 3), (10, 4.0, 4), (25, 4.0, 3)]


@pytest.mark.parametrize("steps,scale,channels", DDIM_CASES)
def test_ddim_matches_reference(tiny_dit, reference, steps, scale, channels):
    key = f"ddim_steps{steps}_cfg{scale}_ch{channels}"
    out = sample(tiny_dit, reference[f"{key}_noise"], reference[f"{key}_labels"], cfg_scale=scale, steps=steps,
                 sampler="ddim", cfg_channels=channels)
    assert rel_err(out, reference[f"{key}_out"]) <= SAMPLE_TOL


@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_matches_diffusers(tiny_dit, reference, steps):
    key = f"dpmpp2m_steps{steps}_cfg4.0_ch3"
    assert list(plan("dpm-solver++", steps).timesteps) == reference[f"{key}_timesteps"].tolist()
    out = sample(tiny_dit, reference[f"{key}_noise"], reference[f"{key}_labels"], cfg_scale=4.0, steps=steps,
                 sampler="dpm-solver++")
    assert rel_err(out, reference[f"{key}_out"]) <= SAMPLE_TOL


def test_ddpm_step_mean_and_logvar_match_reference(tiny_dit, reference):
    assert list(plan("ddpm", 10).timesteps) == reference["ddpm10_timesteps"].flip(0).tolist()
    labels = reference["ddpm10_labels"].tolist()
    for i in range(10):  # respaced index i; the sampler reaches it at iteration 9 - i
        x = reference[f"ddpm10_cfg4.0_ch3_step{i}_x"]
        batch = SlotBatch(Denoiser(tiny_dit))
        batch.join([Join(k, labels[k], 0, Sampling("ddpm", 10, 4.0), index=9 - i) for k in range(len(x))], x=x)
        p = batch.posterior()
        mean, log_var = p.mean, p.log_var
        assert rel_err(mean, reference[f"ddpm10_cfg4.0_ch3_step{i}_mean"]) <= SAMPLE_TOL, i
        assert rel_err(log_var, reference[f"ddpm10_cfg4.0_ch3_step{i}_logvar"]) <= SAMPLE_TOL, i


def test_ddpm_adds_no_noise_at_the_last_step(tiny_dit, reference):
    """With the same seed the chain is reproducible, and the final step (t = 0) is deterministic."""
    noise = reference["ddim_steps10_cfg4.0_ch3_noise"]
    labels = reference["ddim_steps10_cfg4.0_ch3_labels"]
    a = sample(tiny_dit, noise, labels, cfg_scale=4.0, steps=10, seeds=[1, 2, 3][: len(noise)])
    b = sample(tiny_dit, noise, labels, cfg_scale=4.0, steps=10, seeds=[1, 2, 3][: len(noise)])
    assert torch.equal(a, b)
    assert plan("ddpm", 10).coeffs[-1, 8] == 0.0  # NOISE_ON of the t = 0 row


def test_ddpm_generators_drive_per_step_noise(tiny_dit, reference):
    noise = reference["ddim_steps10_cfg1.0_ch3_noise"][:2]
    labels = [1, 2]

    def run():
        gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
        return sample(tiny_dit, noise, labels, cfg_scale=1.0, steps=5, generator=gens)

    assert torch.equal(run(), run())


def test_respacing_follows_the_paper():
    assert respaced_timesteps(10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert respaced_timesteps(1000) == list(range(1000))
    for n in (2, 25, 50, 250):
        kept = respaced_timesteps(n)
        assert len(kept) == n and kept[0] == 0 and kept[-1] == 999
        assert kept == [round(i * 999 / (n - 1)) for i in range(n)]


def test_guidance_rows_only_for_guided_samples(tiny_dit):
    rows = []
    denoiser = Denoiser(tiny_dit)
    forward = denoiser.forward
    denoiser.forward = lambda x, t, y: rows.append(y.tolist()) or forward(x, t, y)
    batch = SlotBatch(denoiser)
    batch.join([Join(k, k, k, Sampling("ddim", 5, s)) for k, s in enumerate([1.0, 4.0, 1.0])])
    batch.step()
    assert rows == [[1, 0, 2, 1000]]  # 3 samples, the guided one first, + its null-class twin


def test_bad_sampler_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown sampler"):
        plan("euler", 10)
    with pytest.raises(ValueError, match="steps"):
        plan("ddim", 0)
    with pytest.raises(ValueError, match="repeat"):  # diffusers' spacing repeats a timestep at 1000 steps
        plan("dpm-solver++", 1000)
    with pytest.raises(ValueError, match="cfg_scale"):
        Join(0, 0, 0, Sampling("ddim", 5, 0.5))
