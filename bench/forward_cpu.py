"""Time one DiT forward: ours vs diffusers' DiTTransformer2DModel, same weights, same batch, one run.

    python bench/forward_cpu.py --arch DiT-XL/2 --batch 2 8

Random weights in the paper's initialisation with the adaLN-Zero and output layers randomised too,
so the outputs are not trivially zero. Prints the time per forward of each, their ratio, and how
far diffusers' output is from ours (its port drifts: timestep frequencies, LayerNorm eps).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model import DiT, preset
from model.diffusers_layout import to_diffusers


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="DiT-XL/2")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch", type=int, nargs="+", default=[2, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import DiTTransformer2DModel

    config = preset(args.arch, input_size=args.image_size // 8)
    torch.manual_seed(0)
    ours = DiT(config)
    with torch.no_grad():
        for prm in ours.parameters():  # leave no zero-initialised layer: outputs must be comparable
            prm.normal_(0, 0.02)
    ours.eval().requires_grad_(False)
    theirs = DiTTransformer2DModel(
        num_attention_heads=config.num_heads, attention_head_dim=config.head_dim, in_channels=config.in_channels,
        out_channels=config.out_channels, num_layers=config.depth, sample_size=config.input_size,
        patch_size=config.patch_size, num_embeds_ada_norm=config.num_classes,
    )
    theirs.load_state_dict(to_diffusers(ours.state_dict(), config.depth))
    theirs.eval().requires_grad_(False)

    print(f"{args.arch} at {args.image_size} px, float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'batch':>5} {'ours s':>8} {'diffusers s':>11} {'speed-up':>8} {'diffusers rel. diff':>20}")
    for n in args.batch:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, config.in_channels, config.input_size, config.input_size, generator=g)
        t = torch.randint(0, 1000, (n,), generator=g)
        y = torch.randint(0, config.num_classes, (n,), generator=g)
        with torch.no_grad():
            a = ours(x, t, y)
            b = theirs(x, timestep=t, class_labels=y).sample
            t_ours = timed(lambda: ours(x, t, y), args.repeats)  # noqa: B023
            t_theirs = timed(lambda: theirs(x, timestep=t, class_labels=y), args.repeats)  # noqa: B023
        diff = ((a - b).abs().max() / a.abs().max()).item()
        print(f"{n:>5} {t_ours:>8.3f} {t_theirs:>11.3f} {t_theirs / t_ours:>7.2f}x {diff:>20.2e}")


if __name__ == "__main__":
    main()
