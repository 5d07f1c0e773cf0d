"""`SlotBatch`: in-flight samples of one DiT kept in slots of device tensors, advanced by one forward.

A slot holds one sample's whole state: x, the last predicted x0 (DPM-Solver++'s history), its
iteration index, class, guidance scale, seed and sampler plan. The samplers' coefficient tables live
on the device as well, one row per (plan, iteration). A step gathers the forward inputs of the active
slots with index tensors that change only when samples join or leave, runs ONE forward pass, and
writes every slot back with vectorised ops: in a steady step there is no per-sample Python, no
host-to-device copy and no device sync. Samples may join and leave between any two steps, each at
its own iteration, sampler and step count.

Guidance interval: a sample is guided only on the iterations its interval selects (one contiguous
run, model/samplers.py `guided_range`), so the set of guided samples, and with it the forward's row
count, changes at iterations known when the sample joins. The host mirrors each slot's iteration as
`clock - base` (one counter for the whole batch, advanced once per full step) and a view records the
clock value at which its first slot flips; the view is rebuilt on that step only.

    batch = SlotBatch(denoiser)
    batch.join([Join(slot=0, label=7, seed=1, sampler="ddim", steps=50, cfg_scale=4.0)])
    for _ in range(50):
        batch.step()
    x = batch.read([0]); batch.leave([0])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import noise as noise_lib
from .denoise import Denoiser
from .samplers import FULL_INTERVAL, NOISE_ON, NUM_COEFFS, Sampling, guided_range, plan


@dataclass(frozen=True)
class Join:
    """One sample entering the batch at iteration `index` of its sampler plan."""

    slot: int
    label: int
    seed: int  # keys the sample's noise: x_T (draw 0) and the noise after iteration i (draw i + 1)
    sampler: str
    steps: int
    cfg_scale: float = 1.0
    index: int = 0
    guidance_interval: tuple[float, float] = FULL_INTERVAL  # guided iff lo <= t / 999 <= hi

    def __post_init__(self):
        sampling = Sampling(self.sampler, self.steps, self.cfg_scale, self.guidance_interval)
        if not 0 <= self.index < self.steps:
            raise ValueError(f"index must be in 0..{self.steps - 1}, got {self.index}")
        object.__setattr__(self, "guidance_interval", sampling.guidance_interval)


@dataclass
class _Slot:
    """Host-side facts of one active slot, enough to know when it is guided without asking the device."""

    steps: int
    guided: range  # iterations at which it is guided (empty for cfg_scale 1)
    stochastic: bool
    base: int  # its iteration is the batch's clock - base

    def next_flip(self, iteration: int) -> int | None:
        """The iteration, after `iteration`, at which it starts or stops being guided (None: never)."""
        g = self.guided
        flip = g.start if iteration < g.start else g.stop if iteration < g.stop else None
        return flip if flip is not None and flip < self.steps else None


@dataclass(frozen=True)
class _View:
    """Index tensors of one set of active slots; rebuilt only when membership or a slot's guidance changes."""

    n: int  # B samples
    expires: int | float  # the batch clock at which some slot's guidance flips: rebuild the view then
    slots: torch.Tensor  # (B,) their slots
    guided: torch.Tensor  # (G,) positions in [0, B) of the guided samples
    scales: torch.Tensor  # (G, 1, 1, 1) their guidance scales
    y: torch.Tensor  # (B + G,) classes of the forward rows: the samples', then the null class
    row0: torch.Tensor  # (B,) each sample's first row in the coefficient tables
    ones: torch.Tensor  # (B,) int64, to advance the iteration counters
    noisy: torch.Tensor  # (K,) positions of the samples whose sampler adds noise (DDPM)
    noisy_seeds: torch.Tensor  # (K,) their seeds
    generators: tuple[tuple[int, torch.Generator], ...]  # (index into noisy, generator) of caller-driven noise


@dataclass(frozen=True)
class _Posterior:
    """One step's prediction for a view, before noise: what `step` writes back, and what tests check."""

    view: _View
    index: torch.Tensor  # (B,) iterations done
    coeffs: torch.Tensor  # (B, NUM_COEFFS) this iteration's coefficient rows
    var_values: torch.Tensor  # (B, C, H, W) the learned-variance output
    mean: torch.Tensor  # (B, C, H, W)
    x0: torch.Tensor  # (B, C, H, W) predicted clean sample


class SlotBatch:
    def __init__(self, denoiser: Denoiser, capacity: int = 8):
        self.denoiser = denoiser
        self.device = denoiser.device
        self.shape = denoiser.sample_shape  # (C, H, W)
        dev = self.device
        self._capacity = 0
        self.x = torch.empty(0, *self.shape, device=dev)  # (S, C, H, W) float32
        self.x0_prev = torch.empty(0, *self.shape, device=dev)  # (S, C, H, W) last predicted x0
        self.index = torch.empty(0, dtype=torch.int64, device=dev)  # (S,) iterations done
        self.label = torch.empty(0, dtype=torch.int64, device=dev)
        self.scale = torch.empty(0, dtype=torch.float32, device=dev)
        self.seed = torch.empty(0, dtype=torch.int64, device=dev)
        self.row0 = torch.empty(0, dtype=torch.int64, device=dev)
        self._grow(capacity)
        # Every plan used so far, as consecutive rows of two device tables (its iterations in order).
        self.timesteps = torch.empty(0, dtype=torch.int64, device=dev)  # (R,) the model's timestep
        self.coeffs = torch.empty(0, NUM_COEFFS, dtype=torch.float32, device=dev)  # (R, NUM_COEFFS)
        self._plan_row0: dict[tuple[str, int], int] = {}
        # Host-side membership: which slots are active, in join order, and what the view needs of them.
        self._active: list[int] = []
        self._host: dict[int, _Slot] = {}
        self._clock = 0  # full steps run; a slot's iteration is _clock - its base
        self._generators: dict[int, torch.Generator] = {}
        self._view: _View | None = None

    # ---- membership (between steps) ----------------------------------------------------------------
    @property
    def active(self) -> list[int]:
        return list(self._active)

    def join(self, joins: Sequence[Join], *, x: torch.Tensor | None = None,
             generators: Sequence[torch.Generator | None] | None = None) -> None:
        """Write new samples into their slots. x: (N, C, H, W) starting points; default x_T from the seeds."""
        if not joins:
            return
        taken = set(self._active).intersection(j.slot for j in joins)
        if taken:
            raise ValueError(f"slots {sorted(taken)} are already in use")
        self._grow(max(j.slot for j in joins) + 1)
        row0 = [self._plan_rows(j.sampler, j.steps) for j in joins]
        # One staging copy per kind for all joining samples (pinned on CUDA, so it can run async).
        rows = [[j.slot, j.label, j.seed, r, j.index] for j, r in zip(joins, row0, strict=True)]
        ints = self._to_device(torch.tensor(rows, dtype=torch.int64))  # (N, 5)
        scales = self._to_device(torch.tensor([j.cfg_scale for j in joins], dtype=torch.float32))  # (N,)
        slots = ints[:, 0]
        self.label[slots], self.seed[slots], self.row0[slots], self.index[slots] = ints[:, 1:].unbind(1)
        self.scale[slots] = scales
        if x is None:
            x = noise_lib.initial_noise(ints[:, 2], self.shape)
        self.x[slots] = x.to(self.device, torch.float32)
        self.x0_prev[slots] = 0.0
        for k, j in enumerate(joins):
            self._active.append(j.slot)
            guided = guided_range(j.sampler, j.steps, j.guidance_interval) if j.cfg_scale != 1.0 else range(0)
            self._host[j.slot] = _Slot(j.steps, guided, plan(j.sampler, j.steps).stochastic, self._clock - j.index)
            if generators is not None and generators[k] is not None:
                self._generators[j.slot] = generators[k]
        self._view = None

    def leave(self, slots: Sequence[int]) -> None:
        """Free these slots (finished, cancelled or failed samples)."""
        gone = set(slots)
        self._active = [s for s in self._active if s not in gone]
        for s in gone:
            self._host.pop(s, None)
            self._generators.pop(s, None)
        self._view = None

    def read(self, slots: Sequence[int]) -> torch.Tensor:
        """x of these slots: (N, C, H, W) float32 (the final samples once they are done)."""
        return self.x.index_select(0, self._index(slots))

    def predicted_x0(self, slots: Sequence[int]) -> torch.Tensor:
        """The x0 predicted at the last step of these slots: (N, C, H, W) (previews)."""
        return self.x0_prev.index_select(0, self._index(slots))

    def finite(self, slots: Sequence[int]) -> list[bool]:
        """Whether each slot's x is free of NaN/inf (one device sync: call it at retirement only)."""
        return self.read(slots).isfinite().flatten(1).all(1).tolist()

    # ---- one step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def posterior(self, slots: Sequence[int] | None = None) -> _Posterior:
        """One forward for the active slots (or `slots`), without advancing them."""
        v = self._current_view() if slots is None else self._make_view(list(slots))
        idx = self.index.index_select(0, v.slots)  # (B,)
        rows = v.row0 + idx
        t = self.timesteps.index_select(0, rows)  # (B,)
        x = self.x.index_select(0, v.slots)  # (B, C, H, W)
        x_in, t_in = x, t
        if v.guided.numel():
            x_in = torch.cat([x, x.index_select(0, v.guided)])  # (B + G, C, H, W)
            t_in = torch.cat([t, t.index_select(0, v.guided)])
        out = self.denoiser.forward(x_in, t_in, v.y)  # (B + G, 2C, H, W); the model casts x to its dtype
        eps, var_values = self.denoiser.guide(out, v.n, v.guided, v.scales)
        k = self.coeffs.index_select(0, rows)  # (B, NUM_COEFFS)
        mean, x0 = self.denoiser.update(k, x, eps, self.x0_prev.index_select(0, v.slots))
        return _Posterior(v, idx, k, var_values, mean, x0)

    @torch.no_grad()
    def step(self, slots: Sequence[int] | None = None) -> None:
        """Advance every active slot (or just `slots`, e.g. half a batch after an out-of-memory error)
        by one iteration with one forward pass. No slot may be past its last iteration."""
        if not self._active or (slots is not None and not slots):
            return
        p = self.posterior(slots)
        v, x_next = p.view, p.mean
        if v.noisy.numel():  # only the noisy samples need a variance and noise (hashing noise is costly)
            k = p.coeffs.index_select(0, v.noisy)
            log_var = self.denoiser.log_variance(k, p.var_values.index_select(0, v.noisy))  # (K, C, H, W)
            sigma = k[:, NOISE_ON, None, None, None] * torch.exp(0.5 * log_var)
            x_next = x_next.index_add(0, v.noisy, sigma * self._noise(v, p.index.index_select(0, v.noisy)))
        self.x.index_copy_(0, v.slots, x_next)
        self.x0_prev.index_copy_(0, v.slots, p.x0)
        self.index.index_add_(0, v.slots, v.ones)
        if slots is None:
            self._clock += 1
        else:  # a partial step (rare: the out-of-memory fallback) moves only these slots' iterations
            for s in slots:
                self._host[s].base -= 1
            self._view = None

    def _noise(self, v: _View, idx: torch.Tensor) -> torch.Tensor:
        """The noise after this iteration for the noisy samples, (K, C, H, W): counter-based from (seed,
        iteration + 1), or from a caller's torch.Generator where one was given (a slower per-sample path,
        library use only)."""
        z = noise_lib.gaussian(v.noisy_seeds, idx + 1, self.shape)
        for pos, gen in v.generators:
            z[pos] = torch.randn(self.shape, generator=gen, device=gen.device).to(self.device)
        return z

    # ---- internals ---------------------------------------------------------------------------------
    def _current_view(self) -> _View:
        if self._view is None or self._clock >= self._view.expires:
            self._view = self._make_view(self._active)
        return self._view

    def _make_view(self, slots: list[int]) -> _View:
        hosts = [self._host[s] for s in slots]
        iterations = [self._clock - h.base for h in hosts]
        guided = [p for p, (h, i) in enumerate(zip(hosts, iterations, strict=True)) if i in h.guided]
        noisy = [p for p, h in enumerate(hosts) if h.stochastic]
        flips = [h.base + f for h, i in zip(hosts, iterations, strict=True) if (f := h.next_flip(i)) is not None]
        a = self._index(slots)
        g = self._to_device(torch.tensor(guided, dtype=torch.int64))
        k = self._to_device(torch.tensor(noisy, dtype=torch.int64))
        null = torch.full((len(guided),), self.denoiser.null_class, dtype=torch.int64, device=self.device)
        return _View(
            n=len(slots), expires=min(flips, default=float("inf")), slots=a, guided=g,
            scales=self.scale.index_select(0, a.index_select(0, g)).view(-1, 1, 1, 1),
            y=torch.cat([self.label.index_select(0, a), null]), row0=self.row0.index_select(0, a),
            ones=torch.ones_like(a), noisy=k, noisy_seeds=self.seed.index_select(0, a.index_select(0, k)),
            generators=tuple((i, self._generators[slots[p]]) for i, p in enumerate(noisy)
                             if slots[p] in self._generators),
        )

    def _index(self, slots: Sequence[int]) -> torch.Tensor:
        return self._to_device(torch.tensor(list(slots), dtype=torch.int64))

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned, so the copy does not wait for the device
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _plan_rows(self, sampler: str, steps: int) -> int:
        """The first table row of this plan, appending the plan to the device tables on first use."""
        key = (sampler, steps)
        if key not in self._plan_row0:
            p = plan(sampler, steps)
            self._plan_row0[key] = self.timesteps.shape[0]
            self.timesteps = torch.cat([self.timesteps, torch.tensor(p.timesteps, device=self.device)])
            self.coeffs = torch.cat([self.coeffs, torch.from_numpy(p.coeffs).float().to(self.device)])
        return self._plan_row0[key]

    def _grow(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        cap = max(needed, 2 * self._capacity)

        def grown(t: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(cap, *t.shape[1:], dtype=t.dtype, device=t.device)
            out[: t.shape[0]] = t
            return out

        for name in ("x", "x0_prev", "index", "label", "scale", "seed", "row0"):
            setattr(self, name, grown(getattr(self, name)))
        self._capacity = cap
