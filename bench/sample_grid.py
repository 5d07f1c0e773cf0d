"""A class-by-seed sample grid through the project's own generation path (the README's picture).

    python bench/sample_grid.py --out docs/fashion_grid.png [--model weights/fashion_dit.safetensors]

One row per class, `--per-class` seeds per row, the model's declared defaults unless overridden.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from model import Pipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="weights/fashion_dit.safetensors")
    p.add_argument("--out", default="docs/fashion_grid.png")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling for viewing")
    args = p.parse_args()
    pipe = Pipeline.from_pretrained(args.model)
    n_cls, k = len(pipe.info.class_names), args.per_class
    labels = [c for c in range(n_cls) for _ in range(k)]
    images = pipe.generate(labels, seeds=list(range(len(labels)))).numpy()  # (N, H, W, 3)
    h, w = images.shape[1:3]
    grid = images.reshape(n_cls, k, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(n_cls * h, k * w, 3)
    image = Image.fromarray(np.ascontiguousarray(grid)).resize((k * w * args.scale, n_cls * h * args.scale),
                                                               Image.NEAREST)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    d = pipe.info.defaults
    print(f"wrote {args.out}: rows {', '.join(pipe.info.class_names)}; {d.sampler}, {d.steps} steps, cfg {d.cfg_scale}")


if __name__ == "__main__":
    main()
