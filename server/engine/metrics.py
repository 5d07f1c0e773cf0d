"""The engine's Prometheus metrics: queue, batch, step and decode; registered where the engine runs (the
engine process, a Ray replica, or the front-end's registry with `--engine thread`)."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily

disable_created_metrics()  # no *_created series: they double the output and no dashboard reads them

# Whole requests take from tens of milliseconds (small model, few steps) to minutes (250 steps, 512 px).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
# One step, one decode, one encode: sub-millisecond to a few seconds.
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _CudaMemoryCollector:
    """GPU memory read at scrape time (no work on the step loop)."""

    def __init__(self, device: torch.device):
        self.device = device

    def collect(self):
        allocated = GaugeMetricFamily("dit_gpu_memory_allocated_bytes", "GPU memory held by tensors")
        reserved = GaugeMetricFamily("dit_gpu_memory_reserved_bytes", "GPU memory reserved by torch's allocator")
        peak = GaugeMetricFamily("dit_gpu_memory_peak_allocated_bytes", "peak GPU memory held by tensors")
        allocated.add_metric([], torch.cuda.memory_allocated(self.device))
        reserved.add_metric([], torch.cuda.memory_reserved(self.device))
        peak.add_metric([], torch.cuda.max_memory_allocated(self.device))
        return [allocated, reserved, peak]


class EngineMetrics:
    """The engine's metrics: queue, batch, step and decode; registered where the engine runs."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.queue_wait = Histogram("dit_queue_wait_seconds", "arrival to admission into the batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("dit_queue_depth", "requests waiting for admission", registry=r)
        self.active_samples = Gauge("dit_active_samples", "samples in flight (being denoised)", registry=r)
        self.batch_size = Histogram("dit_batch_size", "samples advanced per forward pass", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.forward_rows = Histogram("dit_forward_rows", "rows per forward pass as run (guided samples count "
                                      "twice, samples whose step cache skips the step not at all)",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.forward_rows_total = Counter("dit_forward_rows_computed", "forward rows computed (as run, not as planned: "
                                          "a step cache's skipped rows are not counted)", registry=r)
        self.step_duration = Histogram("dit_step_duration_seconds", "one denoising step of the whole batch",
                                       buckets=STAGE_BUCKETS, registry=r)
        self.decode_duration = Histogram("dit_decode_duration_seconds", "one batched decode to pixels",
                                         buckets=STAGE_BUCKETS, registry=r)
        self.denoise_steps = Counter("dit_denoise_steps", "sample-steps computed (one sample, one step)",
                                     registry=r)
        self.model_info = Gauge("dit_model_info", "the loaded model (value 1)",
                                ["model", "space", "image_size", "device", "dtype", "policy"], registry=r)

    def describe_model(self, runner, policy: str) -> None:
        info = runner.info
        self.model_info.labels(model=info.name, space=info.space, image_size=str(info.image_size),
                               device=str(runner.device), dtype=str(runner.dtype).removeprefix("torch."),
                               policy=policy).set(1)
        if runner.device.type == "cuda":
            self.registry.register(_CudaMemoryCollector(runner.device))
