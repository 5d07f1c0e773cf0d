"""Step caching inside the in-flight batch (model/cache.py, SlotBatch): a cached batch of mixed samples (caches
of the model output and of the final layer's input features) equals each sample run alone with the same
setting; skipped iterations take no forward row; a steady cached step builds no tensor from Python data and
never syncs; "off" never enters the cached path."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from test_batch import _CountOps

from model import Denoiser, Join, SlotBatch, initial_noise, sample
from model.batch import COUNT, LEVEL, UCOUNT
from model.cache import PRESETS, Cache, computed
from model.denoise import rows_per_iteration
from model.samplers import Sampling, SettingError

TAYLOR2 = Cache("taylor", every=2, order=2)
TAYLOR1_W2 = Cache("taylor", every=3, order=1, warmup=2)
REUSE3 = Cache("reuse", every=3)
GUIDED2 = Cache("taylor", every=3, order=2, guided_every=2)  # its own cadence inside the guidance interval
FEATURES = Cache("taylor-features", every=3, order=2, guided_every=2, guided_warmup=2)  # forecasts the features
# (slot, label, seed, sampler, steps, cfg_scale, interval, cache, joins before step k)
MIX = [
    (0, 5, 11, "ddpm", 8, 4.0, (0.0, 1.0), TAYLOR2, 0),
    (3, 17, 12, "ddim", 7, 1.0, (0.0, 1.0), REUSE3, 1),
    (1, 400, 13, "dpm-solver++", 9, 2.5, (0.0, 0.5), TAYLOR1_W2, 1),
    (7, 999, 2**40, "ddpm", 6, 1.5, (0.3, 1.0), TAYLOR2, 2),
    (2, 3, 15, "ddim", 7, 1.0, (0.0, 1.0), Cache(), 0),
    (4, 8, 16, "dpm-solver++", 10, 4.0, (0.0, 0.6), REUSE3, 3),
    (5, 9, 17, "ddim", 6, 3.0, (0.2, 0.8), Cache("taylor", every=2, order=1), 4),
    (6, 2, 18, "dpm-solver++", 11, 4.0, (0.0, 0.5), GUIDED2, 2),
    (8, 6, 19, "ddim", 9, 3.0, (0.0, 0.6), Cache("taylor", every=3, order=1, guided_every=2, guided_warmup=2), 1),
    (9, 1, 20, "dpm-solver++", 10, 4.0, (0.0, 0.6), FEATURES, 1),
    (10, 44, 21, "ddpm", 7, 2.0, (0.3, 1.0), Cache("taylor-features", every=2, order=1), 3),
    (11, 45, 22, "ddim", 8, 1.0, (0.0, 1.0), Cache("taylor-features", every=3, order=2), 0),
]


def _alone(dit, slot):
    _, label, seed, sampler, steps, cfg, interval, cache, _ = next(m for m in MIX if m[0] == slot)
    return sample(dit, initial_noise([seed], (4, 8, 8)), [label], cfg_scale=cfg, steps=steps, sampler=sampler,
                  seeds=[seed], guidance_interval=interval, cache=cache)[0]


def _joins(mix):
    return [Join(s, lab, seed, Sampling(smp, n, cfg, iv, c)) for s, lab, seed, smp, n, cfg, iv, c, _ in mix]


def _run(batch, mix, on_step=None):
    """Join each sample at its step, step, read and free the finished ones; on_step(batch, rows the
    schedules promise for this step)."""
    timeline = {j.slot: rows_per_iteration(j.sampler, j.steps, j.cfg_scale, j.guidance_interval, j.sampling.cache)
                for j in _joins(mix)}
    done, done_iters = {}, {}
    for k in range(20):
        batch.join([j for j, m in zip(_joins(mix), mix, strict=True) if m[-1] == k])
        done_iters.update({m[0]: 0 for m in mix if m[-1] == k})
        if not done_iters:
            break
        promised = sum(timeline[s][i] for s, i in done_iters.items())
        batch.step()
        if on_step is not None:
            on_step(batch, promised)
        done_iters = {s: i + 1 for s, i in done_iters.items()}
        finished = [s for s, i in done_iters.items() if i == len(timeline[s])]
        for s, x in zip(finished, batch.read(finished), strict=True):
            done[s] = x
        batch.leave(finished)
        done_iters = {s: i for s, i in done_iters.items() if s not in finished}
    return done


def test_cached_mix_equals_each_sample_alone(tiny_dit):
    """Mixed samplers, scales, intervals, caches and join times; rows move as samples join and leave."""
    rows = []
    done = _run(SlotBatch(Denoiser(tiny_dit), capacity=2), MIX, lambda b, want: rows.append((b.rows_computed, want)))
    assert sorted(done) == sorted(m[0] for m in MIX)
    for slot in done:
        assert rel_err(done[slot], _alone(tiny_dit, slot)) <= 1e-4, slot
    # the rows the forward ran at each step are the rows the schedules promised (what the scheduler budgets)
    assert all(got == want for got, want in rows), rows
    assert any(want < full for (_, want), full in zip(rows, _full_rows(MIX), strict=False))


def _full_rows(mix):
    """Rows per step of the same mix without caches (to show that some were saved)."""
    uncached = [(*m[:7], Cache(), m[8]) for m in mix]
    rows = []
    _run(SlotBatch(Denoiser(_full_rows.dit)), uncached, lambda b, want: rows.append(want))
    return rows


@pytest.fixture(autouse=True)
def _dit_for_helpers(tiny_dit):
    _full_rows.dit = tiny_dit


def test_a_cache_changes_the_result_and_off_never_enters_the_cached_path(tiny_dit, monkeypatch):
    noise = initial_noise([3], (4, 8, 8))
    kw = dict(cfg_scale=4.0, steps=8, sampler="dpm-solver++", seeds=[3])
    off = sample(tiny_dit, noise, [5], **kw)
    assert rel_err(sample(tiny_dit, noise, [5], cache=TAYLOR2, **kw), off) > 1e-3  # it skips the network

    def refuse(*_):
        raise AssertionError("an uncached batch entered the cached path")

    monkeypatch.setattr(SlotBatch, "_step_cached", refuse)
    for cache in ("off", Cache("taylor", every=1, order=2)):  # every=1 skips nothing: no cache at all
        batch = SlotBatch(Denoiser(tiny_dit))
        batch.join([Join(0, 5, 3, Sampling("dpm-solver++", 8, 4.0, cache=cache))], x=noise)
        for _ in range(8):
            batch.step()
        assert batch.cached is None  # no cache state was even allocated
        assert torch.equal(batch.read([0]), off)


class _LinearInT(torch.nn.Module):
    """A stand-in network whose output is linear in the timestep: a first-order forecast is exact."""

    def __init__(self, dit):
        super().__init__()
        self.config = dit.config
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, y):
        c = self.config
        base = torch.linspace(-1, 1, 2 * c.in_channels * c.input_size ** 2).view(1, 2 * c.in_channels, c.input_size,
                                                                                   c.input_size)
        return base * (1 + y.view(-1, 1, 1, 1) % 3) * 1e-3 * t.view(-1, 1, 1, 1).float() - 0.5 * base


def test_taylor_forecasts_an_output_linear_in_t_exactly_and_reuse_does_not(tiny_dit):
    net = _LinearInT(tiny_dit)
    noise = initial_noise([1, 2], (4, 8, 8))
    kw = dict(cfg_scale=[1.0, 3.0], steps=10, sampler="ddim", seeds=[1, 2])  # DDIM 10: t = 999, 888, ..., 0
    off = sample(net, noise, [0, 1], **kw)
    for order in (1, 2):
        assert rel_err(sample(net, noise, [0, 1], cache=Cache("taylor", every=3, order=order, warmup=2), **kw),
                       off) <= 1e-5
    assert rel_err(sample(net, noise, [0, 1], cache=Cache("reuse", every=3, warmup=2), **kw), off) > 1e-3


def test_the_feature_cache_runs_the_final_layer_on_the_features(tiny_dit):
    """head(features(x)) is the forward; the feature cache differs from the output cache and from off; the
    sample's feature history runs on across the guidance edge, its null-class twin's starts there."""
    den = Denoiser(tiny_dit)
    x, t, y = initial_noise([1, 2, 3], (4, 8, 8)), torch.tensor([999, 500, 3]), torch.tensor([1, 2, 1000])
    assert rel_err(den.head(den.features(x, t, y), t, y), tiny_dit(x, t, y)) <= 1e-6
    noise = initial_noise([3], (4, 8, 8))
    kw = dict(cfg_scale=4.0, steps=12, sampler="dpm-solver++", seeds=[3], guidance_interval=(0.0, 0.5))
    off = sample(tiny_dit, noise, [5], **kw)
    feats = sample(tiny_dit, noise, [5], cache=FEATURES, **kw)
    outputs = sample(tiny_dit, noise, [5], cache=Cache("taylor", every=3, order=2, guided_every=2, guided_warmup=2),
                     **kw)
    assert rel_err(feats, off) > 1e-3 and rel_err(feats, outputs) > 1e-3
    batch = SlotBatch(den)
    batch.join([Join(0, 5, 3, Sampling("dpm-solver++", 12, 4.0, (0.0, 0.5), FEATURES))])
    guided = Sampling("dpm-solver++", 12, 4.0, (0.0, 0.5)).guided  # iterations 7..11 (computed: 0, 3, 6, 7, 8)
    assert guided.start == 7 and batch.feature_cache[0].shape[1:] == (16, 128)  # (S, T, D)
    for _ in range(guided.start + 2):
        batch.step()
    assert batch.meta[0, COUNT].item() == 5 and batch.meta[0, UCOUNT].item() == 2
    assert batch.meta[0, LEVEL].item() == 1
    # the preset: 11 rows at DPM-Solver++ 13 steps (0, 3, 6, then the pairs 7, 8, 10, 12)
    assert PRESETS["features3g2"] == FEATURES and FEATURES.describe() == "features3g2"
    assert rows_per_iteration("dpm-solver++", 13, 4.25, (0.0, 0.5), FEATURES) == (1, 0, 0, 1, 0, 0, 1, 2, 2, 0, 2, 0, 2)
    # it computes the last iteration at any step count (at 15: 0, 3, 6, the pairs 8, 9, 11, 13 and 14)
    assert rows_per_iteration("dpm-solver++", 15, 4.25, (0.0, 0.5), FEATURES) == (
        1, 0, 0, 1, 0, 0, 1, 0, 2, 2, 0, 2, 0, 2, 2)


def test_half_batch_cached_steps_equal_whole_steps(tiny_dit):
    """The out-of-memory fallback steps a cached batch in two subsets; the result is the same."""
    joins = _joins([(*m[:8], 0) for m in MIX])
    whole, halves = SlotBatch(Denoiser(tiny_dit)), SlotBatch(Denoiser(tiny_dit))
    whole.join(joins)
    halves.join(joins)
    slots = [j.slot for j in joins]
    for k in range(6):
        whole.step()
        if k == 3:
            halves.step(slots[:3])
            halves.step(slots[3:])
        else:
            halves.step()
    assert rel_err(halves.read(slots), whole.read(slots)) <= 1e-5


def test_a_steady_cached_step_builds_no_tensor_from_python_and_never_syncs(tiny_dit):
    batch = SlotBatch(Denoiser(tiny_dit))
    batch.join(_joins([(*m[:6], (0.0, 1.0), m[7], 0) for m in MIX]))  # guided throughout: no rearrangement
    with _CountOps() as first:
        batch.step()
    assert any("lift_fresh" in op for op in first.ops)
    for _ in range(3):  # cached and computed iterations alternate: none of them may need the host
        with _CountOps() as mode:
            batch.step()
        ops = mode.ops
        assert not [op for op in ops if "lift_fresh" in op or "_local_scalar_dense" in op], ops
        assert not mode.device_changes
        assert any("sort" in op for op in ops)  # the detector saw the cached path


def test_schedules_and_rows():
    assert computed(Cache("taylor", every=3, order=2, warmup=2), 10, range(0)) == (
        True, True, True, False, False, True, False, False, True, False)
    # a guidance interval's edges start a run: computed there, the cadence restarting
    assert computed(Cache("reuse", every=2), 9, range(5, 9)) == (True, False, True, False, True, True, False, True,
                                                                  False)
    assert rows_per_iteration("ddim", 9, 1.0, (0.0, 1.0), Cache("reuse", every=2)) == (1, 0, 1, 0, 1, 0, 1, 0, 1)
    assert sum(rows_per_iteration("dpm-solver++", 15, 4.0, (0.0, 0.5))) == 22
    assert sum(rows_per_iteration("dpm-solver++", 15, 4.0, (0.0, 0.5), PRESETS["taylor3"])) <= 11


def test_a_cadence_of_its_own_inside_the_guidance_interval():
    # every 3 outside the interval (iterations 0-4), every 2 inside it (5-10), each run from its first iteration
    assert computed(GUIDED2, 11, range(5, 11)) == (True, False, False, True, False,
                                                   True, False, True, False, True, False)
    assert computed(Cache("reuse", every=2, guided_every=3), 9, range(3, 9)) == (
        True, False, True, True, False, False, True, False, False)
    # no guidance (scale 1): one run, at `every`
    assert computed(GUIDED2, 7, range(0)) == (True, False, False, True, False, False, True)
    # the default setting: 3 rows outside the interval (0, 3, 6) and 4 pairs inside it (8, 10, 12, 14)
    assert rows_per_iteration("dpm-solver++", 15, 4.0, (0.0, 0.5), GUIDED2) == (
        1, 0, 0, 1, 0, 0, 1, 0, 2, 0, 2, 0, 2, 0, 2)
    assert Cache("taylor", every=1, order=2, guided_every=2).on  # caching inside the interval only
    # the first two guided iterations always run, the cadence counting on from the second (13 steps: 7, 8, 10, 12)
    warm = Cache("taylor", every=3, order=2, guided_every=2, guided_warmup=2)
    assert rows_per_iteration("dpm-solver++", 13, 4.0, (0.0, 0.5), warm) == (1, 0, 0, 1, 0, 0, 1, 2, 2, 0, 2, 0, 2)
    assert computed(Cache("reuse", every=4, guided_warmup=3), 10, range(4, 10)) == (
        True, False, False, False, True, True, True, False, False, False)
    assert warm.describe() == {"method": "taylor", "every": 3, "order": 2, "warmup": 0, "guided_every": 2,
                               "guided_warmup": 2}
    assert Cache.parse({"method": "taylor", "every": 3, "order": 2, "guided_every": 2}) == GUIDED2
    # a job's status names the field only where it is set (what a stored job said before it existed)
    assert "guided_every" not in Cache("taylor", every=3, order=2).describe()
    assert GUIDED2.describe() in ({"method": "taylor", "every": 3, "order": 2, "warmup": 0, "guided_every": 2},
                                  *(name for name, c in PRESETS.items() if c == GUIDED2))


@pytest.mark.parametrize("value, words", [
    ("fast", "preset"), ({"method": "fora"}, "method"), ({"method": "reuse", "order": 1}, "taylor only"),
    ({"method": "taylor", "every": 2, "order": 3}, "order"), ({"method": "taylor", "every": 0, "order": 1}, "every"),
    ({"method": "taylor", "every": 2, "order": 1, "skip": 1}, "unknown"), ({"every": 2}, "method"),
    ({"method": "reuse", "every": 2.5}, "integer"), (3, "string or an object"),
    ({"method": "taylor", "every": 2, "order": 1, "guided_every": 11}, "guided_every"),
    ({"method": "taylor", "every": 2, "order": 1, "guided_warmup": -1}, "guided_warmup"),
    ({"method": "taylor-features", "every": 2}, "order must be 1 or 2 for taylor-features"),
])
def test_bad_cache_settings_name_the_field(value, words):
    with pytest.raises(SettingError) as e:
        Sampling("ddim", 10, 2.0, cache=value)
    assert e.value.field == "cache" and words in str(e.value)


def test_a_cached_sample_joins_at_iteration_zero():
    with pytest.raises(ValueError, match="iteration 0"):
        Join(0, 1, 1, Sampling("ddim", 10, 2.0, cache="taylor2"), index=3)
