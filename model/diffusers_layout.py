"""Conversion of diffusers' DiT layout (Transformer2DModel / DiTTransformer2DModel) to the original keys.

diffusers copies the shared timestep and class embedders into every block and splits qkv into
to_q / to_k / to_v; its pos_embed is not stored (we regenerate the fixed sin-cos table).
"""

from __future__ import annotations

import torch

DIFFUSERS_CLASSES = ("Transformer2DModel", "DiTTransformer2DModel")

_BLOCK_MAP = {
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_SHARED_MAP = {  # per-block copies -> one shared module
    "norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "norm1.emb.class_embedder.embedding_table": "y_embedder.embedding_table",
}
_TOP_MAP = {
    "pos_embed.proj": "x_embedder.proj",
    "proj_out_1": "final_layer.adaLN_modulation.1",
    "proj_out_2": "final_layer.linear",
}


def is_diffusers_state_dict(sd: dict) -> bool:
    return any(k.startswith("transformer_blocks.") for k in sd)


def num_blocks(sd: dict, prefix: str = "blocks.") -> int:
    """The transformer blocks a state dict holds under `prefix` (original keys: "blocks."; diffusers':
    "transformer_blocks."): 1 + the largest index, so a missing block fails loading by name."""
    indices = [int(k[len(prefix):].split(".", 1)[0]) for k in sd if k.startswith(prefix)]
    return 1 + max(indices) if indices else 0


def to_original(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """diffusers keys -> original keys (without pos_embed). Raises ValueError naming what is wrong."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"{source}: diffusers DiT weights lack {key!r}; is this a complete DiT transformer?")
        used.add(key)
        return sd[key]

    for dk, ok in _TOP_MAP.items():
        for p in ("weight", "bias"):
            out[f"{ok}.{p}"] = take(f"{dk}.{p}")
    for i in range(num_blocks(sd, "transformer_blocks.")):
        pre = f"transformer_blocks.{i}."
        for dk, ok in _BLOCK_MAP.items():
            for p in ("weight", "bias"):
                out[f"blocks.{i}.{ok}.{p}"] = take(f"{pre}{dk}.{p}")
        for p in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([take(f"{pre}attn1.to_{n}.{p}") for n in "qkv"], dim=0)
        for dk, ok in _SHARED_MAP.items():
            params = ("weight",) if dk.endswith("embedding_table") else ("weight", "bias")
            for p in params:
                t = take(f"{pre}{dk}.{p}")
                first = out.setdefault(f"{ok}.{p}", t)
                if first is not t and not torch.equal(first, t):
                    raise ValueError(
                        f"{source}: block {i}'s copy of the shared {ok} differs from block 0's; DiT shares one "
                        "embedder, so this checkpoint is not a DiT (or was fine-tuned per block) and cannot load"
                    )
    extra = sorted(set(sd) - used)
    if extra:
        raise ValueError(f"{source}: unexpected diffusers keys {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    return out


def to_diffusers(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Original keys -> diffusers keys (for comparisons with diffusers' DiT); pos_embed is dropped."""
    out = {f"{dk}.{p}": sd[f"{ok}.{p}"] for dk, ok in _TOP_MAP.items() for p in ("weight", "bias")}
    for i in range(depth):
        pre = f"transformer_blocks.{i}."
        for dk, ok in _BLOCK_MAP.items():
            for p in ("weight", "bias"):
                out[pre + f"{dk}.{p}"] = sd[f"blocks.{i}.{ok}.{p}"]
        for p in ("weight", "bias"):
            for name, part in zip("qkv", sd[f"blocks.{i}.attn.qkv.{p}"].chunk(3, dim=0), strict=True):
                out[pre + f"attn1.to_{name}.{p}"] = part
        for dk, ok in _SHARED_MAP.items():
            for p in ("weight",) if dk.endswith("embedding_table") else ("weight", "bias"):
                out[pre + f"{dk}.{p}"] = sd[f"{ok}.{p}"]
    return out
