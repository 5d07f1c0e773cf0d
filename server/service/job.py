"""The front-end's job: the engine request it wraps (the request's id is the job's id, end to end), how
to answer it (image format, one grid or separate images), and what the engine has said of it so far.
The service updates it from the engine's outputs on the transport's thread; the HTTP side awaits it on
the event loop (`done`, `listen`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..engine.request import EngineRequest, FinishReason, RequestError, RequestStatus
from .listeners import Listeners

ImageFormat = Literal["png", "jpeg", "webp"]


@dataclass(eq=False)
class Job:
    request: EngineRequest
    model: str  # the model's name and the request's class name, for the images' parameters
    class_name: str
    format: ImageFormat = "png"
    separate: bool = False  # one encoded image per sample (JSON answers) instead of one grid
    tag: str | None = None
    webhook_url: str | None = None  # POSTed the job's status when it ends (server/http/webhooks.py)
    created: float = field(default_factory=time.time)  # unix seconds, for clients
    replica: str | None = None  # the engine replica that generated it (the X-Replica header)
    preview: tuple[int, np.ndarray] | None = None  # (step, (N, h, w, 3) uint8): the latest x0 preview
    images: list[bytes] | None = None  # once done: encoded in `format` (a job read back from the store: None)
    error: RequestError | None = None  # once failed, cancelled or timed out
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (queue, denoise, ...)
    done: Future = field(default_factory=Future)  # resolves (to None) when the job has its images or its error
    cancel_reason: FinishReason | None = None  # asked for by this side; the engine confirms with an error
    on_cancel: Callable[[FinishReason], None] | None = field(default=None, repr=False)
    _listeners: Listeners = field(default_factory=Listeners, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def parameters(self) -> dict:
        """The generation parameters its images carry (PNG `parameters` chunk, JSON answer, webhook). The step
        cache only where one ran, so that an image made without one has the same bytes as before caches."""
        s = self.request.sampling
        out = {"model": self.model, "class_id": self.request.class_id, "class_name": self.class_name,
               "cfg_scale": s.cfg_scale, "steps": s.steps, "sampler": s.sampler,
               "guidance_interval": list(s.guidance_interval)}
        if s.cache.on:
            out["cache"] = s.cache.describe()
        return out if self.tag is None else dict(out, tag=self.tag)

    @property
    def status(self) -> str:
        """queued, running, encoding, done, failed, cancelled or timed_out."""
        if self.ended and self.error is None:
            return "done"
        if self.error is not None:
            reason = self.error.reason
            return reason.value if reason in (FinishReason.CANCELLED, FinishReason.TIMED_OUT) else "failed"
        if self.cancel_reason is not None:
            return self.cancel_reason.value
        r = self.request
        if r.status == RequestStatus.QUEUED:
            return "queued"
        return "running" if r.status == RequestStatus.RUNNING and r.step < r.steps else "encoding"

    @property
    def ended(self) -> bool:
        return self.done.done()

    def cancel(self, reason: FinishReason = FinishReason.CANCELLED) -> None:
        """Ask the engine to drop the request at its next step (client gone, DELETE, or `TIMED_OUT`)."""
        with self._lock:
            if self.cancel_reason is not None or self.ended:
                return
            self.cancel_reason = reason
        if self.on_cancel is not None:
            self.on_cancel(reason)
        self.changed()

    def finish(self, images: list[bytes]) -> None:
        with self._lock:
            if self.ended:
                return
            self.images = images
            self.done.set_result(None)  # under the lock: two ends at once cannot both set it
        self.changed()

    def fail(self, error: RequestError) -> None:
        with self._lock:
            if self.ended:
                return
            self.error = error
            self.done.set_result(None)
        self.changed()

    # ---- push: whoever streams the job listens, and is woken by every change ----------------------------
    def listen(self) -> asyncio.Event:
        return self._listeners.listen()

    def unlisten(self, event: asyncio.Event) -> None:
        self._listeners.unlisten(event)

    def changed(self) -> None:
        self._listeners.changed()
