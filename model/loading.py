"""`load_dit`: any supported checkpoint -> a DiT in eval mode, architecture read from the weights.

Hidden size, depth, patch, input size, channels, classes and learned sigma come from tensor shapes.
The head count cannot: it comes from `arch`, `num_heads`, the checkpoint's config, or a preset whose
(hidden, depth, patch) matches. A wrong head count would load strictly and silently give wrong
images, so when none of these gives one we stop and ask for it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .checkpoint import CheckpointError, RawCheckpoint, read_checkpoint
from .config import PRESETS, DiTConfig, preset
from .diffusers_layout import num_blocks
from .dit import DiT

_REQUIRED = ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "blocks.0.mlp.fc1.weight",
             "final_layer.linear.weight")


def infer_config(raw: RawCheckpoint, *, arch: str | None = None, num_heads: int | None = None) -> DiTConfig:
    sd, src = raw.state_dict, raw.source
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise CheckpointError(
            f"{src}: missing {missing}; this is not a DiT state dict with the original key names "
            "(facebookresearch/DiT) or the diffusers layout"
        )
    proj = sd["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = num_blocks(sd)
    out_channels = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    known = raw.architecture
    if "pos_embed" in sd:
        input_size = math.isqrt(sd["pos_embed"].shape[1]) * patch
    elif "input_size" in known:
        input_size = int(known["input_size"])
    else:
        raise CheckpointError(f"{src}: no pos_embed and no sample_size in its config; the input size is unknown")
    table_rows = sd["y_embedder.embedding_table.weight"].shape[0]
    dropout = float(known.get("class_dropout_prob", 0.1))
    fields = dict(
        input_size=input_size, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        num_classes=table_rows - (1 if dropout > 0 else 0),
        learn_sigma=out_channels == 2 * in_channels, class_dropout_prob=dropout,
    )
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"{src}: final layer gives {out_channels} channels for {in_channels} input channels")
    fields["num_heads"] = _heads(src, fields, known, arch, num_heads)
    try:
        return DiTConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"{src}: {e}") from e


def _heads(src: Path, fields: dict, known: dict, arch: str | None, num_heads: int | None) -> int:
    if num_heads is not None:
        return int(num_heads)
    if arch is not None:
        p = preset(arch)
        if (p.hidden_size, p.depth, p.patch_size) != (fields["hidden_size"], fields["depth"], fields["patch_size"]):
            raise CheckpointError(
                f"{src}: arch {arch!r} has hidden {p.hidden_size}, depth {p.depth}, patch {p.patch_size}, but the "
                f"weights have {fields['hidden_size']}, {fields['depth']}, {fields['patch_size']}; pass the right arch"
            )
        return p.num_heads
    if known.get("num_heads"):
        return int(known["num_heads"])
    for p in PRESETS.values():
        if (p.hidden_size, p.depth, p.patch_size) == (fields["hidden_size"], fields["depth"], fields["patch_size"]):
            return p.num_heads
    raise CheckpointError(
        f"{src}: hidden {fields['hidden_size']}, depth {fields['depth']}, patch {fields['patch_size']} match no "
        "DiT preset and the checkpoint names no head count; pass num_heads=... (a wrong guess would load and "
        "silently give wrong images)"
    )


def build(raw: RawCheckpoint, config: DiTConfig, *, dtype=None, device=None) -> DiT:
    sd = dict(raw.state_dict)
    with torch.device("meta"):
        model = DiT(config)
    sd.setdefault("pos_embed", DiT.pos_embed_for(config))  # the diffusers layout stores none
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{raw.source}: weights do not fit the architecture {config}: {e}") from e
    model = model.to(device=device).cast(dtype or torch.float32)
    return model.eval().requires_grad_(False)


def load_dit(path: str | Path, *, arch: str | None = None, num_heads: int | None = None, dtype=None,
             device=None) -> DiT:
    """Load a DiT from any supported checkpoint form (see model/checkpoint.py), in eval mode."""
    raw = read_checkpoint(path)
    return build(raw, infer_config(raw, arch=arch, num_heads=num_heads), dtype=dtype, device=device)
