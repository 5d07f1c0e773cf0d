"""`FastDiT`: the same function as `DiT.forward`, computed with fewer passes over memory.

- The adaLN modulation of every block and of the final layer is one matmul: building a FastDiT rebinds
  the DiT's adaLN weights as views into one stacked (depth * 6D + 2D, D) matrix (`fuse_adaln_`), so no
  memory is duplicated.
- Every LayerNorm is fused with the gated residual before it and the modulation after it
  (model/fused_adaln.py): one kernel per residual instead of four or five elementwise passes.
- On CUDA the MLP's tanh-GELU runs as the epilogue of its first matmul (cuBLASLt's GELU_BIAS, through
  torch._addmm_activation), which saves a pass over the widest activation (N, T, 4D).
- Attention is torch's scaled_dot_product_attention (flash on CUDA); qkv is one projection.

- Optionally (`fp8=Fp8Recipe()`), the blocks' qkv, proj and fc2 (and with the recipe's `fc1`, fc1)
  run as FP8 matmuls (model/fp8.py states which layers and why); everything else stays in the model's
  dtype. FP8 runs through `torch._scaled_mm` on GPUs with compute capability >= 8.9, as an emulation
  on the CPU, and not at all (bf16, with a warning) on older GPUs.

`fused=False` keeps the restructured schedule but uses the PyTorch references of the kernels;
`gelu_epilogue=False` runs the GELU as its own kernel.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .dit import Attention, DiT
from .fp8 import Fp8Linear, Fp8Recipe, fp8_matmul_supported
from .fused_adaln import ln_modulate, residual_ln_modulate

log = logging.getLogger(__name__)


def fuse_adaln_(dit: DiT) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: stack the adaLN modulation of every block and of the final layer into one
    (depth * 6D + 2D, D) weight and one bias, and rebind each layer's weight and bias as views into them.
    FastDiT computes every modulation with one matmul over the stack; the reference forward keeps
    reading the same storage, so no memory is duplicated. Returns the stacked (weight, bias).

    Do it after the model's last device or dtype move: a move copies each parameter apart again.
    """
    layers = [b.adaLN_modulation[1] for b in dit.blocks] + [dit.final_layer.adaLN_modulation[1]]
    weight = torch.cat([layer.weight.data for layer in layers])  # (depth * 6D + 2D, D)
    bias = torch.cat([layer.bias.data for layer in layers])
    start = 0
    for layer in layers:
        rows = layer.weight.shape[0]
        layer.weight = nn.Parameter(weight[start:start + rows], requires_grad=False)
        layer.bias = nn.Parameter(bias[start:start + rows], requires_grad=False)
        start += rows
    return weight, bias


class Fp8Attention(Attention):
    """A block's attention with FP8 qkv and proj: `Attention.forward` itself, over the FP8 layers."""

    def __init__(self, attn: Attention, make):
        nn.Module.__init__(self)
        self.num_heads = attn.num_heads
        self.qkv, self.proj = make(attn.qkv), make(attn.proj)


class Fp8Mlp(nn.Module):
    """A block's FP8 linears of the MLP: fc2, and fc1 when the recipe says so (else None: bf16)."""

    def __init__(self, mlp, make, fc1: bool):
        super().__init__()
        self.fc1 = make(mlp.fc1) if fc1 else None
        self.fc2 = make(mlp.fc2)


def _fp8_backend(dit: DiT) -> str | None:
    """scaled_mm where the GPU has FP8 matmuls, the emulation on the CPU, None (stay bf16) elsewhere."""
    device = dit.x_embedder.proj.weight.device
    if fp8_matmul_supported(device):
        return "scaled_mm"
    if device.type == "cpu":
        log.warning("FP8 on the CPU runs as an emulation (float32 matmuls of FP8-rounded values): "
                    "for checking its numerics, not for speed")
        return "emulate"
    major, minor = torch.cuda.get_device_capability(device)
    log.warning("FP8 matmuls need compute capability >= 8.9 (this GPU: %d.%d); the fast path stays in %s",
                major, minor, dit.dtype)
    return None


class FastDiT(nn.Module):
    def __init__(self, dit: DiT, *, fused: bool = True, gelu_epilogue: bool = True, fp8: Fp8Recipe | None = None,
                 fp8_backend: str | None = None):
        super().__init__()
        self.dit = dit
        self.fused = fused
        self.gelu_epilogue = gelu_epilogue
        self.config = dit.config
        weight, bias = fuse_adaln_(dit)  # rebinds `dit`'s adaLN parameters as views of the stack
        self.register_buffer("adaln_weight", weight, persistent=False)
        self.register_buffer("adaln_bias", bias, persistent=False)
        # FP8 layers are built beside the model's own (which the reference path keeps using).
        self.fp8 = fp8
        self.fp8_backend = (fp8_backend or _fp8_backend(dit)) if fp8 is not None else None
        if self.fp8_backend is not None:
            make = lambda linear: Fp8Linear(linear, backend=self.fp8_backend, per_tensor=fp8.activation == "tensor",
                                            use_triton=fused)
            self.attn = nn.ModuleList(Fp8Attention(b.attn, make) for b in dit.blocks)
            self.mlp = nn.ModuleList(Fp8Mlp(b.mlp, make, fp8.fc1) for b in dit.blocks)
        else:
            self.attn = self.mlp = None

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
            attn = block.attn if self.attn is None else self.attn[i]
            x, h = residual_ln_modulate(x, attn(h), gate_msa, shift_mlp, scale_mlp, use_triton=fused)
            # The MLP's residual is fused with the next LayerNorm: the next block's norm1, or the final one.
            shift, scale = (blocks[i + 1][0], blocks[i + 1][1]) if i + 1 < len(d.blocks) else (final_shift, final_scale)
            mlp = self._mlp(block.mlp, None if self.mlp is None else self.mlp[i], h)
            x, h = residual_ln_modulate(x, mlp, gate_mlp, shift, scale, use_triton=fused)
        return d.unpatchify(d.final_layer.linear(h))  # (N, C_out, H, W)

    def _mlp(self, mlp, fp8: Fp8Mlp | None, h: torch.Tensor) -> torch.Tensor:
        n, t, d = h.shape
        h = h.reshape(n * t, d)
        fc2 = mlp.fc2 if fp8 is None else fp8.fc2
        if fp8 is not None and fp8.fc1 is not None:  # FP8 fc1; its GELU runs in fc2's input quantisation
            out = fp8.fc2(fp8.fc1(h), gelu=True)
        elif self.gelu_epilogue and h.is_cuda:
            # cuBLASLt's GELU epilogue is the tanh approximation, as DiT uses (the CPU op would use erf).
            out = fc2(torch._addmm_activation(mlp.fc1.bias, h, mlp.fc1.weight.t(), use_gelu=True))
        else:
            out = fc2(F.gelu(mlp.fc1(h), approximate="tanh"))
        return out.view(n, t, -1)  # (N, T, D)
