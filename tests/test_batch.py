"""The slot-indexed batch: mixed, staggered samples equal each sample run alone; a steady step builds
no tensor from Python data and never syncs with the device."""

from __future__ import annotations

import torch
from conftest import rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from model import Denoiser, Join, SlotBatch, initial_noise, sample

# (slot, label, seed, sampler, steps, cfg_scale, joins before step k)
MIX = [
    (0, 5, 11, "ddpm", 6, 4.0, 0),
    (3, 17, 12, "ddim", 4, 1.0, 1),
    (1, 400, 13, "dpm-solver++", 5, 2.5, 1),
    (7, 999, 2**40, "ddpm", 3, 1.5, 2),
    (2, 3, 15, "ddim", 7, 1.0, 0),
]


def test_staggered_mix_equals_each_sample_alone(tiny_dit):
    batch = SlotBatch(Denoiser(tiny_dit), capacity=2)  # grows as slots are used
    done = {}
    remaining = {}
    for k in range(10):
        joins = [Join(s, lab, seed, smp, n, cfg) for s, lab, seed, smp, n, cfg, at in MIX if at == k]
        batch.join(joins)
        remaining.update({j.slot: j.steps for j in joins})
        batch.step()
        remaining = {s: r - 1 for s, r in remaining.items()}
        finished = [s for s, r in remaining.items() if r == 0]
        for s, x in zip(finished, batch.read(finished), strict=True):
            done[s] = x
        batch.leave(finished)
        remaining = {s: r for s, r in remaining.items() if r}
    assert sorted(done) == sorted(m[0] for m in MIX) and batch.active == []
    for slot, label, seed, sampler, steps, cfg, _ in MIX:
        alone = sample(tiny_dit, initial_noise([seed], (4, 8, 8)), [label], cfg_scale=cfg, steps=steps,
                       sampler=sampler, seeds=[seed])[0]
        assert rel_err(done[slot], alone) <= 1e-4, (slot, sampler)


def test_half_batch_steps_equal_a_whole_step(tiny_dit):
    """The out-of-memory fallback runs a step as two subsets; the result is the same."""
    joins = [Join(s, lab, seed, smp, n, cfg) for s, lab, seed, smp, n, cfg, _ in MIX]
    whole, halves = SlotBatch(Denoiser(tiny_dit)), SlotBatch(Denoiser(tiny_dit))
    whole.join(joins)
    halves.join(joins)
    whole.step()
    halves.step([0, 3])
    halves.step([1, 7, 2])
    slots = [j.slot for j in joins]
    assert rel_err(halves.read(slots), whole.read(slots)) <= 1e-5


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.device_changes: list[str] = []  # copies between devices (host <-> device)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(str(func))
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        devices = {t.device for t in tensors} | ({torch.device(kwargs["device"])} if kwargs.get("device") else set())
        if len(devices) > 1:
            self.device_changes.append(str(func))
        return func(*args, **kwargs)


def test_a_steady_step_builds_no_tensor_from_python_and_never_syncs(tiny_dit):
    batch = SlotBatch(Denoiser(tiny_dit))
    # guidance intervals switch later in these samples' runs; steps 0 and 1 have the same guided set
    batch.join([Join(s, lab, seed, smp, 20, cfg, guidance_interval=(0.0, min(1.0, 0.5 + 0.1 * s)))
                for s, lab, seed, smp, _, cfg, _ in MIX])
    with _CountOps() as first:
        batch.step()  # membership changed: this step builds its index tensors from Python lists
    assert any("lift_fresh" in op for op in first.ops)  # the detector sees them
    with _CountOps() as mode:
        batch.step()
    ops = mode.ops
    # torch.tensor(list) / numpy -> lift_fresh; .item()/.tolist()/bool(tensor) -> _local_scalar_dense.
    assert not [op for op in ops if "lift_fresh" in op or "_local_scalar_dense" in op], ops
    assert not mode.device_changes  # no copy between host and device either
    assert any("copy_" in op for op in ops)  # the detector saw the write-back
    assert not [op for op in ops if "index_copy" in op or "index_put" in op], ops  # rows written as slices
