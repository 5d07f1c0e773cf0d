"""Fashion-MNIST from its IDX files (Debian: apt-get install dataset-fashion-mnist)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _open(path: Path):
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.exists():
            return gzip.open(candidate, "rb") if candidate.suffix == ".gz" else open(candidate, "rb")
    raise FileNotFoundError(
        f"Fashion-MNIST file {path}[.gz] not found. Install it with "
        "'apt-get install dataset-fashion-mnist' or pass --data-dir to a folder with the IDX files."
    )


def _read_idx(path: Path) -> np.ndarray:
    """IDX format: magic (0, 0, type 0x08 = uint8, ndim), ndim big-endian uint32 sizes, then the data."""
    with _open(path) as f:
        zero, dtype, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated ({data.size} bytes for shape {shape})")
    return data.reshape(shape)


def load_split(split: str, data_dir: Path | str = DEFAULT_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 in [-1, 1], shape (N, 1, 28, 28), and int64 labels (N,)."""
    images_name, labels_name = _FILES[split]
    images = _read_idx(Path(data_dir) / images_name)
    labels = _read_idx(Path(data_dir) / labels_name)
    x = torch.from_numpy(images.copy()).float().div_(127.5).sub_(1.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))
