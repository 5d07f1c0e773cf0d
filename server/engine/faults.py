"""Test-only fault injection into the model runner (enabled by --fault-injection, never by default).

A test arms a fault over HTTP (POST /_faults {"kind", "count"}); the runner fires it on its next
steps. The server's real failure handling then runs: nothing here mocks the server.
"""

from __future__ import annotations

import threading

import torch

from .failures import DeviceLost

KINDS = ("step_error", "oom", "nan", "device_lost")


class FaultInjector:
    def __init__(self) -> None:
        self._armed: dict[str, int] = {}
        self._lock = threading.Lock()

    def arm(self, kind: str, count: int = 1) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {', '.join(KINDS)}")
        with self._lock:
            self._armed[kind] = self._armed.get(kind, 0) + count

    def take(self, kind: str) -> bool:
        with self._lock:
            if self._armed.get(kind, 0) > 0:
                self._armed[kind] -= 1
                return True
            return False

    def before_step(self) -> None:
        if self.take("step_error"):
            raise RuntimeError("injected fault: a denoising step failed")
        if self.take("oom"):
            raise torch.OutOfMemoryError("injected fault: CUDA out of memory")
        if self.take("device_lost"):
            raise DeviceLost("injected fault: CUDA error: an illegal memory access was encountered")

    def after_step(self, batch) -> None:
        """`nan`: every sample in the batch turns to NaN (as a diverging model would)."""
        if self.take("nan") and batch.active:
            batch.x[batch.rows(batch.active)] = float("nan")
