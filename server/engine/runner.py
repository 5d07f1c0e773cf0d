"""The model runner: executes the scheduler's step plans on the device. Owned by the engine thread.

It loads the pipeline, keeps the in-flight samples in a SlotBatch (model/batch.py) and, per
`StepPlan`: frees the leaving slots, writes the joining ones, runs one step, then checks and decodes
the finishing slots. It is the only engine code that holds tensors; what it returns is numpy pixels.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from model import SAMPLERS, Join, Pipeline
from model.samplers import Sampling

from ..settings import Settings
from .contract import DecodeFailed, StepPlan, StepResult
from .faults import FaultInjector

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEASURED_STEPS = 8  # at one row at start-up (the step-cost fit estimates from 8 steps on: step_cost.MIN_STEPS)
MEASURE_SECONDS = 2.0  # what timing steps at start-up may take, about


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but torch sees no CUDA device; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class ModelRunner:
    def __init__(self, settings: Settings):
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        t0 = time.monotonic()
        self.pipeline = Pipeline.from_pretrained(
            settings.model, vae=settings.vae, arch=settings.arch, num_heads=settings.num_heads,
            dtype=self.dtype, device=self.device,
        )
        self.info = self.pipeline.info
        self.faults = FaultInjector() if settings.fault_injection else None
        cuda = self.device.type == "cuda"
        self.fused_kernels = settings.fused_kernels == "on" or (settings.fused_kernels == "auto" and cuda)
        self.cuda_graphs = settings.cuda_graphs == "on" or (settings.cuda_graphs == "auto" and cuda)
        self.graph_sizes = [n for n in settings.graph_batch_sizes if n <= settings.max_batch_rows] or [1]
        self.num_classes = self.pipeline.dit.config.num_classes
        self.batch = self.pipeline.new_batch(capacity=settings.max_batch_rows)
        log.info("loaded %s (%s, %d px) on %s in %s in %.1f s", settings.model, self.info.space,
                 self.info.image_size, self.device, self.dtype, time.monotonic() - t0)

    @classmethod
    def start(cls, settings: Settings, on_status) -> ModelRunner:
        """Load, prepare the fast path and warm up, saying which with on_status(text): what both engine
        modes do before the scheduler starts."""
        on_status("loading model")
        runner = cls(settings)
        on_status("preparing the fast path")
        runner.prepare_fast_path()
        runner.step_costs = []
        if settings.warmup:
            on_status("warming up")
            log.info("warm-up took %.2f s", runner.warmup())
            runner.step_costs = runner.measure_steps()
        return runner

    def execute(self, plan: StepPlan) -> StepResult:
        """Leaves, joins, one step, then the finishing slots are checked, decoded and freed."""
        batch = self.batch
        if plan.leaves:
            batch.leave(plan.leaves)
        if plan.joins:
            batch.join(plan.joins)
        rows = 0
        if not plan.steps_nothing:
            if self.faults is not None:
                self.faults.before_step()
            batch.step(plan.subset)
            rows = batch.rows_computed  # a host count: samples whose cache skips this step ran no row
            if self.faults is not None:
                self.faults.after_step(batch)
        previews = self._previews(plan.previews) if plan.previews else {}
        if not plan.finish:
            return StepResult(previews=previews, rows=rows)
        try:
            finite = batch.finite(plan.finish)  # the only device sync of a step, and only when samples finish
            good = [s for s, ok in zip(plan.finish, finite, strict=True) if ok]
            t0 = time.monotonic()
            pixels = self.pipeline.decode(batch.read(good)).numpy() if good else None  # (N, H, W, 3) uint8
            seconds = time.monotonic() - t0
        except Exception as e:
            raise DecodeFailed(f"decoding failed: {type(e).__name__}: {e}") from e
        finally:
            batch.leave(plan.finish)
        return StepResult(finished=plan.finish, finite=tuple(finite), pixels=pixels, previews=previews,
                          decode_seconds=seconds, rows=rows)

    def _previews(self, slots: tuple[int, ...]) -> dict[int, np.ndarray]:
        """Small uint8 RGB images of these slots' predicted x0 (N, h, w, 3), by slot."""
        images = self.pipeline.preview(self.batch.predicted_x0(slots)).numpy()
        return dict(zip(slots, images, strict=True))

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def prepare_fast_path(self) -> None:
        """Fused kernels and CUDA graphs as configured (capturing the graphs takes a while)."""
        if self.fused_kernels or self.cuda_graphs:
            seconds = self.pipeline.use_fast_path(fused_kernels=self.fused_kernels, cuda_graphs=self.cuda_graphs,
                                                  graph_sizes=self.graph_sizes)
            log.info("fast path: fused kernels %s, CUDA graphs %s for rows %s (capture %.1f s)",
                     self.fused_kernels, self.cuda_graphs, self.graph_sizes if self.cuda_graphs else "-", seconds)

    def measure_steps(self) -> list[tuple[int, float]]:
        """(forward rows, wall seconds) of steps timed at start-up: MEASURED_STEPS at one row, then two at
        each doubled width up to the row budget while they take under MEASURE_SECONDS in all (a large model
        on a CPU stops early; the fit extrapolates). Admission's step-cost fit then has figures from the first
        request on, so that a burst at a fresh server is refused at once instead of admitted and timed out;
        the steps that follow replace them."""
        costs = self._time_steps(1, MEASURED_STEPS)
        width = 2
        while width <= self.settings.max_batch_rows and sum(t for _, t in costs) < MEASURE_SECONDS:
            costs += self._time_steps(width, 2)
            width *= 2
        return costs

    def _time_steps(self, width: int, steps: int) -> list[tuple[int, float]]:
        slots = list(range(width))
        sampling = Sampling("ddim", steps + 1, 1.0)  # unguided: one row a sample; none finishes
        self.batch.join([Join(slot, 0, slot, sampling) for slot in slots])
        costs = []
        for _ in range(steps):
            t0 = time.monotonic()
            self.batch.step()
            self.synchronize()
            costs.append((width, time.monotonic() - t0))
        self.batch.leave(slots)
        return costs

    def warmup(self) -> float:
        """One short guided generation through every sampler, along the server's own path (plans)."""
        t0 = time.monotonic()
        joins = tuple(Join(slot, 0, slot, Sampling(sampler, 2, 2.0)) for slot, sampler in enumerate(SAMPLERS))
        slots = tuple(j.slot for j in joins)
        first = self.execute(StepPlan(joins=joins, previews=slots))  # latent models fit their preview map here
        result = self.execute(StepPlan(finish=slots))
        assert len(first.previews) == len(joins), "warm-up produced no previews"
        assert result.pixels is not None and len(result.pixels) == len(joins), "warm-up produced no images"
        self.synchronize()
        return time.monotonic() - t0

