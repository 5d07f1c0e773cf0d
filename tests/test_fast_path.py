"""The fast path against its references: fused adaLN kernels (Triton, interpreted on the CPU) and FastDiT."""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURES, rel_err, require_installed

from model import load_dit
from model.fast_forward import FastDiT
from model.fused_adaln import (
    HAVE_TRITON,
    ln_modulate,
    ln_modulate_reference,
    residual_ln_modulate,
    residual_ln_modulate_reference,
    triton_usable,
)


@pytest.fixture(autouse=True)
def need_triton():
    require_installed(HAVE_TRITON, "triton", "pip install triton (the project depends on it on Linux)")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs interpreted on the CPU


def modulation(n: int, d: int, dtype, generator) -> list[torch.Tensor]:
    """(N, D) chunks of one (N, 6D) adaLN output, as the model passes them (row stride 6D)."""
    return list(torch.randn(n, 6 * d, generator=generator).to(DEVICE, dtype).chunk(6, dim=1))


@pytest.mark.parametrize("d", [64, 72 * 2, 100])  # powers of two and not, as head dims 64 and 72 give
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_references(d, dtype):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(3, 5, d, generator=g).to(DEVICE, dtype)
    y = torch.randn(3, 5, d, generator=g).to(DEVICE, dtype)
    shift, scale, gate, *_ = modulation(3, d, dtype, g)
    assert triton_usable(x), "without CUDA the tests run Triton interpreted (conftest sets TRITON_INTERPRET=1)"
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the reference rounds between ops, we do not
    up = [t.float() for t in (x, y, gate, shift, scale)]
    out = ln_modulate(x, shift, scale)
    assert out.dtype == dtype and rel_err(out.float(), ln_modulate_reference(up[0], up[3], up[4])) <= tol
    x2, h = residual_ln_modulate(x, y, gate, shift, scale)
    rx, rh = residual_ln_modulate_reference(*up)
    assert rel_err(x2.float(), rx) <= tol and rel_err(h.float(), rh) <= tol


def test_switch_off_uses_reference():
    x = torch.randn(2, 3, 16)
    shift, scale = torch.randn(2, 16), torch.randn(2, 16)
    assert torch.equal(ln_modulate(x, shift, scale, use_triton=False), ln_modulate_reference(x, shift, scale))


@pytest.mark.parametrize("fused", [True, False])
def test_fast_dit_matches_reference_forward(reference, fused):
    dit = load_dit(FIXTURES / "tiny_dit.safetensors")
    fast = FastDiT(load_dit(FIXTURES / "tiny_dit.safetensors"), fused=fused)
    args = reference["fwd_x"], reference["fwd_t"], reference["fwd_y"]
    with torch.no_grad():
        assert rel_err(fast(*args), reference["fwd_out"]) <= 1e-4
        assert rel_err(fast.dit(*args), dit(*args)) == 0  # the rebound adaLN views leave the model intact
