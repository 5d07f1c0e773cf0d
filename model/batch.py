"""`SlotBatch`: in-flight samples of one DiT kept in rows of device tensors, advanced by one forward.

A caller names each sample by a slot number of its choosing; the batch keeps the slot's whole state
in one row: x, the last predicted x0 (DPM-Solver++'s history), its iteration index, class, guidance
scale, seed and sampler plan. The samplers' coefficient tables live on the device as well, one row
per (plan, iteration). When membership or someone's guidance changes, the rows are rearranged (one
permutation copy) so that the samples of the step are rows [0, B) with the guided ones first, rows
[0, G). A steady step then takes its inputs as slices (the forward's null-class twins are rows
[0, G) again), runs ONE forward pass and writes the rows back with vectorised ops: no per-sample
Python, no index tensor built, no host-to-device copy, no device sync. Samples may join and leave
between any two steps, each at its own iteration, sampler and step count.

Guidance interval: a sample is guided only on the iterations its interval selects (one contiguous
run, model/samplers.py `guided_range`), so the set of guided samples, and with it the forward's row
count, changes at iterations known when the sample joins. The host mirrors each slot's iteration as
`clock - base` (one counter for the whole batch, advanced once per full step) and an arrangement
records the clock value at which its first slot flips; the rows are rearranged on that step only.

Step caching (model/cache.py): a sample with a cache runs the network only at the iterations its
schedule selects; at the others its output (guided eps and variance values) is taken from the cache,
which lives in three more device rows per slot (the last computed output and its first and second
differences) and is advanced with vectorised ops like the rest. A feature-level cache ("taylor-features")
keeps the same three for the hidden state entering the final layer, (T, D) per slot, and three more for the
null-class twin's; at every step the batch's rows take the final layer on their features (forecast, or
computed where the network ran) instead of the network's last part. Which rows run is looked up on the
device (a schedule table, like the coefficients) and gathered with an argsort, so a steady cached step
still builds nothing from Python data and never syncs; the host knows how many rows run at each step
from the same fixed schedules (counted once per arrangement), which is all it needs for the forward's
shape. A batch with no cached sample takes the plain path, with today's bytes.

    batch = SlotBatch(denoiser)
    batch.join([Join(slot=0, label=7, seed=1, sampling=Sampling("ddim", 50, 4.0))])
    for _ in range(50):
        batch.step()
    x = batch.read([0]); batch.leave([0])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import cache as cache_lib
from . import noise as noise_lib
from .denoise import Denoiser
from .samplers import NUM_COEFFS, Sampling, plan


@dataclass(frozen=True)
class Join:
    """One sample entering the batch at iteration `index` of its sampler plan. Its settings come as a
    `Sampling`, which checked them when it was made (a server makes it once, at its door)."""

    slot: int
    label: int
    seed: int  # keys the sample's noise: x_T (draw 0) and the noise after iteration i (draw i + 1)
    sampling: Sampling  # sampler, steps, cfg_scale, guidance interval (guided iff lo <= t / 999 <= hi)
    index: int = 0

    def __post_init__(self):
        if not 0 <= self.index < self.sampling.steps:
            raise ValueError(f"index must be in 0..{self.sampling.steps - 1}, got {self.index}")
        if self.index and self.sampling.cache.on:  # its cache would have no history to forecast from
            raise ValueError("a sample with a step cache joins at iteration 0")

    @property
    def sampler(self) -> str:
        return self.sampling.sampler

    @property
    def steps(self) -> int:
        return self.sampling.steps

    @property
    def cfg_scale(self) -> float:
        return self.sampling.cfg_scale

    @property
    def guidance_interval(self) -> tuple[float, float]:
        return self.sampling.guidance_interval


@dataclass
class _Slot:
    """Host-side facts of one active slot, enough to know when it is guided without asking the device."""

    steps: int
    guided: range  # iterations at which it is guided (empty for cfg_scale 1)
    stochastic: bool
    base: int  # its iteration is the batch's clock - base
    cached: bool  # it has a step cache (some iterations take no forward row)
    computed: np.ndarray  # (steps,) bool: the iterations at which the network runs for it
    features: bool = False  # its cache forecasts the final layer's input features

    def next_flip(self, iteration: int) -> int | None:
        """The iteration, after `iteration`, at which it starts or stops being guided (None: never)."""
        g = self.guided
        flip = g.start if iteration < g.start else g.stop if iteration < g.stop else None
        return flip if flip is not None and flip < self.steps else None


@dataclass(frozen=True)
class Posterior:
    """One step's prediction before noise, per slot in `slots` order (what the parity tests check)."""

    slots: tuple[int, ...]
    mean: torch.Tensor  # (N, C, H, W)
    x0: torch.Tensor  # (N, C, H, W) predicted clean sample
    log_var: torch.Tensor  # (N, C, H, W) the learned log-variance of the noise (DDPM)


# Columns of the per-row integer table `SlotBatch.meta`: iterations done, class, first coefficient row, noise
# key (from the seed); for the step cache: first schedule row, the last computed iteration, computed
# iterations since the history started, the forecast's order (0 = reuse the last output); for a feature-level
# cache: computed iterations in the null-class twin's history, and 1 where the cache forecasts features.
ITER, LABEL, ROW0, KEY, SCHED, LAST, COUNT, ORDER, UCOUNT, LEVEL = range(10)
META_COLUMNS = 10


@dataclass(frozen=True)
class _Arrangement:
    """The rows of the coming step(s): rows [0, n) are stepped, the first `guided` of them guided."""

    n: int  # B samples stepped
    guided: int  # G
    expires: int | float  # the batch clock at which some row's guidance flips: rearrange then
    partial: bool  # a subset step (rearrange again after it)
    # Views of rows [0, B) of the state (valid until the next arrangement: only joining reallocates).
    x: torch.Tensor  # (B, C, H, W)
    x_guided: torch.Tensor  # (G, C, H, W) rows [0, G) of x: the inputs of the null-class twins
    x0_prev: torch.Tensor  # (B, C, H, W)
    iteration: torch.Tensor  # (B,) the ITER column
    row0: torch.Tensor  # (B,) the ROW0 column
    y: torch.Tensor  # (B + G,) classes of the forward rows: the samples', then the null class
    scales: torch.Tensor  # (G, 1, 1, 1) guidance scales, a view of rows [0, G)
    noisy: torch.Tensor  # (K,) rows of the samples whose sampler adds noise (DDPM)
    keys: torch.Tensor  # (K,) their noise stream keys
    generators: tuple[tuple[int, torch.Generator], ...]  # (index into noisy, generator) of caller-driven noise
    # Step caching (None/empty when no stepped sample has a cache: the plain path).
    clock0: int = 0  # the batch clock of counts[0]
    counts: tuple[tuple[int, int], ...] = ()  # per step from clock0: (rows that run F, guided ones among them Gc)
    unguided: torch.Tensor | None = None  # (B,) int64: 1 for rows [G, B)
    labels: torch.Tensor | None = None  # (B,) the LABEL column
    features: bool = False  # some stepped sample forecasts features: the computed rows run features + head

    @property
    def caching(self) -> bool:
        return bool(self.counts)


def _forecast(f: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """f + c1 d1 + c2 d2: the Taylor forecast from a cache history (the last computed value and its first and
    second differences per iteration), c1 = k and c2 = k^2 / 2 per row (zero where the order stops)."""
    return torch.addcmul(f, c1, d1).addcmul_(c2, d2)


def _moved_on(f: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, value: torch.Tensor, on: torch.Tensor,
              valid1: torch.Tensor, valid2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The history (f, d1, d2) after `value` was computed at the rows `on` selects (the others keep theirs);
    valid1 / valid2: 1 / gap where the history has one / two earlier points, else 0 (broadcastable)."""
    new_d1 = (value - f).mul_(valid1)
    new_d2 = (new_d1 - d1).mul_(valid2)
    return torch.where(on, value, f), torch.where(on, new_d1, d1), torch.where(on, new_d2, d2)


class SlotBatch:
    def __init__(self, denoiser: Denoiser, capacity: int = 8):
        self.denoiser = denoiser
        self.device = denoiser.device
        self.shape = denoiser.sample_shape  # (C, H, W)
        dev = self.device
        self._capacity = 0
        self.x = torch.empty(0, *self.shape, device=dev)  # (S, C, H, W) float32
        self.x0_prev = torch.empty(0, *self.shape, device=dev)  # (S, C, H, W) last predicted x0
        self.meta = torch.empty(0, META_COLUMNS, dtype=torch.int64, device=dev)  # (S, 10) columns ITER..LEVEL
        self.scale = torch.empty(0, dtype=torch.float32, device=dev)  # (S,) guidance scale
        # The step cache, allocated when the first cached sample joins: per slot the last computed output
        # (guided eps, then variance values) and its first and second differences per iteration.
        self.cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # 3 x (S, C_out, H, W)
        # The feature-level cache, allocated when the first such sample joins: per slot the last computed
        # features and their two differences, then the same for the null-class twin.
        self.feature_cache: tuple[torch.Tensor, ...] | None = None  # 6 x (S, T, D) float32
        self._grow(capacity)
        # Which iterations run, per (cache, steps, guided run), as consecutive rows (columns: runs, resets).
        self.schedules = torch.empty(0, 2, dtype=torch.int64, device=dev)  # (R', 2)
        self._schedule_row0: dict[tuple, int] = {}
        self.rows_computed = 0  # forward rows the last step ran (a cached sample's skipped iteration: 0)
        # Every plan used so far, as consecutive rows of two device tables (its iterations in order).
        self.timesteps = torch.empty(0, dtype=torch.int64, device=dev)  # (R,) the model's timestep
        # (NUM_COEFFS, R, 1, 1, 1): column-first, so a step's gathered rows split into per-sample scales
        # (B, 1, 1, 1) by plain indexing (Denoiser.update)
        self.coeffs = torch.empty(NUM_COEFFS, 0, 1, 1, 1, dtype=torch.float32, device=dev)
        self._plan_row0: dict[tuple[str, int], int] = {}
        # Host-side membership: the active slots in join order, the row holding each, what arranging needs.
        self._active: list[int] = []
        self._row: dict[int, int] = {}
        self._host: dict[int, _Slot] = {}
        self._clock = 0  # full steps run; a slot's iteration is _clock - its base
        self._generators: dict[int, torch.Generator] = {}
        self._arranged: _Arrangement | None = None

    # ---- membership (between steps) ----------------------------------------------------------------
    @property
    def active(self) -> list[int]:
        return list(self._active)

    def join(self, joins: Sequence[Join], *, x: torch.Tensor | None = None,
             generators: Sequence[torch.Generator | None] | None = None) -> None:
        """Write new samples into free rows. x: (N, C, H, W) starting points; default x_T from the seeds."""
        if not joins:
            return
        taken = set(self._active).intersection(j.slot for j in joins)
        if taken:
            raise ValueError(f"slots {sorted(taken)} are already in use")
        self._grow(len(self._active) + len(joins))
        used = set(self._row.values())
        rows = [r for r in range(self._capacity) if r not in used][: len(joins)]
        # One staging copy per kind for all joining samples (pinned on CUDA, so it can run async).
        if self.cached is None and any(j.sampling.cache.on for j in joins):
            self._allocate_cache()
        if self.feature_cache is None and any(j.sampling.cache.features for j in joins):
            self._allocate_feature_cache()
        staged = [[r, j.index, j.label, self._plan_rows(j.sampler, j.steps), j.seed, self._schedule_rows(j.sampling),
                   j.index, 0, j.sampling.cache.order, 0, int(j.sampling.cache.features)]
                  for j, r in zip(joins, rows, strict=True)]
        # (N, 11): row, ITER, LABEL, ROW0, seed, SCHED, LAST, COUNT, ORDER, UCOUNT, LEVEL
        ints = self._to_device(torch.tensor(staged, dtype=torch.int64))
        at, seeds = ints[:, 0], ints[:, 4]
        self.meta[at] = torch.cat([ints[:, 1:4], noise_lib.stream_keys(seeds)[:, None], ints[:, 5:]], dim=1)
        self.scale[at] = self._to_device(torch.tensor([j.cfg_scale for j in joins], dtype=torch.float32))
        self.x[at] = noise_lib.initial_noise(seeds, self.shape) if x is None else x.to(self.device, torch.float32)
        self.x0_prev[at] = 0.0
        for t in (*(self.cached or ()), *(self.feature_cache or ())):
            t[at] = 0.0
        for k, (j, r) in enumerate(zip(joins, rows, strict=True)):
            self._active.append(j.slot)
            self._row[j.slot] = r
            s = j.sampling
            runs = np.array(cache_lib.computed(s.cache, s.steps, s.guided), dtype=np.int64)
            self._host[j.slot] = _Slot(j.steps, s.guided, plan(j.sampler, j.steps).stochastic, self._clock - j.index,
                                       s.cache.on, runs, s.cache.features)
            if generators is not None and generators[k] is not None:
                self._generators[j.slot] = generators[k]
        self._arranged = None

    def leave(self, slots: Sequence[int]) -> None:
        """Free these slots (finished, cancelled or failed samples); their rows are reused."""
        gone = set(slots)
        self._active = [s for s in self._active if s not in gone]
        for s in gone:
            self._row.pop(s, None)
            self._host.pop(s, None)
            self._generators.pop(s, None)
        self._arranged = None

    def read(self, slots: Sequence[int]) -> torch.Tensor:
        """x of these slots: (N, C, H, W) float32 (the final samples once they are done)."""
        return self.x.index_select(0, self.rows(slots))

    def predicted_x0(self, slots: Sequence[int]) -> torch.Tensor:
        """The x0 predicted at the last step of these slots: (N, C, H, W) (previews)."""
        return self.x0_prev.index_select(0, self.rows(slots))

    def finite(self, slots: Sequence[int]) -> list[bool]:
        """Whether each slot's x is free of NaN/inf (one device sync: call it at retirement only)."""
        return self.read(slots).isfinite().flatten(1).all(1).tolist()

    def rows(self, slots: Sequence[int]) -> torch.Tensor:
        """The rows of `x` and `x0_prev` that hold these slots' state: (N,) int64 (valid until the next
        step or `posterior`, which may rearrange the rows)."""
        return self._to_device(torch.tensor([self._row[s] for s in slots], dtype=torch.int64))

    # ---- one step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, slots: Sequence[int] | None = None) -> None:
        """Advance every active slot (or just `slots`, e.g. half a batch after an out-of-memory error)
        by one iteration with one forward pass. No slot may be past its last iteration."""
        if not self._active or (slots is not None and not slots):
            return
        a = self._arrange(None if slots is None else list(slots))
        if a.caching:
            return self._step_cached(a, slots)
        k, var_values, mean, x0 = self._predict(a)
        self.rows_computed = a.n + a.guided
        if a.noisy.numel():  # only the noisy samples need a variance and noise (hashing noise is costly)
            sigma = self.denoiser.noise_scale(k.index_select(1, a.noisy), var_values.index_select(0, a.noisy))
            mean.index_add_(0, a.noisy, sigma * self._noise(a, a.iteration.index_select(0, a.noisy)))
        # Written back only now: a step that fails (e.g. out of memory) leaves the state as it was.
        a.x.copy_(mean)
        a.x0_prev.copy_(x0)
        self._advance(a, slots)

    def _advance(self, a: _Arrangement, slots: Sequence[int] | None) -> None:
        a.iteration.add_(1)
        if a.partial:  # only these slots' iterations moved (out-of-memory halves; background samples pausing)
            for s in slots:
                self._host[s].base -= 1
        else:
            self._clock += 1

    def _step_cached(self, a: _Arrangement, slots: Sequence[int] | None) -> None:
        """`step` for a batch with cached samples: the network runs for the rows whose schedule says so
        (F of the B, the guided ones first, Gc of the G, plus their null-class twins); every row's output is
        first forecast from its cache, the computed rows' overwrite theirs, and the computed rows' cache
        history moves on."""
        f_rows, g_rows = a.counts[self._clock - a.clock0]  # host ints from the fixed schedules
        n, c = a.n, self.shape[0]
        it = a.iteration  # (B,)
        rows = a.row0 + it
        t = self.timesteps.index_select(0, rows)
        k = self.coeffs.index_select(1, rows)  # (NUM_COEFFS, B, 1, 1, 1)
        flags = self.schedules.index_select(0, self.meta[:n, SCHED] + it)  # (B, 2): runs, resets
        runs, resets = flags[:, 0], flags[:, 1].bool()
        # the computed rows, guided ones first, in row order (a stable sort on 0 guided+run, 1 run, 2 skipped)
        idx = torch.argsort((1 - runs) * 2 + a.unguided, stable=True)[:f_rows]  # (F,)
        f, d1, d2 = (t_[:n] for t_ in self.cached)  # (B, C_out, H, W) each
        last, count, order = self.meta[:n, LAST], self.meta[:n, COUNT], self.meta[:n, ORDER]
        gap = (it - last).clamp_(min=1).float().view(-1, 1, 1, 1)  # iterations since the last computed one
        c1 = (order >= 1).float().view(-1, 1, 1, 1) * gap
        c2 = (order >= 2).float().view(-1, 1, 1, 1) * gap * gap * 0.5
        pred = _forecast(f, d1, d2, c1, c2)  # (B, C_out, H, W) forecast: f + k d1 + k^2/2 d2
        if f_rows:
            x_c = a.x.index_select(0, idx)  # (F, C, H, W)
            t_c, y_c = t.index_select(0, idx), a.labels.index_select(0, idx)
            null = torch.full((g_rows,), self.denoiser.null_class, dtype=torch.int64, device=self.device)
            x_in, t_in, y_in = torch.cat([x_c, x_c[:g_rows]]), torch.cat([t_c, t_c[:g_rows]]), torch.cat([y_c, null])
        if a.features:  # every row's output from the final layer on its features, forecast or computed
            h_cond, h_null = self._forecast_features(a.guided, c1.view(-1, 1, 1), c2.view(-1, 1, 1))
            if f_rows:
                h = self.denoiser.features(x_in, t_in, y_in).float()  # (F + Gc, T, D)
                h_cond.index_copy_(0, idx, h[:f_rows])
                h_null.index_copy_(0, idx[:g_rows], h[f_rows:])
            out = self.denoiser.head(torch.cat([h_cond, h_null]), torch.cat([t, t[:a.guided]]), a.y)  # (B + G, ...)
            eps_h, var_h = self.denoiser.guide(out, n, a.guided, a.scales)
            # an output-level row takes it where it ran, its own forecast elsewhere
            from_head = (runs.bool() | self.meta[:n, LEVEL].bool()).view(-1, 1, 1, 1)
            pred = torch.where(from_head, torch.cat([eps_h, var_h], dim=1), pred)
        elif f_rows:
            out = self.denoiser.forward(x_in, t_in, y_in)  # (F + Gc, C_out, H, W)
            scales = self.scale.index_select(0, idx[:g_rows]).view(-1, 1, 1, 1)
            eps_c, var_c = self.denoiser.guide(out, f_rows, g_rows, scales)
            pred.index_copy_(0, idx, torch.cat([eps_c, var_c], dim=1))
        eps, var_values = pred[:, :c], pred[:, c:]
        mean, x0 = self.denoiser.update(k, a.x, eps, a.x0_prev)
        if a.noisy.numel():  # as in `step`: the noise of DDPM does not depend on caching
            sigma = self.denoiser.noise_scale(k.index_select(1, a.noisy), var_values.index_select(0, a.noisy))
            mean.index_add_(0, a.noisy, sigma * self._noise(a, it.index_select(0, a.noisy)))
        # The computed rows' history: differences per iteration, none across a new run of guidance (a
        # feature-level cache's own history runs on: the sample's features are one function of t).
        fresh = (~resets | self.meta[:n, LEVEL].bool()) if a.features else ~resets
        valid1 = ((count >= 1) & fresh).float().view(-1, 1, 1, 1) / gap
        valid2 = ((count >= 2) & fresh).float().view(-1, 1, 1, 1) / gap
        ran = runs.bool()
        new = _moved_on(f, d1, d2, pred, ran.view(-1, 1, 1, 1), valid1, valid2)
        new_last = torch.where(ran, it, last)
        new_count = torch.where(ran, torch.where(fresh, count + 1, 1), count)
        if a.features:
            new += self._feature_history(a.guided, (h_cond, h_null), ran, resets, gap.view(-1, 1, 1), valid1, valid2)
        # Written back only now: a step that fails (e.g. out of memory) leaves the state as it was.
        a.x.copy_(mean)
        a.x0_prev.copy_(x0)
        state = [f, d1, d2]
        if a.features:  # the rows' feature histories, their guided twins', the twins' counts
            state += [*(t_[:n] for t_ in self.feature_cache[:3]), *(t_[:a.guided] for t_ in self.feature_cache[3:]),
                      self.meta[:a.guided, UCOUNT]]
        for dst, src in zip(state, new, strict=True):
            dst.copy_(src)
        last.copy_(new_last)
        count.copy_(new_count)
        self.rows_computed = f_rows + g_rows
        self._advance(a, slots)

    def _forecast_features(self, g: int, c1: torch.Tensor, c2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The features forecast for the stepped rows (B, T, D) and for the first g rows' null-class twins
        (G, T, D), c1 and c2 (B, 1, 1) the rows' coefficients of d1 and d2."""
        n = c1.shape[0]
        f, d1, d2, uf, ud1, ud2 = (t_[:n] for t_ in self.feature_cache)
        return _forecast(f, d1, d2, c1, c2), _forecast(uf[:g], ud1[:g], ud2[:g], c1[:g], c2[:g])

    def _feature_history(self, g: int, h: tuple[torch.Tensor, torch.Tensor], ran: torch.Tensor, resets: torch.Tensor,
                         gap: torch.Tensor, valid1: torch.Tensor, valid2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The feature histories after this step: (f, d1, d2) of the rows (B, T, D) each, of the first g rows'
        twins (G, T, D) each (the guided rows: the others' twins keep theirs), and the twins' UCOUNT (G,).
        valid1/valid2: the rows' 1 / gap where their history has one / two earlier points (B, 1, 1, 1); gap
        (B, 1, 1). The twins' history starts afresh with the guided run."""
        n = ran.shape[0]
        f, d1, d2 = (t_[:n] for t_ in self.feature_cache[:3])
        uf, ud1, ud2 = (t_[:g] for t_ in self.feature_cache[3:])
        on = ran.view(-1, 1, 1)
        cond = _moved_on(f, d1, d2, h[0], on, valid1.view(-1, 1, 1), valid2.view(-1, 1, 1))
        ucount = self.meta[:g, UCOUNT]
        fresh = ~resets[:g]
        u1 = ((ucount >= 1) & fresh).float().view(-1, 1, 1) / gap[:g]
        u2 = ((ucount >= 2) & fresh).float().view(-1, 1, 1) / gap[:g]
        null = _moved_on(uf, ud1, ud2, h[1], on[:g], u1, u2)
        new_ucount = torch.where(ran[:g], torch.where(fresh, ucount + 1, 1), ucount)
        return (*cond, *null, new_ucount)

    @torch.no_grad()
    def posterior(self) -> Posterior:
        """One forward for the active slots without advancing them: the step's prediction before noise."""
        a = self._arrange(None)
        k, var_values, mean, x0 = self._predict(a)
        rows = self.rows(self._active)  # back to join order
        return Posterior(tuple(self._active), mean.index_select(0, rows), x0.index_select(0, rows),
                         self.denoiser.log_variance(k, var_values).index_select(0, rows))

    def _predict(self, a: _Arrangement) -> tuple[torch.Tensor, ...]:
        """The forward and the update rule for rows [0, B), without noise and without writing anything:
        (k (NUM_COEFFS, B, 1, 1, 1), var_values, mean, x0 (B, C, H, W) each)."""
        n, g, x = a.n, a.guided, a.x
        rows = a.row0 + a.iteration  # (B,) this iteration's row in the plan tables
        t = self.timesteps.index_select(0, rows)
        k = self.coeffs.index_select(1, rows)
        x_in, t_in = (torch.cat([x, a.x_guided]), torch.cat([t, t[:g]])) if g else (x, t)  # (B + G, ...)
        out = self.denoiser.forward(x_in, t_in, a.y)  # (B + G, 2C, H, W); the model casts x to its dtype
        eps, var_values = self.denoiser.guide(out, n, g, a.scales)
        mean, x0 = self.denoiser.update(k, x, eps, a.x0_prev)
        return k, var_values, mean, x0

    def _noise(self, a: _Arrangement, done: torch.Tensor) -> torch.Tensor:
        """The noise after this iteration for the noisy rows, (K, C, H, W): counter-based from (seed,
        iteration + 1), or from a caller's torch.Generator where one was given (a slower per-sample path,
        library use only)."""
        z = noise_lib.keyed_gaussian(a.keys, done + 1, self.shape)
        for pos, gen in a.generators:
            z[pos] = torch.randn(self.shape, generator=gen, device=gen.device).to(self.device)
        return z

    # ---- internals ---------------------------------------------------------------------------------
    def _arrange(self, subset: list[int] | None) -> _Arrangement:
        """Move the rows so that the samples to step are rows [0, B), guided ones first (a permutation
        copy, only when membership or someone's guidance changed since the last arrangement)."""
        if subset is None and self._arranged is not None and self._clock < self._arranged.expires:
            return self._arranged
        first = self._active if subset is None else subset
        unknown = set(first) - set(self._row)
        if unknown:
            raise ValueError(f"slots {sorted(unknown)} are not in the batch")
        hosts = {s: self._host[s] for s in first}
        now_guided = {s for s, h in hosts.items() if self._clock - h.base in h.guided}
        guided = [s for s in first if s in now_guided]
        unguided = [s for s in first if s not in now_guided]
        order = guided + unguided + [s for s in self._active if s not in hosts]  # + the rest (subset steps)
        self._permute(order)
        n, g = len(first), len(guided)
        flips = [h.base + f for h in hosts.values() if (f := h.next_flip(self._clock - h.base)) is not None]
        noisy_rows = [r for r, s in enumerate(order[:n]) if self._host[s].stochastic]
        noisy = self._to_device(torch.tensor(noisy_rows, dtype=torch.int64))
        null = torch.full((g,), self.denoiser.null_class, dtype=torch.int64, device=self.device)
        expires = min(flips, default=float("inf"))
        caching = {}
        if any(h.cached for h in hosts.values()):
            until = self._clock + 1 if subset is not None else expires
            caching = dict(clock0=self._clock, counts=self._counts(order[:n], g, until),
                           unguided=(torch.arange(n, device=self.device) >= g).long(), labels=self.meta[:n, LABEL],
                           features=any(h.features for h in hosts.values()))
        arranged = _Arrangement(
            n=n, guided=g, expires=expires, partial=subset is not None,
            x=self.x[:n], x_guided=self.x[:g], x0_prev=self.x0_prev[:n], iteration=self.meta[:n, ITER],
            row0=self.meta[:n, ROW0], y=torch.cat([self.meta[:n, LABEL], null]),
            scales=self.scale[:g].view(-1, 1, 1, 1), noisy=noisy,
            keys=self.meta[:n, KEY].index_select(0, noisy),
            generators=tuple((i, self._generators[order[r]]) for i, r in enumerate(noisy_rows)
                             if order[r] in self._generators),
            **caching,
        )
        self._arranged = None if subset is not None else arranged
        return arranged

    def _counts(self, stepped: list[int], g: int, until: int | float) -> tuple[tuple[int, int], ...]:
        """(F, Gc) for each step from now until the clock `until` (at most until the last sample finishes):
        how many of these rows run the network, and how many of the first g (the guided ones)."""
        horizon = max(self._host[s].steps - (self._clock - self._host[s].base) for s in stepped)
        if until != float("inf"):
            horizon = min(horizon, int(until) - self._clock)
        total = np.zeros((max(1, horizon), 2), dtype=np.int64)
        for r, s in enumerate(stepped):
            h = self._host[s]
            i = self._clock - h.base
            runs = h.computed[i:i + horizon]
            total[: len(runs), 0] += runs
            if r < g:
                total[: len(runs), 1] += runs
        return tuple((int(f), int(gc)) for f, gc in total)

    def _permute(self, order: list[int]) -> None:
        """Put slot order[r]'s state in row r. All or nothing: every gather runs (and may fail, e.g. out
        of memory) before any row is written, and the cached arrangement is dropped first."""
        perm = [self._row[s] for s in order]
        if perm == list(range(len(perm))):
            return
        self._arranged = None
        src = self._to_device(torch.tensor(perm, dtype=torch.int64))
        state = (self.x, self.x0_prev, self.meta, self.scale, *(self.cached or ()), *(self.feature_cache or ()))
        moved = [t.index_select(0, src) for t in state]
        for t, m in zip(state, moved, strict=True):
            t[: len(perm)].copy_(m)
        self._row = {s: r for r, s in enumerate(order)}

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
            table = torch.from_numpy(p.coeffs.T).float().view(NUM_COEFFS, -1, 1, 1, 1).to(self.device)
            self.coeffs = torch.cat([self.coeffs, table], dim=1)
        return self._plan_row0[key]

    def _schedule_rows(self, s: Sampling) -> int:
        """The first row of this sampling's cache schedule in `schedules`, appended on first use."""
        key = (s.cache, s.steps, s.guided)
        if key not in self._schedule_row0:
            table = torch.tensor([cache_lib.computed(*key), cache_lib.resets(*key)], dtype=torch.int64).T
            self._schedule_row0[key] = self.schedules.shape[0]
            self.schedules = torch.cat([self.schedules, table.to(self.device)])
        return self._schedule_row0[key]

    def _allocate_cache(self) -> None:
        shape = (self._capacity, self.denoiser.model.config.out_channels, *self.shape[1:])
        self.cached = tuple(torch.zeros(shape, device=self.device) for _ in range(3))

    def _allocate_feature_cache(self) -> None:
        cfg = self.denoiser.model.config
        shape = (self._capacity, (cfg.input_size // cfg.patch_size) ** 2, cfg.hidden_size)  # (S, T, D)
        self.feature_cache = tuple(torch.zeros(shape, device=self.device) for _ in range(6))

    def _grow(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        cap = max(needed, 2 * self._capacity)

        def grown(t: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(cap, *t.shape[1:], dtype=t.dtype, device=t.device)
            out[: t.shape[0]] = t
            return out

        for name in ("x", "x0_prev", "meta", "scale"):
            setattr(self, name, grown(getattr(self, name)))
        if self.cached is not None:
            self.cached = tuple(grown(t) for t in self.cached)
        if self.feature_cache is not None:
            self.feature_cache = tuple(grown(t) for t in self.feature_cache)
        self._capacity = cap
