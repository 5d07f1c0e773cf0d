"""Guidance in a limited interval: which iterations are guided, what they cost, and that the batch
applies it per sample exactly as a plain loop that switches guidance per step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rel_err

from model import Denoiser, Join, SlotBatch, initial_noise, sample
from model.denoise import rows_per_iteration
from model.samplers import Sampling, guided_range, plan
from model.schedule import linear_betas

SHAPE = (4, 8, 8)


def test_guided_iterations_follow_u_equals_t_over_999():
    p = plan("dpm-solver++", 20)  # timesteps 999, 949, ..., 50
    g = guided_range("dpm-solver++", 20, (0.0, 0.7))
    assert [i in g for i in range(20)] == [t / 999 <= 0.7 for t in p.timesteps]
    assert len(g) == 14 and p.timesteps[g.start] == 699
    assert guided_range("ddim", 10, (0.0, 1.0)) == range(10)
    # ddim 10: t = 999, 888, ..., 111, 0; both bounds are inclusive
    assert guided_range("ddim", 10, [111 / 999, 333 / 999]) == range(6, 9)
    assert len(guided_range("ddim", 2, (0.3, 0.6))) == 0  # t = 999, 0: nothing in between
    assert rows_per_iteration("ddim", 4, 3.0, (0.5, 1.0)) == (2, 2, 1, 1)  # t = 999, 666, 333, 0
    assert rows_per_iteration("ddim", 4, 1.0, (0.5, 1.0)) == (1, 1, 1, 1)  # scale 1 is never guided
    for bad in [(0.5, 0.5), (0.7, 0.2), (-0.1, 0.5), (0.2, 1.5), (0.1,), (float("nan"), 1.0)]:
        with pytest.raises(ValueError, match="guidance_interval"):
            Join(0, 1, 1, Sampling("ddim", 4, 2.0, bad))


def test_the_full_interval_is_byte_identical_to_omitting_it(tiny_dit):
    noise = initial_noise([3, 4], SHAPE)
    for sampler in ("ddpm", "dpm-solver++"):
        kw = dict(cfg_scale=[4.0, 1.5], steps=6, sampler=sampler, seeds=[3, 4])
        plain = sample(tiny_dit, noise, [5, 9], **kw)
        full = sample(tiny_dit, noise, [5, 9], guidance_interval=(0, 1), **kw)
        assert torch.equal(plain, full)


def _reference_ddim(dit, noise, label, cfg, steps, interval):
    """DDIM (eta 0) over the paper's respacing from the linear schedule's alphas, guidance (first 3 eps
    channels, the paper's rule) switched on per step by u = t / 999: no batch, no coefficient tables."""
    alphas_cumprod = np.cumprod(1 - linear_betas())
    kept = sorted({round(i * 999 / (steps - 1)) for i in range(steps)})
    x = noise.clone()
    y, null = torch.tensor([label]), torch.tensor([dit.config.num_classes])
    for k, t in enumerate(reversed(kept)):
        a, a_prev = alphas_cumprod[t], (alphas_cumprod[kept[len(kept) - 2 - k]] if t else 1.0)
        tt = torch.tensor([t])
        with torch.no_grad():
            eps = dit(x, tt, y)[:, :4]
            if cfg != 1 and interval[0] <= t / 999 <= interval[1]:
                uncond = dit(x, tt, null)[:, :3]
                eps = torch.cat([uncond + cfg * (eps[:, :3] - uncond), eps[:, 3:]], 1)
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


@pytest.mark.parametrize("interval", [(0.0, 0.6), (0.25, 0.75), (0.5, 1.0)])
def test_an_interval_matches_a_plain_loop_that_switches_guidance(tiny_dit, interval):
    noise = initial_noise([21], SHAPE)
    ours = sample(tiny_dit, noise, [7], cfg_scale=4.0, steps=10, sampler="ddim", seeds=[21],
                  guidance_interval=interval)
    ref = _reference_ddim(tiny_dit, noise, 7, 4.0, 10, interval)
    assert rel_err(ours, ref) <= 1e-5
    always = _reference_ddim(tiny_dit, noise, 7, 4.0, 10, (0.0, 1.0))
    assert rel_err(ours, always) > 1e-4  # the interval changes the result: the tolerance can tell


# (slot, label, seed, sampler, steps, cfg_scale, interval, joins before step k)
MIX = [
    (0, 5, 11, "ddpm", 8, 4.0, (0.0, 0.5), 0),
    (3, 17, 12, "ddim", 6, 2.0, (0.3, 1.0), 1),
    (1, 400, 13, "dpm-solver++", 7, 2.5, (0.2, 0.6), 1),
    (7, 999, 2**40, "ddpm", 5, 1.5, (0.0, 1.0), 2),
    (2, 3, 15, "ddim", 9, 1.0, (0.1, 0.4), 0),
    (4, 8, 16, "dpm-solver++", 6, 3.0, (0.45, 0.55), 3),
]


def test_mixed_intervals_in_one_batch_equal_each_alone(tiny_dit):
    batch = SlotBatch(Denoiser(tiny_dit), capacity=2)
    done, remaining = {}, {}
    for k in range(14):
        joins = [Join(s, lab, seed, Sampling(smp, n, cfg, iv)) for s, lab, seed, smp, n, cfg, iv, at in MIX
                 if at == k]
        batch.join(joins)
        remaining.update({j.slot: j.steps for j in joins})
        if k == 4:  # a step in two halves (the out-of-memory fallback) keeps every slot's guidance in step
            batch.step(batch.active[:2])
            batch.step(batch.active[2:])
        else:
            batch.step()
        remaining = {s: r - 1 for s, r in remaining.items()}
        finished = [s for s, r in remaining.items() if r == 0]
        done.update(zip(finished, batch.read(finished), strict=True))
        batch.leave(finished)
        remaining = {s: r for s, r in remaining.items() if r}
    assert sorted(done) == sorted(m[0] for m in MIX)
    for slot, label, seed, sampler, steps, cfg, iv, _ in MIX:
        alone = sample(tiny_dit, initial_noise([seed], SHAPE), [label], cfg_scale=cfg, steps=steps,
                       sampler=sampler, seeds=[seed], guidance_interval=iv)[0]
        assert rel_err(done[slot], alone) <= 1e-4, (slot, sampler, iv)


def test_the_forward_has_the_rows_of_the_guided_samples_only(tiny_dit):
    """Each step's forward has exactly sum(rows_per_iteration) rows; the rows are rearranged only
    on the steps where some sample's guidance switches."""
    rows_seen = []

    def counting(x, t, y):
        rows_seen.append(x.shape[0])
        return tiny_dit(x, t, y)

    denoiser = Denoiser(tiny_dit)
    denoiser.forward = counting
    batch = SlotBatch(denoiser)
    specs = [("ddim", 10, 3.0, (0.0, 0.5)), ("dpm-solver++", 10, 2.0, (0.3, 0.8)), ("ddpm", 10, 4.0, (0.0, 1.0))]
    batch.join([Join(k, k, k, Sampling(smp, n, cfg, iv)) for k, (smp, n, cfg, iv) in enumerate(specs)])
    rebuilt = []
    for _ in range(10):
        before = batch._arranged
        batch.step()
        rebuilt.append(batch._arranged is not before)
    expected = [sum(r) for r in zip(*(rows_per_iteration(*s) for s in specs), strict=True)]
    assert rows_seen == expected and len(set(expected)) > 1
    flips = {g.start for g in (guided_range(smp, n, iv) for smp, n, _, iv in specs)} | \
            {g.stop for g in (guided_range(smp, n, iv) for smp, n, _, iv in specs)}
    assert [k for k, r in enumerate(rebuilt) if r] == sorted({0} | (flips - {10}))
