"""FP8 (e4m3) linear layers for the fast path: half the bytes and twice the matmul rate of bf16 on GPUs
with compute capability >= 8.9 (Ada, Hopper, Blackwell).

The recipe (dynamic scaling, nothing calibrated):
  weights      e4m3, one scale per output channel, quantised once when the layer is built;
  activations  e4m3, quantised on the fly before each matmul, one scale per row (token) by default, or
               one for the whole tensor (`Fp8Recipe(activation="tensor")`);
  scale        amax / 448 (448 is e4m3's largest finite value), so each row's largest value maps to 448;
               values are rounded to nearest-even and clamped to +-448 (saturating, never inf).
  y = (q_x * s_x) @ (q_w * s_w)^T + b, accumulated in float32, written in bf16.

The fixed rule of which layers run in FP8 (see `Fp8Recipe` and `model/fast_forward.py`):
  - FP8: each block's attention qkv and proj, and the MLP's fc2: 8 of the 12 D^2 per token of a block.
  - fc1 stays bf16 with its GELU as the matmul's epilogue (cuBLASLt GELU_BIAS): `_scaled_mm` has no GELU
    epilogue, so an FP8 fc1 writes its bf16 output and the GELU runs in fc2's input quantisation (one
    pass either way). `Fp8Recipe(fc1=True)` switches it; it becomes the default only once the GPU
    benchmark (`bench/gpu_bench.py`) measures it faster.
  - bf16 always: the adaLN modulation (its shifts, scales and gates multiply every activation of the
    block, and it is one small matmul per sample, not per token), the final layer (its output is the
    noise prediction itself, so its error reaches the sample unfiltered) and the embedders (patch,
    timestep, class: tiny, and at the input).

Backends: "scaled_mm" is `torch._scaled_mm` (row-wise scaled, bias in its epilogue), chosen on CUDA
with compute capability >= 8.9; "emulate" casts to torch.float8_e4m3fn and back and multiplies in
float32: the same rounding, at float32 speed. It runs on the CPU (the tests, `bench/fp8_error.py`);
on older GPUs the fast path stays bf16 instead (an emulation would be slower than bf16 there).

The activation quantisation on CUDA is one Triton kernel per matmul (one pass: read bf16, write fp8
and the row's scale), optionally applying fc1's tanh-GELU on the way; `quantize_rows_reference` is its
PyTorch reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .fused_adaln import HAVE_TRITON, triton_usable

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
MIN_AMAX = 1e-12  # an all-zero row gets this amax: its scale stays finite and its values quantise to 0
FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class Fp8Recipe:
    """Which activations scale how, and whether fc1 joins FP8 (see the module docstring)."""

    activation: Literal["row", "tensor"] = "row"
    fc1: bool = False

    def __post_init__(self):
        if self.activation not in ("row", "tensor"):
            raise ValueError(f"activation scaling must be 'row' or 'tensor', got {self.activation!r}")


def fp8_matmul_supported(device: torch.device | str) -> bool:
    """Whether `torch._scaled_mm` runs FP8 on this device: CUDA with compute capability >= 8.9."""
    device = torch.device(device)
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


# ---- quantisation: reference ----------------------------------------------------------------------
def quantize_rows_reference(x: torch.Tensor, *, per_tensor: bool = False, gelu: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> q (M, K) float8_e4m3fn and scale (M, 1) float32, with x ~= q * scale.

    One scale per row (amax of the row / 448), or with `per_tensor` the tensor's (repeated per row, the
    layout the row-wise matmul takes). `gelu` quantises tanh-GELU(x) instead of x.
    """
    x = x.float()
    if gelu:
        x = F.gelu(x, approximate="tanh")
    amax = x.abs().amax(dim=1, keepdim=True)  # (M, 1); NaN in a row stays NaN, and so does its output
    if per_tensor:
        amax = amax.amax().expand_as(amax)
    scale = (amax.clamp(min=MIN_AMAX) / E4M3_MAX).contiguous()
    q = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)  # the cast rounds to nearest-even
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q (M, K) float8, scale (M, 1) or (1, K) -> float32 values."""
    return q.float() * scale


# ---- quantisation: Triton kernel ------------------------------------------------------------------
if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _round_to_e4m3(v):
        """v (float32, |v| <= 448) rounded to nearest-even e4m3, still float32 but exactly representable.

        Rounding here rather than in the float8 cast makes the kernel's result bit-exact with torch's
        cast wherever it runs (Triton's interpreter mis-rounds when a carry reaches the exponent); the
        cast of an exact value is then exact. Normal values keep 3 mantissa bits (integer rounding of
        the float32 bits); below 2^-6 e4m3 is subnormal, multiples of 2^-9 (float32 addition rounds
        to those at magnitude 2^14).
        """
        a = tl.abs(v)
        bits = a.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # keep the top 3 of 23 mantissa bits
        normal = bits.to(tl.float32, bitcast=True)
        subnormal = (a + 16384.0) - 16384.0
        r = tl.where(a < 0.015625, subnormal, normal)
        return tl.where(v < 0, -r, r)

    @triton.jit
    def _gelu_tanh(x):
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi) * (x + 0.044715 x^3)
        u = tl.minimum(u, 20.0)  # tanh(20) is 1 in float32; e^2u must not overflow
        return 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))  # 1 + tanh(u) = 2 - 2 / (e^2u + 1)

    @triton.jit
    def _quantize_rows_kernel(X, Q, SCALE, K, TENSOR_SCALE, PER_TENSOR: tl.constexpr, GELU: tl.constexpr,
                              STORE_Q: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0)  # one row of K values
        cols = tl.arange(0, BLOCK_K)
        mask = cols < K
        x = tl.load(X + row * K + cols, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            x = _gelu_tanh(x)
        if PER_TENSOR:
            scale = tl.load(TENSOR_SCALE)
        else:
            amax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=0)
            scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)  # MIN_AMAX, E4M3_MAX; IEEE division as torch
        tl.store(SCALE + row, scale)
        if STORE_Q:
            v = tl.math.div_rn(x, scale)  # clamped to +-448, keeping NaN (a NaN input must reach the output)
            v = tl.minimum(tl.maximum(v, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                           propagate_nan=tl.PropagateNan.ALL)
            bits = _round_to_e4m3(v).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
            bits = tl.where(v != v, 0x7F, bits)  # e4m3's NaN, written as bits (the interpreter's cast loses it)
            tl.store(Q + row * K + cols, bits, mask=mask)  # Q: the fp8 output viewed as uint8


def quantize_rows(x: torch.Tensor, *, per_tensor: bool = False, gelu: bool = False, use_triton: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows_reference` in one Triton pass over x (two with `per_tensor`: scales, then values)."""
    if not (use_triton and triton_usable(x)):
        return quantize_rows_reference(x, per_tensor=per_tensor, gelu=gelu)
    m, k = x.shape
    x = x.contiguous()
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    warps = 4 if block <= 1024 else 8
    q_bits = q.view(torch.uint8)
    if per_tensor:  # the row scales first, then their maximum is every row's scale
        _quantize_rows_kernel[(m,)](x, q_bits, scale, k, scale, PER_TENSOR=False, GELU=gelu, STORE_Q=False,
                                    BLOCK_K=block, num_warps=warps)
        tensor_scale = scale.amax().reshape(1)
        _quantize_rows_kernel[(m,)](x, q_bits, scale, k, tensor_scale, PER_TENSOR=True, GELU=gelu, STORE_Q=True,
                                    BLOCK_K=block, num_warps=warps)
    else:
        _quantize_rows_kernel[(m,)](x, q_bits, scale, k, scale, PER_TENSOR=False, GELU=gelu, STORE_Q=True,
                                    BLOCK_K=block, num_warps=warps)
    return q, scale


# ---- the layer ------------------------------------------------------------------------------------
class Fp8Linear(nn.Module):
    """An nn.Linear in FP8: forward(x (..., in), gelu=False) -> (..., out) in x's dtype.

    Built from a float linear (which it leaves untouched). `gelu=True` computes fc2(GELU(x)) with the
    GELU fused into the input quantisation: how an FP8 fc1's output reaches fc2.
    """

    def __init__(self, linear: nn.Linear, *, backend: Literal["scaled_mm", "emulate"], per_tensor: bool = False,
                 use_triton: bool = True):
        super().__init__()
        if backend not in ("scaled_mm", "emulate"):
            raise ValueError(f"backend must be 'scaled_mm' or 'emulate', got {backend!r}")
        out_features, in_features = linear.weight.shape
        if backend == "scaled_mm" and (in_features % 16 or out_features % 16):
            raise ValueError(f"FP8 matmuls need both dimensions divisible by 16, got {tuple(linear.weight.shape)}; "
                             "run this model with FP8 off")
        self.backend, self.per_tensor, self.use_triton = backend, per_tensor, use_triton
        w = linear.weight.detach()
        q, s = quantize_rows_reference(w)  # per output channel: (out, in) fp8, (out, 1)
        self.register_buffer("weight", q, persistent=False)
        self.register_buffer("weight_scale", s.view(1, out_features), persistent=False)  # (1, out) float32
        bias = None if linear.bias is None else linear.bias.detach()
        if backend == "emulate":  # the weights as the FP8 matmul sees them, cast back once
            self.register_buffer("weight_dq", dequantize(q, s), persistent=False)
            self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)
        else:  # _scaled_mm's row-wise kernel writes bf16 and takes a bf16 bias
            self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16), persistent=False)

    def forward(self, x: torch.Tensor, *, gelu: bool = False) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)  # (M, in)
        if self.backend == "emulate":
            q, s = quantize_rows_reference(x2, per_tensor=self.per_tensor, gelu=gelu)
            x_dq = dequantize(q, s)
            y = F.linear(x_dq, self.weight_dq, self.bias)  # float32 (M, out)
        else:
            q, s = quantize_rows(x2, per_tensor=self.per_tensor, gelu=gelu, use_triton=self.use_triton)
            y = torch._scaled_mm(q, self.weight.t(), scale_a=s, scale_b=self.weight_scale, bias=self.bias,
                                 out_dtype=torch.bfloat16)  # weight.t(): column-major (in, out), as required
        return y.to(x.dtype).view(*lead, -1)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return (f"in_features={in_features}, out_features={out_features}, backend={self.backend}, "
                f"activation={'tensor' if self.per_tensor else 'row'}")
