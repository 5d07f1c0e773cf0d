"""DiT architecture configuration: a frozen dataclass plus the paper's named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class DiTConfig:
    input_size: int = 32  # latent (or pixel) side length H = W
    patch_size: int = 2
    in_channels: int = 4  # 4 for SD-VAE latents, 1 or 3 for pixel-space models
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # the label embedding table has one more row: the null class
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1  # > 0 adds the null-class row used for guidance

    def __post_init__(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError("hidden_size must be a multiple of 4 (2-D sin-cos position embedding)")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)


# (depth, hidden, heads) per size, as in the paper's Table 1; the patch size is the suffix.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

PRESETS: dict[str, DiTConfig] = {
    f"DiT-{size}/{patch}": DiTConfig(depth=d, hidden_size=h, num_heads=n, patch_size=patch)
    for size, (d, h, n) in _SIZES.items()
    for patch in (2, 4, 8)
}


def preset(name: str, **overrides) -> DiTConfig:
    """A named preset, e.g. preset("DiT-XL/2", input_size=64) for 512 px."""
    try:
        return replace(PRESETS[name], **overrides)
    except KeyError:
        raise ValueError(f"unknown DiT preset {name!r}; choose one of {sorted(PRESETS)}") from None
