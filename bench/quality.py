"""Quality of the embedded Fashion-MNIST model, judged by an independent classifier: the frontier of
quality against cost over samplers x step counts x guidance scales x guidance intervals.

    python bench/quality.py [--model weights/fashion_dit.safetensors] [--per-class 100]
                            [--settings dpm-solver++:20:2 dpm-solver++:20:3:0-0.7 ...] [--out FILE]

A setting is sampler:steps:cfg[:lo-hi[:cache]] (interval default 0-1, guidance at every step; cache: a
preset of model/cache.py or method,every[,order[,warmup[,guided_every[,guided_warmup]]]], e.g. taylor,3,2 or
reuse,2 or taylor,3,2,0,2,2; default off). For each:
--per-class images per class (seeds 0..N-1), the share the classifier labels as the requested class
(class agreement), a feature-FID (the classifier's penultimate features) against as many test images,
the forward rows one image costs (a guided step costs 2 rows, an unguided one 1, a step the cache skips
0), counted from the rows the batch actually ran (SlotBatch.rows_computed), and images/s while
generating them in batches of 200 (wall clock: noisy on a shared
machine). As the reference, the same FID between as many training and test images.

At the end: the Pareto-best settings (no other setting has fewer or equal rows, higher or equal
agreement and lower or equal FID, one of them strictly), and the settings that qualify to replace the
model's declared defaults under the rule of issue 15, against --baseline (default: the declared
defaults) measured in the same run: agreement >= the baseline's and FID lower by more than 1.0, or
equal quality (agreement within 0.5 point, FID within 0.5) with >= 10% fewer rows. Last, the speed of
--baseline and the declared defaults, interleaved (--speed-only: just that).

    python bench/quality.py --per-class 50 --threads 1 --baseline dpm-solver++:20:2   # weights/README.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from model import Join, Pipeline
from model.cache import OFF, Cache
from model.denoise import rows_per_iteration
from model.samplers import Sampling
from training.classifier import load_classifier
from training.data import DEFAULT_DIR, load_split
from training.judge import feature_fid, to_model_input

# The frontier of weights/README.md, most telling first (a partial run still answers): the declared
# defaults of before (DPM-Solver++ 20, cfg 2, guided throughout), intervals that skip the high-noise
# steps at scales 2-5, then fewer steps, an interval that also skips the lowest noise, full guidance at
# 3, and DDIM. u = t / 999; the README maps u to the noise level sigma.
FRONTIER = [
    "dpm-solver++:20:2", "dpm-solver++:20:2:0-0.7", "dpm-solver++:20:3:0-0.7", "dpm-solver++:20:3:0-0.5",
    "dpm-solver++:20:4:0-0.5", "dpm-solver++:15:4:0-0.5", "dpm-solver++:10:4:0-0.5", "dpm-solver++:20:5:0-0.5",
    "dpm-solver++:20:4:0-0.4", "dpm-solver++:20:4:0.1-0.5", "dpm-solver++:15:3:0-0.7", "dpm-solver++:10:3:0-0.7",
    "dpm-solver++:20:3", "ddim:25:4:0-0.5",
]


@dataclass(frozen=True)
class Setting:
    sampler: str
    steps: int
    cfg: float
    interval: tuple[float, float] = (0.0, 1.0)
    cache: Cache = OFF

    @classmethod
    def parse(cls, text: str) -> Setting:
        sampler, steps, cfg, *rest = text.split(":")
        interval = tuple(float(v) for v in rest[0].split("-")) if rest else (0.0, 1.0)
        return cls(sampler, int(steps), float(cfg), interval, parse_cache(rest[1]) if len(rest) > 1 else OFF)

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.sampler, self.steps, self.cfg, self.interval, self.cache)

    @property
    def planned_rows(self) -> int:
        """Forward rows per image from the plan (exact for these fixed schedules)."""
        return sum(rows_per_iteration(self.sampler, self.steps, self.cfg, self.interval, self.cache))

    def cache_text(self) -> str:
        c = self.cache
        return "off" if not c.on else f"{c.method} every {c.every}" + (f" order {c.order}" if c.order else "") + (
            f" warmup {c.warmup}" if c.warmup else "") + (f" guided {c.guided_every}" if c.guided_every else "") + (
            f" guided warmup {c.guided_warmup}" if c.guided_warmup else "")

    def label(self) -> str:
        return (f"{self.sampler} {self.steps} cfg {self.cfg:g} [{self.interval[0]:g}, {self.interval[1]:g}]"
                + ("" if not self.cache.on else f" cache {self.cache_text()}"))


def parse_cache(text: str) -> Cache:
    """A preset name, or method,every[,order[,warmup[,guided_every[,guided_warmup]]]]."""
    if "," not in text:
        return Cache.parse(text)
    method, *numbers = text.split(",")
    return Cache(method, *(int(v) for v in numbers))


@dataclass(frozen=True)
class Row:
    setting: Setting
    rows: float  # forward rows per image, as computed
    agreement: float
    fid: float
    images_per_second: float

    def dominates(self, other: Row) -> bool:
        s, o = self, other
        at_least = s.rows <= o.rows and s.agreement >= o.agreement and s.fid <= o.fid
        better = s.rows < o.rows or s.agreement > o.agreement or s.fid < o.fid
        return at_least and better


def qualifies(row: Row, today: Row) -> str | None:
    """Why `row` may replace the declared defaults `today` (issue 15's rule), or None."""
    if row.agreement >= today.agreement and row.fid < today.fid - 1.0:
        return "better: agreement >= and FID lower by > 1.0"
    same = abs(row.agreement - today.agreement) <= 0.005 and abs(row.fid - today.fid) <= 0.5
    if same and row.rows <= 0.9 * today.rows:
        return "equal quality with >= 10% fewer rows"
    return None


@torch.no_grad()
def generate(pipe: Pipeline, labels: list[int], seeds: list[int], s: Setting,
             batch: int = 200) -> tuple[torch.Tensor, float]:
    """uint8 images, and the forward rows per image the batch ran (counted step by step, not planned)."""
    out, rows = [], 0
    for i in range(0, len(labels), batch):
        b = pipe.new_batch(batch)
        b.join([Join(k, c, seed, s.sampling) for k, (c, seed) in enumerate(zip(labels[i:i + batch],
                                                                                 seeds[i:i + batch], strict=True))])
        for _ in range(s.steps):
            b.step()
            rows += b.rows_computed
        out.append(pipe.decode(b.read(range(len(b.active)))))
    return torch.cat(out), rows / len(labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="weights/fashion_dit.safetensors")
    p.add_argument("--classifier", default="weights/fashion_classifier.safetensors")
    p.add_argument("--data-dir", default=str(DEFAULT_DIR))
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--settings", nargs="+", default=FRONTIER, help="sampler:steps:cfg[:lo-hi] (default: the frontier)")
    p.add_argument("--baseline", help="the setting the rule compares against (default: the model's declared defaults)")
    p.add_argument("--out", help="also write the report to this file (appended as rows complete)")
    p.add_argument("--threads", type=int, help="torch threads (1 is faster on a machine shared with other work)")
    p.add_argument("--skip-timing", action="store_true", help="skip the speed comparison at the end")
    p.add_argument("--speed-only", action="store_true", help="only the speed comparison of --baseline and the "
                   "declared defaults (no quality)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = open(args.out, "w") if args.out else None  # noqa: SIM115 (kept open for the whole run)

    def say(line: str = "") -> None:
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    pipe = Pipeline.from_pretrained(args.model)
    d = pipe.info.defaults
    today = Setting.parse(args.baseline) if args.baseline else Setting(d.sampler, d.steps, d.cfg_scale,
                                                                      d.guidance_interval)
    settings = [Setting.parse(s) for s in args.settings]
    if today not in settings:
        settings.insert(0, today)
    declared = Setting(d.sampler, d.steps, d.cfg_scale, d.guidance_interval)
    if args.speed_only:
        return speed(pipe, list(dict.fromkeys([today, declared])), say)
    judge = load_classifier(args.classifier)
    x_train, _ = load_split("train", args.data_dir)
    x_test, y_test = load_split("test", args.data_dir)
    g = torch.Generator().manual_seed(0)
    n = 10 * args.per_class
    test_feats = judge.features(x_test[torch.randperm(len(x_test), generator=g)[:n]])
    train_feats = judge.features(x_train[torch.randperm(len(x_train), generator=g)[:n]])
    with torch.no_grad():
        test_acc = (torch.cat([judge(x_test[i:i + 1000]).argmax(1) for i in range(0, 10000, 1000)]) == y_test)
    say(f"classifier test-split accuracy: {test_acc.float().mean().item():.4f}")
    say(f"reference feature-FID, {n} train vs {n} test images: {feature_fid(train_feats, test_feats):.2f}")
    say(f"{n} images per setting, {torch.get_num_threads()} threads")

    labels = [c for c in range(10) for _ in range(args.per_class)]
    seeds = list(range(n))
    say(f"\n{'sampler':>13} {'steps':>5} {'cfg':>4} {'interval':>11} {'cache':>24} {'rows/image':>10} "
        f"{'agreement':>9} {'feature-FID':>11} {'images/s':>8}")
    rows: list[Row] = []
    for s in settings:
        t0 = time.monotonic()
        images, computed_rows = generate(pipe, labels, seeds, s)
        rate = n / (time.monotonic() - t0)
        with torch.no_grad():
            x = to_model_input(images)
            agree = (judge(x).argmax(1) == torch.tensor(labels)).float().mean().item()
            fid = feature_fid(judge.features(x), test_feats)
        rows.append(Row(s, computed_rows, agree, fid, rate))
        interval = f"[{s.interval[0]:g}, {s.interval[1]:g}]"
        mark = " (defaults)" if s == today else ""
        say(f"{s.sampler:>13} {s.steps:>5} {s.cfg:>4g} {interval:>11} {s.cache_text():>24} {computed_rows:>10g} "
            f"{agree:>9.1%} {fid:>11.2f} {rate:>8.1f}{mark}")

    say("\nPareto-best (rows, agreement, FID):")
    for r in rows:
        if not any(o.dominates(r) for o in rows):
            say(f"  {r.setting.label()}: {r.rows:g} rows, {r.agreement:.1%}, FID {r.fid:.2f}")
    base = next(r for r in rows if r.setting == today)
    say(f"\nqualify to replace the defaults ({today.label()}: {base.rows:g} rows, {base.agreement:.1%}, "
        f"FID {base.fid:.2f}):")
    for r in rows:
        why = qualifies(r, base)
        if why:
            say(f"  {r.setting.label()}: {r.rows:g} rows, {r.agreement:.1%}, FID {r.fid:.2f} ({why})")

    if not args.skip_timing:
        speed(pipe, list(dict.fromkeys([today, declared])), say)


def speed(pipe: Pipeline, settings: list[Setting], say, rounds: int = 3, batch: int = 100) -> None:
    """Batched images/s and one image alone, the settings interleaved (A B A B ...) in each round, so that
    a machine shared with other work slows them alike."""
    labels = [k % 10 for k in range(batch)]
    batched: dict[Setting, list[float]] = {s: [] for s in settings}
    alone: dict[Setting, list[float]] = {s: [] for s in settings}
    for _ in range(rounds):
        for s in settings:
            kw = dict(sampler=s.sampler, steps=s.steps, cfg_scale=s.cfg, guidance_interval=s.interval, cache=s.cache)
            t0 = time.perf_counter()
            pipe.generate(labels, list(range(batch)), **kw)
            batched[s].append(batch / (time.perf_counter() - t0))
            for k in range(4):
                t0 = time.perf_counter()
                pipe.generate([k], [k], **kw)
                alone[s].append(time.perf_counter() - t0)
    say(f"\nspeed, interleaved, {torch.get_num_threads()} threads:")
    for s in settings:
        say(f"  {s.label()} ({s.planned_rows} rows/image): batched {statistics.median(batched[s]):.1f} images/s "
            f"(median of {rounds} x {batch}), one image alone {statistics.median(alone[s]) * 1000:.0f} ms (median of "
            f"{4 * rounds})")


if __name__ == "__main__":
    main()
