"""Step caching: which iterations of a sample run the network, and how the others get its output.

A DiT's output changes slowly from one denoising iteration to the next, so a sample may skip the forward
at some iterations and take a stand-in for the network's output there (the guided eps and the variance
values, the `(2C, H, W)` tensor the update rule reads). A skipped iteration costs the sample no forward
row, which in a continuous batch frees the row for another request's sample. Two training-free rules:

- "reuse" (FORA's idea, at the level of the model output): take the output of the last computed
  iteration as it is.
- "taylor" (TaylorSeer's idea, at the level of the model output): forecast it from finite differences of
  the computed outputs, `f + k d1 + k^2 / 2 d2`, k the iterations since the last computed one and
  d1, d2 the first and second differences per iteration (order 1 or 2).
- "taylor-features" (TaylorSeer's idea, at the level of the features): forecast the hidden state that
  enters the final layer, `(T, D)` per row (the last block's output), the same way, for the sample and,
  inside its guidance interval, for its null-class twin apart, then run the exact final layer on the
  forecast (its adaLN takes this iteration's t and the class) and combine the pair as at a computed step.
  The final layer is a small part of a forward (~0.4% of the embedded model's MACs, ~0.01% of DiT-XL/2's) and is not
  counted as a row. The sample's feature history runs on across the guidance edges (its features are one
  function of t there); the twin's starts with the guided run. It always computes the last iteration (a
  forecast there costs the most; see below), so that it can serve as a default at any step count.

Which iterations run is fixed in advance (no look at the data), so a scheduler knows a cached sample's
forward rows at each of its iterations exactly: the first `warmup` iterations run, then one in `every`.
A guidance interval splits a sample's iterations into runs with and without guidance, whose outputs are
different functions (the guided eps jumps at the edge); each run after the first starts with a computed
iteration and a fresh history, and its cadence restarts there. A guided pair (the sample and its
null-class twin) is skipped or computed together: the cache holds the guided combination.

`guided_every` gives the run with guidance a cadence of its own. There a computed step costs two rows and
the guided combination is harder to forecast (its error is the scale times the conditional one), while
the unguided run forgives more: on the embedded model a step forecast inside [0, 0.5] costs up to three
times the x0 error of one outside it (weights/README.md), so the rows are better spent there. `guided_warmup`
runs the first iterations of the guided run whatever the cadence (the cadence then counts from the last
of them): its first steps are the hardest to forecast (the guided combination changes fastest there). Pick
a cadence that computes the last iteration: forecasting it cost 2 of FID there, the most of any step.

Settings: "off" (every iteration runs: today's bytes), a preset name (PRESETS), or a mapping
{"method": "reuse" | "taylor" | "taylor-features", "every": N, "order": 1 | 2, "warmup": W, "guided_every": M,
"guided_warmup": V}.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache

METHODS = ("off", "reuse", "taylor", "taylor-features")


@dataclass(frozen=True)
class Cache:
    """One sample's step-caching rule (checked when made)."""

    method: str = "off"
    every: int = 1  # after the warm-up, the network runs at one iteration in `every` of each run
    order: int = 0  # taylor: the finite-difference order, 1 or 2 (reuse and off: 0)
    warmup: int = 0  # the first `warmup` iterations always run
    guided_every: int = 0  # the cadence in the run with guidance (0: `every` there too)
    guided_warmup: int = 0  # the first `guided_warmup` iterations of the run with guidance always run

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"cache method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("every", "order", "warmup", "guided_every", "guided_warmup"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ValueError(f"cache {name} must be an integer, got {getattr(self, name)!r}")
        parameters = (self.every, self.order, self.warmup, self.guided_every, self.guided_warmup)
        if self.method == "off" and parameters != (1, 0, 0, 0, 0):
            raise ValueError("cache method 'off' takes no parameters")
        if not 1 <= self.every <= 10:
            raise ValueError(f"cache every must be between 1 and 10, got {self.every}")
        if self.method in ("taylor", "taylor-features") and self.order not in (1, 2):
            raise ValueError(f"cache order must be 1 or 2 for {self.method}, got {self.order}")
        if self.method == "reuse" and self.order != 0:
            raise ValueError("cache order applies to taylor only (reuse takes the last output as it is)")
        if not 0 <= self.warmup <= 1000:
            raise ValueError(f"cache warmup must be between 0 and 1000, got {self.warmup}")
        if not 0 <= self.guided_every <= 10:
            raise ValueError(f"cache guided_every must be between 1 and 10 (0: the same as every), got "
                             f"{self.guided_every}")
        if not 0 <= self.guided_warmup <= 1000:
            raise ValueError(f"cache guided_warmup must be between 0 and 1000, got {self.guided_warmup}")

    @property
    def on(self) -> bool:
        return self.method != "off" and (self.every > 1 or self.guided_every > 1)

    @property
    def features(self) -> bool:
        """Whether it forecasts the final layer's input features (else the model output)."""
        return self.on and self.method == "taylor-features"

    @classmethod
    def parse(cls, value) -> Cache:
        """"off", a preset name, a Cache, or a mapping {method, every, order, warmup}; ValueError otherwise."""
        if isinstance(value, Cache):
            return value
        if isinstance(value, str):
            if value in PRESETS:
                return PRESETS[value]
            raise ValueError(f"cache must be \"off\", a preset ({', '.join(p for p in PRESETS if p != 'off')}) "
                             f"or {{\"method\": ..., ...}}, got {value!r}")
        if isinstance(value, Mapping):
            unknown = set(value) - {"method", "every", "order", "warmup", "guided_every", "guided_warmup"}
            if unknown:
                raise ValueError(f"cache takes method, every, order, warmup, guided_every and guided_warmup; unknown: "
                                 f"{', '.join(sorted(unknown))}")
            if "method" not in value:
                raise ValueError("cache needs a method: \"reuse\", \"taylor\" or \"taylor-features\" (or send "
                                 "\"off\")")
            return cls(**value)
        raise ValueError(f"cache must be a string or an object, got {type(value).__name__}")

    def describe(self) -> str | dict:
        """What a response, a job's status and an image's metadata say: the preset's name, else the mapping."""
        for name, preset in PRESETS.items():
            if preset == self:
                return name
        # the guided fields only where set: what a job stored before they existed says, and reads back
        return {k: v for k, v in asdict(self).items() if v or k not in ("guided_every", "guided_warmup")}


OFF = Cache()
# Presets, chosen by the frontier of weights/README.md (the embedded model's judge, 1,000 images a setting).
PRESETS: dict[str, Cache] = {
    "off": OFF,
    "taylor2": Cache("taylor", every=2, order=2),
    "taylor3": Cache("taylor", every=3, order=2),
    "reuse2": Cache("reuse", every=2),
    # every 3 outside the guidance interval, every 2 inside it: 11 rows on the defaults (taylor2: 12)
    "taylor3g2": Cache("taylor", every=3, order=2, guided_every=2),
    # the features forecast, every 3 outside the interval, every 2 inside it after its first two: 11 rows at
    # DPM-Solver++ 13 steps (computed 0, 3, 6 and the pairs 7, 8, 10, 12), within issue 29's quality bounds
    "features3g2": Cache("taylor-features", every=3, order=2, guided_every=2, guided_warmup=2),
}


def computed(cache: Cache, steps: int, guided: range) -> tuple[bool, ...]:
    """Whether the network runs at each of a sample's `steps` iterations (guided: the iterations its
    guidance interval selects, one contiguous run)."""
    return _schedule(cache, steps, guided.start, guided.stop)[0]


def resets(cache: Cache, steps: int, guided: range) -> tuple[bool, ...]:
    """At each iteration: whether the cache's history starts afresh there (a new run of guidance)."""
    return _schedule(cache, steps, guided.start, guided.stop)[1]


@lru_cache(maxsize=4096)
def _schedule(cache: Cache, steps: int, g_start: int, g_stop: int) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
    if not cache.on:
        return (True,) * steps, (False,) * steps
    edges = {0} | ({g_start, g_stop} if g_stop > g_start else set())  # where a run with or without guidance starts
    run_start, run, reset = 0, [], []
    for i in range(steps):
        if i in edges:
            run_start = i
        # the cadence counts from the run's start, or from the end of the warm-up within the first run
        guided = g_start <= i < g_stop
        every = cache.guided_every if cache.guided_every and guided else cache.every
        origin = max(run_start, cache.warmup)  # where the cadence counts from
        if guided and cache.guided_warmup:
            origin = g_start + cache.guided_warmup - 1
        run.append(i < cache.warmup or (guided and i - g_start < cache.guided_warmup) or (i - origin) % every == 0
                   or (cache.features and i == steps - 1))
        reset.append(i in edges)
    return tuple(run), tuple(reset)
