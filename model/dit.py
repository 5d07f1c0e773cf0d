"""The DiT network (Peebles & Xie), with the reference code's module and state-dict names.

An original checkpoint (facebookresearch/DiT) loads into this module with a strict load_state_dict.
Attention goes through torch's scaled_dot_product_attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DiTConfig
from .embeddings import LabelEmbedder, TimestepEmbedder, sincos_pos_embed_2d


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (N, T, D), shift/scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with a strided convolution (key proj), T = (H / p) * (W / p)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, H/p, W/p) -> (N, T, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (keys qkv, proj)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, heads, T, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, head_dim)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """Linear -> tanh-GELU -> Linear (keys fc1, fc2)."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: gated residuals, shift/scale from c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x (N, T, D), c (N, D) -> six (N, D) modulation vectors
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to p*p*out_channels values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


class DiT(nn.Module):
    """Diffusion Transformer: forward(x (N,C,H,W), t (N,), y (N,)) -> (N, 2C, H, W) with learned sigma."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(config.num_classes, d, with_null_class=config.class_dropout_prob > 0)
        self.register_buffer("pos_embed", self.pos_embed_for(config))  # (1, T, D)
        self.blocks = nn.ModuleList(
            DiTBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(d, config.patch_size, config.out_channels)
        self.initialize_weights()

    @staticmethod
    def pos_embed_for(config: DiTConfig) -> torch.Tensor:
        return sincos_pos_embed_2d(config.hidden_size, config.input_size // config.patch_size).unsqueeze(0)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def initialize_weights(self) -> None:
        """The paper's initialisation (xavier linears, adaLN-Zero, zeroed output), for training."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W); each token holds a p x p patch, channels last."""
        p, c = self.config.patch_size, self.config.out_channels
        h = w = self.config.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], c, h * p, w * p)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the transformer (the embedders may be float32, see `cast`)."""
        return self.x_embedder.proj.weight.dtype

    def cast(self, dtype: torch.dtype) -> DiT:
        """Transformer weights in `dtype`; the timestep and class embedders stay float32."""
        self.to(dtype)
        self.t_embedder.float()
        self.y_embedder.float()
        return self

    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """c = t_emb + y_emb, computed in the embedders' precision, then in the transformer's: (N, D)."""
        return (self.t_embedder(t) + self.y_embedder(y)).to(self.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.condition(t, y)  # (N, D)
        return self.head(self.features(x, c), c)

    # The forward in two parts (the feature-level step cache, model/cache.py, forecasts what lies between).
    def features(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The hidden state entering the final layer: (N, T, D), from x (N, C, H, W) and c (N, D)."""
        x = self.x_embedder(x.to(self.dtype)) + self.pos_embed  # (N, T, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        return x

    def head(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The final layer on features h (N, T, D): (N, C_out, H, W)."""
        return self.unpatchify(self.final_layer(h, c))  # (N, T, p*p*C_out) -> (N, C_out, H, W)
