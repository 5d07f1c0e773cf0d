"""Host time per denoising step outside the forward pass, before vs after the in-flight batch (SlotBatch).

The embedded model's forward is replaced by a stub that returns a preallocated output, so what is
timed is only the step's own work: building the batch, guidance, the update rule, noise, write-back.
"Before" is an earlier commit, checked out into a temporary git worktree: by default 4bee158, the last
with the per-sample step API; a later commit's SlotBatch with --before REV. "After" is this tree. One
thread, mixed samplers and guidance scales, no sample finishes during the measurement. Also counts, per
steady step, tensors built from Python data (aten.lift_fresh) and host syncs (aten._local_scalar_dense).

    python bench/step_overhead.py                 # before = 4bee158 (the last commit before the change)
    python bench/step_overhead.py --before REV
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = (8, 32, 64)
MIX = [("ddpm", 4.0), ("ddim", 1.0), ("dpm-solver++", 2.0), ("ddim", 4.0)]  # (sampler, cfg) in turn
BLOCKS = 7  # timed blocks of --repeats steps per size; the fastest counts
STEPS = 500  # long enough that no sample finishes while timed (warm-up + BLOCKS x --repeats)


def child(impl: str, repeats: int) -> dict:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import model

    torch.set_num_threads(1)
    # The tree being measured (the child's cwd) brings its own weights: their metadata follows its code.
    pipe = model.Pipeline.from_pretrained(Path.cwd() / "weights" / "fashion_dit.safetensors")
    c, h, w = pipe.sample_shape
    # The stub hands back one buffer, which guidance overwrites in place (as it does a CUDA graph's static
    # output): all zeros, so it stays zeros.
    stub_out = torch.zeros(2 * max(SIZES), 2 * c, h, w)
    pipe.denoiser.forward = lambda x, t, y: stub_out[: x.shape[0]]

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.created = self.syncs = self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            self.ops += 1
            self.created += "lift_fresh" in name
            self.syncs += "_local_scalar_dense" in name
            return func(*args, **(kwargs or {}))

    from model.samplers import Sampling

    def join(slot, label, seed, sampler, cfg):
        if "sampling" in {f.name for f in dataclasses.fields(model.Join)}:  # a Join carries its Sampling
            return model.Join(slot, label, seed, Sampling(sampler, STEPS, cfg))
        return model.Join(slot, label, seed, sampler, STEPS, cfg)  # older trees: the settings one by one

    results = {}
    for n in SIZES:
        specs = [(k % 10, k, *MIX[k % len(MIX)]) for k in range(n)]
        if impl == "before" and not hasattr(pipe, "new_batch"):  # the per-sample step API (4bee158 and older)
            states = [pipe.new_state(lab, seed, sampler=smp, steps=STEPS, cfg_scale=cfg)
                      for lab, seed, smp, cfg in specs]
            step = functools.partial(pipe.denoiser.step, states)
        else:
            batch = pipe.new_batch(n)
            batch.join([join(k, lab, seed, smp, cfg) for k, (lab, seed, smp, cfg) in enumerate(specs)])
            step = batch.step
        for _ in range(5):  # warm-up (the first step after joining arranges the rows)
            step()
        # The best of several blocks, each timed in CPU time of this one-thread process: the step's own
        # cost, without the interruptions of a shared machine (which only ever add time).
        blocks = []
        for _ in range(BLOCKS):
            t0 = time.process_time()
            for _ in range(repeats):
                step()
            blocks.append((time.process_time() - t0) / repeats)
        seconds = min(blocks)
        with Count() as counted:
            step()
        results[n] = {"ms": seconds * 1000, "created": counted.created, "syncs": counted.syncs, "ops": counted.ops}
    return results


def run_child(impl: str, tree: Path, repeats: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, "--child", impl, "--repeats", str(repeats)], cwd=tree, env=env,
                         check=True, capture_output=True, text=True)
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default="4bee158", help="git revision with the per-sample step API")
    p.add_argument("--repeats", type=int, default=60, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=3, help="alternated before/after runs")
    p.add_argument("--child", choices=["before", "after"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if 6 + BLOCKS * args.repeats >= STEPS:
        p.error(f"--repeats must be below {(STEPS - 6) // BLOCKS}: the samples would finish while timed")
    if args.child:
        print(json.dumps(child(args.child, args.repeats)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old), args.before], cwd=ROOT, check=True)
        try:
            (old / "weights").is_dir() or sys.exit(f"{args.before} has no weights/ folder")
            # Alternated, so that a slow spell of the machine hits both sides; each keeps its best round.
            runs = {"before": [], "after": []}
            for _ in range(args.rounds):
                runs["before"].append(run_child("before", old, args.repeats))
                runs["after"].append(run_child("after", ROOT, args.repeats))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=True)
    before, after = ({n: min((r[n] for r in rs), key=lambda v: v["ms"]) for n in SIZES} for rs in runs.values())
    print(f"host CPU time per step outside the forward (stub forward, 1 thread; best of {args.rounds} alternated "
          f"rounds x {BLOCKS} blocks of {args.repeats} steps; before = {args.before})")
    print("| samples | before ms | after ms | ratio | aten ops per step (before → after) "
          "| tensors from Python data per step | host syncs per step |")
    print("|---|---|---|---|---|---|---|")
    for n in SIZES:
        b, a = before[n], after[n]
        print(f"| {n} | {b['ms']:.3f} | {a['ms']:.3f} | {b['ms'] / a['ms']:.1f}x | {b['ops']} → {a['ops']} "
              f"| {b['created']} → {a['created']} | {b['syncs']} → {a['syncs']} |")


if __name__ == "__main__":
    main()
