"""dit-eval DIR: judge a dataset's shards (from `dit-generate dataset`, or GET /datasets/{id}/shards/{k}).

For the embedded Fashion-MNIST model: class agreement and feature-FID against as many Fashion-MNIST test
images, with the project's own judge (training/judge.py: its classifier ships in weights/, the test set
comes from Debian's dataset-fashion-mnist or --data-dir), written to DIR/evaluation.json: the paper's
protocol (FID-50K) at the embedded model's scale. For an ImageNet model the judge does not apply: `--merge
FILE.npz` writes the shards as the one `.npz` (arr_0 uint8 (N, H, W, 3), arr_1 labels) that the ADM
evaluation suite reads:
    python evaluator.py VIRTUAL_imagenet256_labeled.npz FILE.npz   (github.com/openai/guided-diffusion)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from training.judge import judge, read_shard, read_shards, write_adm_npz


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dit-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="the dataset's folder (its shard files)")
    p.add_argument("--merge", type=Path, help="also write every image as one .npz (the ADM suite's input)")
    p.add_argument("--data-dir", help="Fashion-MNIST's IDX files (default: Debian's dataset-fashion-mnist)")
    args = p.parse_args(argv)
    shards = [p for p in sorted(args.folder.glob("shard-*")) if p.suffix in (".tar", ".npz")]
    if not shards:
        raise SystemExit(f"dit-eval: no shard-*.tar or shard-*.npz files in {args.folder}")
    if args.merge is not None:  # shard by shard: the pixels of 50,000 images are never all in memory at once
        print(f"{args.merge}: {write_adm_npz(shards, args.merge)} images")
    images, _ = read_shard(shards[0])
    if images.shape[1:] != (28, 28, 3):
        print(f"dit-eval: {images.shape[1]}x{images.shape[2]} images: the Fashion-MNIST judge does not apply; run "
              "the ADM evaluation suite on the merged .npz (see --help)", file=sys.stderr)
        return 0 if args.merge is not None else 2
    images, labels = read_shards(shards)
    kwargs = {"data_dir": args.data_dir} if args.data_dir else {}
    try:
        result = judge(torch.from_numpy(images), torch.from_numpy(labels), **kwargs)
    except FileNotFoundError as e:
        print(f"dit-eval: {e}", file=sys.stderr)
        return 1
    (args.folder / "evaluation.json").write_text(json.dumps(result, indent=1))
    print(f"{args.folder}: {result['images']} images, class agreement {result['class_agreement']:.1%}, "
          f"feature-FID {result['feature_fid']:.2f} (against as many Fashion-MNIST test images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
