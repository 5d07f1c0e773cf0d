"""Images -> PNG / JPEG / WebP bytes, off the device thread. A request's images form one grid unless
the client asked for them separately (JSON answers)."""

from __future__ import annotations

import io
import json
import math
from typing import get_args

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .job import ImageFormat

MEDIA_TYPES = {f: f"image/{f}" for f in get_args(ImageFormat)}  # "png" -> "image/png", ...
GRID_PADDING = 2  # pixels between grid cells, as torchvision's save_image (the reference's sample.py)


def grid(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) image, ceil(sqrt(N)) per row."""
    n, h, w, c = images.shape
    if n == 1:
        return images[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    p = GRID_PADDING
    out = np.zeros((rows * (h + p) + p, cols * (w + p) + p, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        out[p + r * (h + p): p + r * (h + p) + h, p + q * (w + p): p + q * (w + p) + w] = images[k]
    return out


def _encode_one(pixels: np.ndarray, fmt: ImageFormat, parameters: dict, seeds: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(pixels, mode="RGB")
    if fmt == "png":
        info = PngInfo()
        info.add_itxt("parameters", json.dumps(dict(parameters, seeds=list(seeds)), ensure_ascii=False))
        info.add_text("Software", "dit-serve")
        image.save(buf, format="PNG", pnginfo=info)
    elif fmt == "jpeg":
        image.save(buf, format="JPEG", quality=95)
    else:
        image.save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def encode(images: np.ndarray, seeds: tuple[int, ...], fmt: ImageFormat, *, separate: bool = False,
           parameters: dict | None = None) -> list[bytes]:
    """uint8 (N, H, W, 3) -> one grid image, or N images when `separate`; PNGs carry the parameters."""
    parameters = parameters or {}
    if separate:
        return [_encode_one(images[k], fmt, parameters, (seeds[k],)) for k in range(len(seeds))]
    return [_encode_one(grid(images), fmt, parameters, seeds)]
