"""The model runner: the only server code that touches tensors. Owned by the scheduler's thread."""

from __future__ import annotations

import logging
import time

import torch

from model import Pipeline, SampleState

from .contracts import GenerationSpec
from .faults import FaultInjector
from .settings import Settings

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        log.info("loaded %s (%s, %d px) on %s in %s in %.1f s", settings.model, self.info.space,
                 self.info.image_size, self.device, self.dtype, time.monotonic() - t0)

    def new_state(self, spec: GenerationSpec, seed: int) -> SampleState:
        return self.pipeline.new_state(spec.class_id, seed, sampler=spec.sampler, steps=spec.steps,
                                       cfg_scale=spec.cfg_scale)

    def step(self, states: list[SampleState]) -> None:
        if self.faults is not None:
            self.faults.before_step()
        self.pipeline.denoiser.step(states)
        if self.faults is not None:
            self.faults.after_step(states)

    @staticmethod
    def finite(states: list[SampleState]) -> list[bool]:
        """Whether each sample is free of NaN/inf (one device sync, at retirement only)."""
        return torch.stack([s.x for s in states]).isfinite().flatten(1).all(1).tolist()

    def decode(self, states: list[SampleState]) -> torch.Tensor:
        """Finished samples -> uint8 RGB (N, H, W, 3) on the CPU, in one batched decode."""
        return self.pipeline.decode(torch.stack([s.x for s in states]))

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

    def warmup(self) -> float:
        """One short guided generation through every sampler, so that first requests pay no set-up."""
        t0 = time.monotonic()
        states = [
            self.pipeline.new_state(0, seed, sampler=sampler, steps=2, cfg_scale=2.0)
            for seed, sampler in enumerate(("ddpm", "ddim", "dpm-solver++"))
        ]
        while not states[0].done:
            self.step(states)
        self.decode(states)
        self.synchronize()
        return time.monotonic() - t0
