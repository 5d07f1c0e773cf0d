"""Train the embedded class-conditional DiT on Fashion-MNIST (pixel space, 28x28, 10 classes).

The paper's recipe scaled down: eps prediction with learned sigma (MSE + VB), linear betas, class
dropout 0.1 for guidance, AdamW, EMA. Seeded and resumable (a checkpoint every few minutes).

    python -m training.train_dit --out weights/ --minutes 95

writes weights/fashion_dit.safetensors (EMA weights) and weights/fashion_dit.json (architecture,
class names, defaults, training record), the sidecar layout model.load_dit reads.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from model.config import DiTConfig
from model.dit import DiT
from training.data import CLASS_NAMES, DEFAULT_DIR, load_split
from training.loss import diffusion_loss

ARCH = DiTConfig(
    input_size=28, patch_size=4, in_channels=1, hidden_size=128, depth=6, num_heads=4,
    num_classes=10, learn_sigma=True, class_dropout_prob=0.1,
)
NAME = "fashion_dit"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DIR), help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--out", default="weights", help="where the checkpoint and its config go")
    p.add_argument("--work", default="runs/fashion_dit", help="where resumable training state goes")
    p.add_argument("--minutes", type=float, default=95.0, help="wall-clock training budget")
    p.add_argument("--max-steps", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300, help="linear learning-rate warm-up steps")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint-every", type=float, default=5.0, help="minutes between checkpoints")
    return p.parse_args(argv)


def save_release(ema: DiT, out: Path, record: dict) -> None:
    """EMA weights + sidecar config, written atomically (temp file, then rename)."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in ema.state_dict().items()}
    tmp = out / f".{NAME}.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / f"{NAME}.safetensors")
    config = {
        "architecture": ARCH.to_dict(),
        "space": "pixel",
        "data_range": [-1.0, 1.0],
        "class_names": CLASS_NAMES,
        "defaults": record.pop("defaults"),
        "training": record,
    }
    (out / f"{NAME}.json").write_text(json.dumps(config, indent=1) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_train, y_train = load_split("train", args.data_dir)  # (60000, 1, 28, 28) in [-1, 1]

    model, ema = DiT(ARCH), DiT(ARCH)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    step, elapsed = 0, 0.0

    work = Path(args.work)
    state_path = work / "state.pt"
    if state_path.exists():  # resume
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, elapsed = state["step"], state["elapsed"]
        print(f"resumed at step {step} ({elapsed / 60:.1f} min)")

    def checkpoint() -> None:
        work.mkdir(parents=True, exist_ok=True)
        tmp = work / "state.pt.tmp"
        torch.save(
            {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
             "gen": gen.get_state(), "step": step, "elapsed": elapsed}, tmp,
        )
        tmp.replace(state_path)
        save_release(ema, Path(args.out), {
            "data": "Fashion-MNIST train split (60000 images), no augmentation",
            "steps": step, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
            "ema_decay": args.ema, "seed": args.seed, "wall_minutes": round(elapsed / 60, 1),
            "threads": args.threads,
            "command": "python -m training.train_dit " + " ".join(sys.argv[1:] if argv is None else argv),
            # chosen for the shipped weights by bench/quality.py (weights/README.md); measure again for others
            "defaults": {"sampler": "dpm-solver++", "steps": 13, "cfg_scale": 4.25, "guidance_interval": [0.0, 0.5],
                         "cache": "features3g2"},
        })

    model.train()
    budget = args.minutes * 60
    last_ckpt = time.monotonic()
    start = time.monotonic() - elapsed
    bar = tqdm(total=int(budget), unit="s", initial=int(elapsed), desc="train", mininterval=10)
    while step < args.max_steps and elapsed < budget:
        idx = torch.randint(0, len(x_train), (args.batch_size,), generator=gen)
        x, y = x_train[idx], y_train[idx]
        drop = torch.rand(len(y), generator=gen) < ARCH.class_dropout_prob
        y = torch.where(drop, ARCH.num_classes, y)  # the null class trains the unconditional model
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        loss = diffusion_loss(model, x, y, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        step += 1
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise RuntimeError(f"loss became {loss_value} at step {step}")
        now = time.monotonic()
        elapsed = now - start
        bar.n = int(elapsed)
        bar.set_postfix(step=step, loss=f"{loss_value:.4f}", refresh=False)
        bar.update(0)
        if now - last_ckpt > args.checkpoint_every * 60:
            checkpoint()
            last_ckpt = now
    checkpoint()
    bar.close()
    print(f"done: {step} steps in {elapsed / 60:.1f} min -> {args.out}/{NAME}.safetensors")


if __name__ == "__main__":
    main()
