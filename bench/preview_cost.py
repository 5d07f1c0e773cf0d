"""What live previews cost: engine steps/s with 32 samples in flight, every request asking for previews
vs none, in one run (the embedded model, or --model; the engine core and model runner in-process).

    python bench/preview_cost.py [--model PATH] [--steps 200] [--repeats 3]

Each pass submits 32 one-image requests (DPM-Solver++, guided) at once and runs the engine until they
finish; previews come every steps // 10 steps of a request, at most every 250 ms. Timed with CPU time
of this one-thread process, so other load on the machine does not skew the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from model.samplers import Sampling
from server.engine.core import EngineCore
from server.engine.metrics import EngineMetrics
from server.engine.request import EngineRequest
from server.engine.runner import ModelRunner
from server.settings import EMBEDDED_MODEL, Settings

SAMPLES = 32


def one_pass(runner: ModelRunner, settings: Settings, steps: int, previews: bool) -> tuple[float, int]:
    core = EngineCore(runner, settings.policy, settings.max_batch_rows, EngineMetrics())
    for k in range(SAMPLES):
        now = time.time()
        core.add(EngineRequest(str(k), k % runner.num_classes, (k,), Sampling("dpm-solver++", steps, 2.0), now,
                               now + 3600, previews=previews))
    t0, n, shown = time.process_time(), 0, 0
    while core.has_work:
        outputs = core.step()
        n += outputs.cycle is not None
        shown += sum(o.preview is not None for o in outputs.outputs)
    return n / (time.process_time() - t0), shown


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(EMBEDDED_MODEL))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    settings = Settings(model=args.model, threads=1, max_batch_rows=2 * SAMPLES, max_steps=1000)
    runner = ModelRunner(settings)
    runner.warmup()
    rates: dict[bool, list[float]] = {False: [], True: []}
    sent = 0
    for _ in range(args.repeats):  # interleaved, so that drift on the machine hits both alike
        for previews in (False, True):
            rate, shown = one_pass(runner, settings, args.steps, previews)
            rates[previews].append(rate)
            sent += shown
    best = {k: max(v) for k, v in rates.items()}
    print(f"{SAMPLES} samples in flight, {args.steps} steps, {args.repeats} passes each (best of): "
          f"{best[False]:.1f} steps/s without previews, {best[True]:.1f} with ({sent} previews sent): "
          f"{1 - best[True] / best[False]:+.1%} slower")


if __name__ == "__main__":
    main()
