"""`GraphedForward`: a DiT forward replayed from CUDA graphs captured for a fixed set of row counts.

At small batches a DiT step on a GPU is bound by kernel launches, not arithmetic: XL has ~28 x 15
kernels per forward. A captured graph launches them all at once. A batch of n rows runs the graph of
the smallest captured size >= n, its rows past n filled with inert padding (the output rows past n are
discarded); batches larger than every captured size run eagerly. Capture happens in `capture()`, which
the server calls before it reports ready. Which sizes to capture is the server's setting
(--graph-batch-sizes); the Python API names them too.

The returned tensor is the graph's static output buffer: valid until the next call.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

log = logging.getLogger(__name__)


class GraphedForward:
    def __init__(self, forward, sample_shape: tuple[int, int, int], *, null_class: int, device, sizes):
        self.forward = forward
        self.sample_shape = sample_shape
        self.null_class = null_class
        self.device = torch.device(device)
        self.sizes = sorted(set(sizes))
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor]] = {}

    @torch.no_grad()
    def capture(self) -> float:
        """Capture one graph per size (largest first, sharing one memory pool); returns the seconds taken."""
        t0 = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        for n in reversed(self.sizes):
            x = torch.randn(n, *self.sample_shape, device=self.device)
            t = torch.zeros(n, dtype=torch.int64, device=self.device)
            y = torch.full((n,), self.null_class, dtype=torch.int64, device=self.device)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up outside the graph (autotuning, workspaces)
                for _ in range(2):
                    self.forward(x, t, y)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.forward(x, t, y)
            self._graphs[n] = (graph, x, t, y, out)
        torch.cuda.synchronize(self.device)
        seconds = time.monotonic() - t0
        log.info("captured CUDA graphs for batch sizes %s in %.1f s", self.sizes, seconds)
        return seconds

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        k = bisect.bisect_left(self.sizes, n)
        if k == len(self.sizes) or self.sizes[k] not in self._graphs:
            return self.forward(x, t, y)
        graph, sx, st, sy, out = self._graphs[self.sizes[k]]
        sx[:n].copy_(x)
        st[:n].copy_(t)
        sy[:n].copy_(y)
        if n < sx.shape[0]:  # padding rows: any valid input will do, their outputs are ignored
            st[n:].zero_()
            sy[n:].fill_(self.null_class)
        graph.replay()
        return out[:n]
