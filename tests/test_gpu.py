"""GPU checks of the fast path (marked gpu; skipped without CUDA). Run by bench/gpu_check.sh."""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURES, rel_err

from model import Pipeline, load_dit, preset, sample
from model.cuda_graphs import GraphedForward
from model.fast_forward import FastDiT
from model.fused_adaln import ln_modulate, ln_modulate_reference, residual_ln_modulate, residual_ln_modulate_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("d", [1152, 768, 384])
def test_kernels_on_gpu(dtype, tol, d):
    g = torch.Generator(device="cuda").manual_seed(d)
    x = torch.randn(4, 256, d, device="cuda", generator=g).to(dtype)
    y = torch.randn(4, 256, d, device="cuda", generator=g).to(dtype)
    shift, scale, gate, *_ = torch.randn(4, 6 * d, device="cuda", generator=g).to(dtype).chunk(6, dim=1)
    up = [v.float() for v in (x, y, gate, shift, scale)]
    assert rel_err(ln_modulate(x, shift, scale).float(), ln_modulate_reference(up[0], up[3], up[4])) <= tol
    x2, h = residual_ln_modulate(x, y, gate, shift, scale)
    rx, rh = residual_ln_modulate_reference(*up)
    assert rel_err(x2.float(), rx) <= tol and rel_err(h.float(), rh) <= tol


def random_dit(arch: str, size: int, dtype):
    from model import DiT

    torch.manual_seed(0)
    dit = DiT(preset(arch, input_size=size))
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.02)
    return dit.cuda().cast(dtype).eval().requires_grad_(False)


def test_fast_dit_and_graphs_match_reference_on_gpu():
    ref = random_dit("DiT-S/2", 32, torch.float32)
    fast = FastDiT(random_dit("DiT-S/2", 32, torch.float32))
    assert fast.gelu_epilogue  # the fused GELU must be the tanh approximation the reference uses
    graphed = GraphedForward(fast, (4, 32, 32), null_class=1000, device="cuda", sizes=[4, 8])
    graphed.capture()
    x = torch.randn(3, 4, 32, 32, device="cuda")
    t, y = torch.tensor([0, 500, 999], device="cuda"), torch.tensor([1, 2, 1000], device="cuda")
    with torch.no_grad():
        expected = ref(x, t, y)
        assert rel_err(fast(x, t, y), expected) <= 1e-4
        assert rel_err(graphed(x, t, y), expected) <= 1e-4  # 3 rows run the size-4 graph, padded


def test_bf16_forward_close_to_fp32():
    x = torch.randn(4, 4, 32, 32, device="cuda")
    t, y = torch.randint(0, 1000, (4,), device="cuda"), torch.randint(0, 1000, (4,), device="cuda")
    with torch.no_grad():
        a = random_dit("DiT-B/2", 32, torch.float32)(x, t, y)
        b = FastDiT(random_dit("DiT-B/2", 32, torch.bfloat16))(x, t, y).float()
    assert ((a - b).norm() / a.norm()).item() < 2e-2


def test_fixture_parity_on_gpu(reference):
    dit = load_dit(FIXTURES / "tiny_dit.safetensors", device="cuda")
    key = "ddim_steps10_cfg4.0_ch3"
    out = sample(dit, reference[f"{key}_noise"].cuda(), reference[f"{key}_labels"], cfg_scale=4.0, steps=10,
                 sampler="ddim")
    assert rel_err(out.cpu(), reference[f"{key}_out"]) <= 1e-3


def test_seeded_images_alone_and_batched_on_gpu_fast_path():
    pipe = Pipeline.from_pretrained(FIXTURES / "tiny_dit_diffusers", device="cuda", dtype=torch.bfloat16)
    pipe.use_fast_path(fused_kernels=True, cuda_graphs=True, graph_sizes=[2, 8])
    alone = pipe.generate([5], [1234], sampler="ddim", steps=8, cfg_scale=4.0)[0]
    mixed = pipe.generate([5, 17, 400, 999], [1234, 1, 2, 3], sampler="ddim", steps=8, cfg_scale=4.0)[0]
    assert (alone.int() - mixed.int()).abs().max().item() <= 2


# ---- FP8 (model/fp8.py): the Triton quantisation kernel, torch._scaled_mm, FastDiT with graphs -------
def _fp8_gpu() -> bool:
    from model.fp8 import fp8_matmul_supported

    return fp8_matmul_supported("cuda")


needs_fp8 = pytest.mark.skipif(not (torch.cuda.is_available() and _fp8_gpu()),
                               reason="FP8 matmuls need compute capability >= 8.9")


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@needs_fp8  # Triton's float8e4nv needs compute capability >= 8.9 as well
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("gelu", [False, True])
def test_fp8_quantize_kernel_on_gpu(per_tensor, gelu):
    from test_fp8 import rounding_cases

    from model.fp8 import quantize_rows, quantize_rows_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, 4608, device="cuda", generator=g) * torch.logspace(-3, 3, 512, device="cuda").unsqueeze(1)
    x = torch.cat([x, rounding_cases(4608).cuda()]).bfloat16()  # ties, carries, subnormals
    q, scale = quantize_rows(x, per_tensor=per_tensor, gelu=gelu)
    q_ref, scale_ref = quantize_rows_reference(x, per_tensor=per_tensor, gelu=gelu)
    if not gelu:  # exact division and rounding: bit-exact with torch's cast
        assert torch.equal(scale, scale_ref) and torch.equal(q.float(), q_ref.float())
        return
    assert torch.allclose(scale, scale_ref, rtol=1e-5, atol=0)
    differ = q.float() != q_ref.float()  # the kernel's exp is approximate: a value may move by one step
    assert differ.float().mean().item() <= 1e-3
    assert torch.allclose(q.float()[differ], q_ref.float()[differ], rtol=0.13)


@needs_fp8
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("gelu", [False, True])
def test_fp8_scaled_mm_matches_emulation(per_tensor, gelu):
    from torch import nn

    from model.fp8 import Fp8Linear

    torch.manual_seed(0)
    linear = nn.Linear(1152, 4608, device="cuda").to(torch.bfloat16)
    x = torch.randn(300, 1152, device="cuda").bfloat16()
    out = Fp8Linear(linear, backend="scaled_mm", per_tensor=per_tensor)(x, gelu=gelu)
    ref = Fp8Linear(linear, backend="emulate", per_tensor=per_tensor)(x, gelu=gelu)
    assert out.dtype == torch.bfloat16 and rel_l2(out, ref) < 4e-3  # bf16 output rounding, summation order


@needs_fp8
def test_fp8_fast_dit_and_graphs_on_gpu():
    from model.fp8 import Fp8Recipe

    x = torch.randn(4, 4, 32, 32, device="cuda")
    t, y = torch.tensor([0, 300, 700, 999], device="cuda"), torch.tensor([1, 2, 3, 1000], device="cuda")
    with torch.no_grad():
        ref = random_dit("DiT-S/2", 32, torch.float32)(x, t, y)
        bf16 = rel_l2(FastDiT(random_dit("DiT-S/2", 32, torch.bfloat16))(x, t, y), ref)
        for recipe in (Fp8Recipe(), Fp8Recipe(activation="tensor"), Fp8Recipe(fc1=True)):
            fast = FastDiT(random_dit("DiT-S/2", 32, torch.bfloat16), fp8=recipe)
            emulated = FastDiT(random_dit("DiT-S/2", 32, torch.bfloat16), fp8=recipe, fp8_backend="emulate")
            assert fast.fp8_backend == "scaled_mm"
            out = fast(x, t, y)
            assert rel_l2(out, emulated(x, t, y)) < 1e-2, recipe
            assert rel_l2(out, ref) <= 2 * bf16, (recipe, rel_l2(out, ref), bf16)  # the target
        graphed = GraphedForward(fast, (4, 32, 32), null_class=1000, device="cuda", sizes=[8])
        graphed.capture()
        assert rel_l2(graphed(x, t, y), fast(x, t, y)) < 1e-3  # 4 rows in the 8-row graph, padded


@needs_fp8
def test_fp8_seeded_images_alone_and_batched_on_gpu():
    pipe = Pipeline.from_pretrained(FIXTURES / "tiny_dit_diffusers", device="cuda", dtype=torch.bfloat16)
    pipe.use_fast_path(fused_kernels=True, cuda_graphs=True, graph_sizes=[2, 8], fp8=True)
    assert pipe.denoiser.forward.forward.fp8_backend == "scaled_mm"
    alone = pipe.generate([5], [1234], sampler="ddim", steps=8, cfg_scale=4.0)[0]
    mixed = pipe.generate([5, 17, 400, 999], [1234, 1, 2, 3], sampler="ddim", steps=8, cfg_scale=4.0)[0]
    assert (alone.int() - mixed.int()).abs().max().item() <= 2  # per-row scales: rows stay independent


@pytest.mark.skipif(not torch.cuda.is_available() or _fp8_gpu(), reason="for GPUs without FP8 matmuls")
def test_fp8_stays_bf16_on_older_gpus():
    from model.fp8 import Fp8Recipe

    assert FastDiT(random_dit("DiT-S/2", 32, torch.bfloat16), fp8=Fp8Recipe()).fp8_backend is None
