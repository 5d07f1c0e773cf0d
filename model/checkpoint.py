"""Reading DiT weights from disk into an original-layout state dict, safely and with clear errors.

Accepted: an original `.pt` checkpoint (flat, or a training checkpoint with an "ema" entry), a
`.safetensors` file with the original keys, a diffusers transformer folder or whole pipeline folder
(`.safetensors` or pickled `.bin` weights), and any of the files with a sidecar `<stem>.json`
holding {"architecture": {...}}. Pickles are read with weights_only=True (no code runs) and mmap.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .diffusers_layout import DIFFUSERS_CLASSES, is_diffusers_state_dict, to_original


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, the problem and the fix."""


@dataclass
class RawCheckpoint:
    state_dict: dict[str, torch.Tensor]  # original key names
    source: Path
    architecture: dict = field(default_factory=dict)  # known config fields (heads, input size, ...)
    extra: dict = field(default_factory=dict)  # the sidecar / pipeline metadata (class names, defaults)
    pipeline_dir: Path | None = None  # a diffusers pipeline folder (for its VAE and id2label)


def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({e}); it may be truncated, download it again"
            ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to unpickle ({str(e).splitlines()[0]}). Only plain tensor checkpoints load "
            "(weights_only=True); re-save the state dict alone, e.g. torch.save(model.state_dict(), path)"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({e}); it may be truncated, download it again"
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):  # a DiT training checkpoint
        obj = obj["ema"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict of tensors; save model.state_dict() instead"
        )
    return obj


def _sidecar(path: Path) -> dict:
    side = path.with_suffix(".json")
    if not side.exists():
        return {}
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{side}: invalid JSON ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("architecture", {}), dict):
        raise CheckpointError(f"{side}: expected an object with an 'architecture' object")
    return meta


def _diffusers_weights(folder: Path) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).exists():
            return folder / name
    raise CheckpointError(f"{folder}: no diffusion_pytorch_model.safetensors or .bin in this diffusers folder")


def _read_diffusers_transformer(folder: Path) -> RawCheckpoint:
    config = json.loads((folder / "config.json").read_text())
    cls = config.get("_class_name")
    if cls not in DIFFUSERS_CLASSES:
        raise CheckpointError(f"{folder}/config.json names {cls!r}; a DiT transformer is one of {DIFFUSERS_CLASSES}")
    weights = _diffusers_weights(folder)
    try:
        sd = to_original(_read_tensor_file(weights), str(weights))
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    arch = {"num_heads": config.get("num_attention_heads"), "input_size": config.get("sample_size")}
    return RawCheckpoint(sd, weights, {k: v for k, v in arch.items() if v is not None})


def read_checkpoint(path: str | Path) -> RawCheckpoint:
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").exists():  # whole diffusers pipeline
            if not (path / "transformer" / "config.json").exists():
                raise CheckpointError(f"{path}: a pipeline folder without transformer/config.json")
            raw = _read_diffusers_transformer(path / "transformer")
            raw.extra = json.loads((path / "model_index.json").read_text())
            raw.pipeline_dir = path
            return raw
        if (path / "config.json").exists():
            return _read_diffusers_transformer(path)
        raise CheckpointError(
            f"{path}: a folder, but neither a diffusers pipeline (model_index.json) nor a transformer (config.json)"
        )
    sd = _read_tensor_file(path)
    meta = _sidecar(path)
    if is_diffusers_state_dict(sd):
        try:
            sd = to_original(sd, str(path))
        except ValueError as e:
            raise CheckpointError(str(e)) from e
    return RawCheckpoint(sd, path, dict(meta.get("architecture", {})), meta)
