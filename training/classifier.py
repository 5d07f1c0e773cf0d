"""An independent Fashion-MNIST classifier that judges generated images (quality check and tests).

    python -m training.classifier --out weights/fashion_classifier.safetensors

A small CNN trained on the training split; its 256-d penultimate features also serve the feature-FID.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from training.data import DEFAULT_DIR, load_split


class FashionCNN(nn.Module):
    """(N, 1, 28, 28) in [-1, 1] -> logits (N, 10); `features` gives the (N, 256) penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # (N, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),  # (N, 64, 7, 7)
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),  # (N, 128, 3, 3)
        )
        self.fc = nn.Linear(128 * 3 * 3, 256)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(256, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def load_classifier(path: str | Path) -> FashionCNN:
    model = FashionCNN()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: FashionCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    preds = torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return (preds == y).float().mean().item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DIR))
    p.add_argument("--out", default="weights/fashion_classifier.safetensors")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    x, y = load_split("train", args.data_dir)
    x_test, y_test = load_split("test", args.data_dir)
    model = FashionCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.epochs * (len(x) // 128))
    t0 = time.monotonic()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x) - 127, 128):
            idx = perm[i:i + 128]
            # Light augmentation (shifts of up to 2 px) so the judge does not overfit the training split.
            xb = torch.roll(x[idx], shifts=tuple(torch.randint(-2, 3, (2,)).tolist()), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {accuracy(model, x_test, y_test):.4f} "
              f"({time.monotonic() - t0:.0f} s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out,
              metadata={"test_accuracy": f"{accuracy(model, x_test, y_test):.4f}"})
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
