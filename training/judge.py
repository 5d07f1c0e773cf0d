"""The project's judge of generated Fashion-MNIST images: an independent classifier (training/classifier.py,
weights in weights/fashion_classifier.safetensors) whose agreement with the requested classes, and the
Frechet distance between its penultimate features of generated and real test images (feature-FID),
measure a model or a dataset: the paper's protocol (FID-50K with Inception features) at the embedded
model's scale. bench/quality.py, `dit-eval` (dit_client/evaluate.py) and the server's datasets made with
`evaluate: true` use it."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .classifier import load_classifier
from .data import DEFAULT_DIR, load_split

CLASSIFIER = Path(__file__).resolve().parent.parent / "weights" / "fashion_classifier.safetensors"


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


def read_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A dataset shard's images, uint8 (N, H, W, 3), and their (N,) class ids: a tar ({key}.png +
    {key}.json, in key order) or an npz (arr_0, arr_1)."""
    if path.suffix == ".npz":
        data = np.load(path)
        return data["arr_0"], data["arr_1"]
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers()}
        keys = sorted(name[:-4] for name in members if name.endswith(".png"))
        images = np.stack([np.asarray(Image.open(io.BytesIO(tar.extractfile(members[k + ".png"]).read()))
                                      .convert("RGB")) for k in keys])
        labels = np.array([json.loads(tar.extractfile(members[k + ".json"]).read())["class_id"] for k in keys])
    return images, labels


def read_shards(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Every image of a dataset's shard files (.tar or .npz; others are passed over), in the order given."""
    read = [read_shard(p) for p in paths if p.suffix in (".tar", ".npz")]
    if not read:
        raise ValueError(f"no shard files (.tar or .npz) among {len(paths)} paths")
    return np.concatenate([images for images, _ in read]), np.concatenate([labels for _, labels in read])


def write_adm_npz(paths: list[Path], out: Path) -> int:
    """Every image of the shards in one .npz as the original sample_ddp.py writes it for the ADM evaluation
    suite (`arr_0` uint8 (N, H, W, 3); `arr_1` the class ids, int64), written shard by shard (two passes:
    one for N, one for the pixels), so that 50,000 images need no more memory than one shard. Returns N."""
    shards = [p for p in paths if p.suffix in (".tar", ".npz")]
    if not shards:
        raise ValueError(f"no shard files (.tar or .npz) among {len(paths)} paths")
    labels = [read_shard(p)[1] for p in shards]
    first, _ = read_shard(shards[0])
    shape = (sum(len(ids) for ids in labels), *first.shape[1:])
    with zipfile.ZipFile(out, "w", allowZip64=True) as z:
        with z.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for path in shards:
                f.write(np.ascontiguousarray(read_shard(path)[0], dtype=np.uint8).tobytes())
        with z.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, np.concatenate(labels).astype(np.int64))
    return shape[0]


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) grey-as-RGB -> (N, 1, H, W) in [-1, 1]."""
    return images[..., 0].float().div(127.5).sub(1).unsqueeze(1)


@torch.no_grad()
def judge(images: torch.Tensor, labels: torch.Tensor, *, classifier: Path = CLASSIFIER,
          data_dir: Path | str = DEFAULT_DIR, seed: int = 0) -> dict:
    """Class agreement and feature-FID of uint8 (N, 28, 28, 3) images against as many test images."""
    net = load_classifier(classifier)
    x = to_model_input(images)
    x_test, _ = load_split("test", data_dir)
    reference = x_test[torch.randperm(len(x_test), generator=torch.Generator().manual_seed(seed))[:len(x)]]
    feats = torch.cat([net.features(x[i:i + 1000]) for i in range(0, len(x), 1000)])
    agree = torch.cat([net(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)]) == labels
    return {"images": len(x), "class_agreement": round(agree.float().mean().item(), 4),
            "feature_fid": round(feature_fid(feats, net.features(reference)), 3)}
