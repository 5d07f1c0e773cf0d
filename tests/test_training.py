"""The training pieces of the embedded model: the data reader and the paper's loss."""

from __future__ import annotations

import gzip

import pytest
import torch
from conftest import require_installed

from model import DiT, DiTConfig
from training.data import DEFAULT_DIR, load_split
from training.loss import diffusion_loss


def test_reads_the_test_split():
    require_installed((DEFAULT_DIR / "t10k-images-idx3-ubyte.gz").exists(), "Fashion-MNIST",
                      "apt-get install dataset-fashion-mnist")
    x, y = load_split("test")
    assert x.shape == (10000, 1, 28, 28) and x.min() == -1 and x.max() == 1
    assert torch.equal(y.bincount(), torch.full((10,), 1000))


def test_idx_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_split("test", tmp_path)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"\x00" * 10)
    with pytest.raises(ValueError, match="truncated"):
        load_split("test", tmp_path)


def test_loss_trains_a_tiny_dit():
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                          num_classes=3))
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    y = torch.randint(0, 3, (16,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    first = diffusion_loss(model, x0, y, generator=torch.Generator().manual_seed(2)).item()
    for _ in range(60):
        loss = diffusion_loss(model, x0, y, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = diffusion_loss(model, x0, y, generator=torch.Generator().manual_seed(2)).item()
    assert torch.isfinite(torch.tensor(first)) and last < 0.5 * first
