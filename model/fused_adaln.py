"""Fused adaLN kernels (Triton) with their PyTorch references.

DiT spends a large share of a step in memory-bound elementwise work around each LayerNorm. Two
kernels cover all of it, one pass over each (N*T, D) row:

  ln_modulate(x, shift, scale)               -> LN(x) * (1 + scale) + shift
  residual_ln_modulate(x, y, gate, sh, sc)   -> x' = x + gate * y,  LN(x') * (1 + sc) + sh   (both)

LayerNorm has no affine and eps 1e-6, as in DiT. Statistics and arithmetic are float32 whatever the
storage dtype. shift/scale/gate are (N, D) views (row stride may exceed D: they are chunks of the
adaLN output). The references are what `DiTBlock.forward` computes; `use_triton=False` picks them.
Triton runs on CUDA tensors, and on the CPU under TRITON_INTERPRET=1 (how the tests run it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6

try:  # Triton is optional: without it the references run.
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False


def triton_usable(x: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, or anywhere when Triton built them for its interpreter."""
    return HAVE_TRITON and (x.is_cuda or INTERPRETED)


# ---- references ---------------------------------------------------------------------------------
def ln_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    h = F.layer_norm(x, (x.shape[-1],), eps=EPS)
    return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def residual_ln_modulate_reference(x, y, gate, shift, scale) -> tuple[torch.Tensor, torch.Tensor]:
    x = x + gate.unsqueeze(1) * y
    return x, ln_modulate_reference(x, shift, scale)


# ---- kernels ------------------------------------------------------------------------------------
if HAVE_TRITON:

    @triton.jit
    def _layer_norm_modulate(x, mask, cols, D, SHIFT, SCALE, mod_offset, eps):
        """LN(x) * (1 + scale) + shift for one row x (float32, BLOCK_D wide, `mask` marking the D real values)."""
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
        shift = tl.load(SHIFT + mod_offset + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + mod_offset + cols, mask=mask, other=0.0).to(tl.float32)
        return xc * rstd * (1.0 + scale) + shift

    @triton.jit
    def _ln_modulate_kernel(X, SHIFT, SCALE, OUT, T, D, mod_stride, eps, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)  # one (n, t) row of D values; its modulation is row n
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        out = _layer_norm_modulate(x, mask, cols, D, SHIFT, SCALE, (row // T) * mod_stride, eps)
        tl.store(OUT + row * D + cols, out.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _residual_ln_modulate_kernel(X, Y, GATE, SHIFT, SCALE, X_OUT, OUT, T, D, mod_stride, eps,
                                     BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        mod_offset = (row // T) * mod_stride
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(GATE + mod_offset + cols, mask=mask, other=0.0).to(tl.float32)
        x = x + gate * y
        tl.store(X_OUT + row * D + cols, x.to(X_OUT.dtype.element_ty), mask=mask)
        out = _layer_norm_modulate(x, mask, cols, D, SHIFT, SCALE, mod_offset, eps)
        tl.store(OUT + row * D + cols, out.to(OUT.dtype.element_ty), mask=mask)

    # Triton decides, once, when a kernel is defined (from TRITON_INTERPRET), whether it compiles it for
    # the GPU or runs it in its CPU interpreter: ask the kernel, not the environment.
    INTERPRETED = isinstance(_ln_modulate_kernel, InterpretedFunction)
else:  # pragma: no cover - depends on the install
    INTERPRETED = False


def _launch_args(x: torch.Tensor, *mods: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """rows, T, D, modulation row stride, block size, warps."""
    n, t, d = x.shape
    stride = mods[0].stride(0)
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (N, T, D)")
    for m in mods:
        if m.shape != (n, d) or m.stride() != (stride, 1):
            raise ValueError(f"modulation vectors must be (N, D) rows with a common stride, got {m.shape}")
    block = triton.next_power_of_2(d)
    warps = 4 if block <= 1024 else 8
    return n * t, t, d, stride, block, warps


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *, use_triton: bool = True):
    """LN(x) * (1 + scale) + shift; x (N, T, D), shift/scale (N, D)."""
    if not (use_triton and triton_usable(x)):
        return ln_modulate_reference(x, shift, scale)
    rows, t, d, stride, block, warps = _launch_args(x, shift, scale)
    out = torch.empty_like(x)
    _ln_modulate_kernel[(rows,)](x, shift, scale, out, t, d, stride, EPS, BLOCK_D=block, num_warps=warps)
    return out


def residual_ln_modulate(x, y, gate, shift, scale, *, use_triton: bool = True):
    """(x + gate * y, LN(x + gate * y) * (1 + scale) + shift); x, y (N, T, D), the rest (N, D)."""
    if not (use_triton and triton_usable(x)):
        return residual_ln_modulate_reference(x, y, gate, shift, scale)
    rows, t, d, stride, block, warps = _launch_args(x, gate, shift, scale)
    y = y.contiguous()
    x_out, out = torch.empty_like(x), torch.empty_like(x)
    _residual_ln_modulate_kernel[(rows,)](x, y, gate, shift, scale, x_out, out, t, d, stride, EPS,
                                          BLOCK_D=block, num_warps=warps)
    return x_out, out
