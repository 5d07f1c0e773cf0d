"""`FastDiT`: the same function as `DiT.forward`, computed with fewer passes over memory.

- The adaLN modulation of every block and of the final layer is one matmul: the blocks' weights are
  rebound as views into one stacked (depth * 6D + 2D, D) matrix, so no memory is duplicated.
- Every LayerNorm is fused with the gated residual before it and the modulation after it
  (model/fused_adaln.py): one kernel per residual instead of four or five elementwise passes.
- On CUDA the MLP's tanh-GELU runs as the epilogue of its first matmul (cuBLASLt's GELU_BIAS, through
  torch._addmm_activation), which saves a pass over the widest activation (N, T, 4D).
- Attention is torch's scaled_dot_product_attention (flash on CUDA); qkv is one projection.

`fused=False` keeps the restructured schedule but uses the PyTorch references of the kernels;
`gelu_epilogue=False` runs the GELU as its own kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dit import DiT
from .fused_adaln import ln_modulate, residual_ln_modulate


def _stack_adaln(dit: DiT) -> tuple[torch.Tensor, torch.Tensor]:
    layers = [b.adaLN_modulation[1] for b in dit.blocks] + [dit.final_layer.adaLN_modulation[1]]
    weight = torch.cat([layer.weight.data for layer in layers])  # (depth * 6D + 2D, D)
    bias = torch.cat([layer.bias.data for layer in layers])
    start = 0
    for layer in layers:  # rebind as views: the reference path keeps working on the same storage
        rows = layer.weight.shape[0]
        layer.weight = nn.Parameter(weight[start:start + rows], requires_grad=False)
        layer.bias = nn.Parameter(bias[start:start + rows], requires_grad=False)
        start += rows
    return weight, bias


class FastDiT(nn.Module):
    def __init__(self, dit: DiT, *, fused: bool = True, gelu_epilogue: bool = True):
        super().__init__()
        self.dit = dit
        self.fused = fused
        self.gelu_epilogue = gelu_epilogue
        self.config = dit.config
        weight, bias = _stack_adaln(dit)
        self.register_buffer("adaln_weight", weight, persistent=False)
        self.register_buffer("adaln_bias", bias, persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d, fused = self.dit, self.fused
        width = 6 * self.config.hidden_size
        x = (d.x_embedder(x.to(d.dtype)) + d.pos_embed).contiguous()  # (N, T, D)
        mods = F.linear(F.silu(d.condition(t, y)), self.adaln_weight, self.adaln_bias)  # (N, depth*6D + 2D)
        blocks = [mods[:, i * width:(i + 1) * width].chunk(6, dim=1) for i in range(len(d.blocks))]
        final_shift, final_scale = mods[:, len(d.blocks) * width:].chunk(2, dim=1)

        h = ln_modulate(x, blocks[0][0], blocks[0][1], use_triton=fused)  # norm1 of block 0
        for i, block in enumerate(d.blocks):
            _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = blocks[i]
            x, h = residual_ln_modulate(x, block.attn(h), gate_msa, shift_mlp, scale_mlp, use_triton=fused)
            # The MLP's residual is fused with the next LayerNorm: the next block's norm1, or the final one.
            shift, scale = (blocks[i + 1][0], blocks[i + 1][1]) if i + 1 < len(d.blocks) else (final_shift, final_scale)
            x, h = residual_ln_modulate(x, self._mlp(block.mlp, h), gate_mlp, shift, scale, use_triton=fused)
        return d.unpatchify(d.final_layer.linear(h))  # (N, C_out, H, W)

    def _mlp(self, mlp, h: torch.Tensor) -> torch.Tensor:
        if not (self.gelu_epilogue and h.is_cuda):
            return mlp(h)
        n, t, d = h.shape
        # cuBLASLt's GELU epilogue is the tanh approximation, as DiT uses (the CPU op would use erf).
        a = torch._addmm_activation(mlp.fc1.bias, h.reshape(n * t, d), mlp.fc1.weight.t(), use_gelu=True)
        return mlp.fc2(a).view(n, t, d)  # (N, T, D)
