"""Quality of the embedded Fashion-MNIST model, judged by an independent classifier.

    python bench/quality.py [--model weights/fashion_dit.safetensors] [--per-class 100]

For each sampler and cfg scale in 1, 2, 4: 100 images per class (1000), the share the classifier
labels as the requested class, and a feature-FID (classifier penultimate features) against 1000
test images; as the reference, the same FID between 1000 training and 1000 test images. Also the
time to generate one image alone with the declared defaults, and batched images/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model import Pipeline
from training.classifier import load_classifier
from training.data import DEFAULT_DIR, load_split


def feature_fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets (float64, no scipy)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    # tr(sqrt(cov_a cov_b)) = sum of sqrt eigenvalues of the PSD matrix sqrt_a cov_b sqrt_a
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) grey-as-RGB -> (N, 1, H, W) in [-1, 1]."""
    return images[..., 0].float().div(127.5).sub(1).unsqueeze(1)


@torch.no_grad()
def generate(pipe: Pipeline, labels: list[int], seeds: list[int], sampler: str, steps: int, cfg: float,
             batch: int = 200) -> torch.Tensor:
    out = [pipe.generate(labels[i:i + batch], seeds[i:i + batch], sampler=sampler, steps=steps, cfg_scale=cfg)
           for i in range(0, len(labels), batch)]
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="weights/fashion_dit.safetensors")
    p.add_argument("--classifier", default="tests/assets/fashion_classifier.safetensors")
    p.add_argument("--data-dir", default=str(DEFAULT_DIR))
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--samplers", nargs="+", default=["ddpm:50", "ddim:25", "dpm-solver++:20"],
                   help="sampler:steps pairs")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    args = p.parse_args()

    pipe = Pipeline.from_pretrained(args.model)
    judge = load_classifier(args.classifier)
    x_train, _ = load_split("train", args.data_dir)
    x_test, y_test = load_split("test", args.data_dir)
    g = torch.Generator().manual_seed(0)
    n = 10 * args.per_class
    test_feats = judge.features(x_test[torch.randperm(len(x_test), generator=g)[:n]])
    train_feats = judge.features(x_train[torch.randperm(len(x_train), generator=g)[:n]])
    with torch.no_grad():
        test_acc = (torch.cat([judge(x_test[i:i + 1000]).argmax(1) for i in range(0, 10000, 1000)]) == y_test)
    print(f"classifier test-split accuracy: {test_acc.float().mean().item():.4f}")
    print(f"reference feature-FID, {n} train vs {n} test images: {feature_fid(train_feats, test_feats):.2f}")

    d = pipe.info.defaults
    labels = [c for c in range(10) for _ in range(args.per_class)]
    seeds = list(range(n))
    print(f"\n{'sampler':>13} {'steps':>5} {'cfg':>4} {'class agreement':>15} {'feature-FID':>11} {'seconds':>7}")
    for item in args.samplers:
        sampler, steps = item.split(":")
        for cfg in args.cfg:
            t0 = time.monotonic()
            images = generate(pipe, labels, seeds, sampler, int(steps), cfg)
            dt = time.monotonic() - t0
            with torch.no_grad():
                x = to_model_input(images)
                agree = (judge(x).argmax(1) == torch.tensor(labels)).float().mean().item()
                fid = feature_fid(judge.features(x), test_feats)
            mark = " (defaults)" if (sampler, int(steps), cfg) == (d.sampler, d.steps, d.cfg_scale) else ""
            print(f"{sampler:>13} {steps:>5} {cfg:>4.1f} {agree:>15.1%} {fid:>11.2f} {dt:>7.0f}{mark}", flush=True)

    # Speed with the declared defaults.
    lone = []
    for k in range(10):
        t0 = time.perf_counter()
        pipe.generate([k % 10], [k])
        lone.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    pipe.generate(labels[::10], seeds[::10])
    batched = len(labels[::10]) / (time.perf_counter() - t0)
    print(f"\ndefaults {d.sampler}, {d.steps} steps, cfg {d.cfg_scale}: one image alone "
          f"{statistics.median(lone) * 1000:.0f} ms (median of 10), batched {batched:.0f} images/s "
          f"(batch of {len(labels[::10])}), {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
