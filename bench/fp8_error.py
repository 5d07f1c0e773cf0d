"""FP8's error, measured on the CPU through the emulation of model/fp8.py (same rounding as the GPU path).

    python bench/fp8_error.py [--per-class 100] [--xl-images 2] [--skip-xl] [--skip-embedded]

1. DiT-XL/2 shapes, random weights (N(0, 0.02), as bench/gpu_bench.py): for each layer type (qkv, proj,
   fc1, fc2), the relative L2 error against float32 of bf16 and of FP8 with per-row and per-tensor
   activation scales, each layer fed the activations a float32 block gives it (GELU outputs for fc2,
   attention outputs for proj); then the whole DiT-XL/2 forward at 256 px: bf16, and FP8 in a bf16
   model (as a GPU runs it), against float32.
2. The embedded Fashion-MNIST model with its declared defaults (sampler, steps, guidance), the same
   seeds through float32 and through each FP8 variant: the share of images the independent classifier
   labels as the requested class, the share labelled as the float32 image of the same seed is, the
   feature-FID against the test split and against the float32 images, and the mean pixel difference.

No GPU needed; XL's float32 forward takes a few seconds per image on 2 cores (bf16 is slower on CPUs).
"""

from __future__ import annotations

import argparse
import copy
import gc
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from quality import feature_fid, to_model_input  # bench/quality.py: the feature-FID and the judge's input

from model import DiT, Pipeline, preset
from model.dit import DiTBlock, modulate
from model.fast_forward import FastDiT
from model.fp8 import Fp8Linear, Fp8Recipe
from training.classifier import load_classifier
from training.data import DEFAULT_DIR, load_split

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"fp8 row": Fp8Recipe(), "fp8 tensor": Fp8Recipe(activation="tensor"), "fp8 row + fc1": Fp8Recipe(fc1=True)}


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def random_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # no zero-initialised layer, so every layer matters
            p.normal_(0, 0.02)
    return module.eval().requires_grad_(False)


@torch.no_grad()
def layer_errors(rows: int) -> list[dict]:
    """Per layer type of one DiT-XL/2 block, the relative error of bf16 and FP8 outputs vs float32."""
    cfg = preset("DiT-XL/2", input_size=32)
    d = cfg.hidden_size
    block = random_(DiTBlock(d, cfg.num_heads, cfg.mlp_ratio))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, rows, d, generator=g)  # the residual stream, (1, T, D)
    c = torch.randn(1, d, generator=g)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, _ = block.adaLN_modulation(c).chunk(6, dim=1)
    h1 = modulate(block.norm1(x), shift_msa, scale_msa)  # qkv's input
    n, t, _ = h1.shape
    qkv = block.attn.qkv(h1).view(n, t, 3, cfg.num_heads, d // cfg.num_heads).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(*qkv.unbind(0)).transpose(1, 2).reshape(n, t, d)  # proj's input
    x2 = x + gate_msa.unsqueeze(1) * block.attn.proj(o)
    h2 = modulate(block.norm2(x2), shift_mlp, scale_mlp)  # fc1's input
    a = F.gelu(block.mlp.fc1(h2), approximate="tanh")  # fc2's input
    out = []
    for name, layer, inp in (("qkv", block.attn.qkv, h1), ("proj", block.attn.proj, o), ("fc1", block.mlp.fc1, h2),
                             ("fc2", block.mlp.fc2, a)):
        ref = layer(inp)
        layer16 = copy.deepcopy(layer).to(torch.bfloat16)  # the GPU path's weights and activations
        inp16 = inp.to(torch.bfloat16)
        row = {"layer": name, "shape": f"{inp.shape[-1]}->{ref.shape[-1]}", "bf16": rel_l2(layer16(inp16), ref)}
        for label, per_tensor in (("fp8 row", False), ("fp8 tensor", True)):
            row[label] = rel_l2(Fp8Linear(layer16, backend="emulate", per_tensor=per_tensor)(inp16), ref)
        out.append(row)
    return out


@torch.no_grad()
def model_errors(images: int) -> dict[str, float]:
    """Whole DiT-XL/2 forward at 256 px (random weights): bf16 and FP8-in-bf16 vs float32."""
    dit = random_(DiT(preset("DiT-XL/2", input_size=32)))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(images, 4, 32, 32, generator=g)
    t = torch.linspace(50, 950, images).long()
    y = torch.randint(0, 1000, (images,), generator=g)
    t0 = time.monotonic()
    ref = dit(x, t, y)
    print(f"  float32 forward of {images} images: {time.monotonic() - t0:.0f} s", flush=True)
    dit16 = copy.deepcopy(dit).cast(torch.bfloat16)
    del dit
    gc.collect()
    errors = {"bf16": rel_l2(FastDiT(dit16, fused=False)(x, t, y), ref)}
    for label, recipe in RECIPES.items():
        fast = FastDiT(dit16, fused=False, fp8=recipe)
        errors[label] = rel_l2(fast(x, t, y), ref)
        print(f"  {label}: {errors[label]:.2e}", flush=True)
        del fast
        gc.collect()
    return errors


@torch.no_grad()
def embedded_quality(model: str, per_class: int, data_dir: str, classifier: str, recipes: list[str]) -> list[dict]:
    judge = load_classifier(classifier)
    x_test, _ = load_split("test", data_dir)
    n = 10 * per_class
    test_feats = judge.features(x_test[torch.randperm(len(x_test), generator=torch.Generator().manual_seed(0))[:n]])
    labels, seeds = [c for c in range(10) for _ in range(per_class)], list(range(n))
    pipe = Pipeline.from_pretrained(model)  # float32 on the CPU, as the CPU server runs it
    d = pipe.info.defaults
    print(f"  {n} images, the model's defaults: {d}", flush=True)

    def generate():  # in batches of 200, as bench/quality.py does
        return torch.cat([pipe.generate(labels[i:i + 200], seeds[i:i + 200], sampler=d.sampler, steps=d.steps,
                                        cfg_scale=d.cfg_scale) for i in range(0, n, 200)])

    def judge_images(images):
        x = to_model_input(images)
        return judge(x).argmax(1), judge.features(x)

    t0 = time.monotonic()
    ref_images = generate()
    ref_pred, ref_feats = judge_images(ref_images)
    rows = [{"variant": "float32", "agree": (ref_pred == torch.tensor(labels)).float().mean().item(),
             "same_class": 1.0, "fid_test": feature_fid(ref_feats, test_feats), "fid_fp32": 0.0, "pixel": 0.0,
             "seconds": time.monotonic() - t0}]
    print(f"  float32: {rows[-1]}", flush=True)
    for label in recipes:
        recipe = RECIPES[label]
        t0 = time.monotonic()
        pipe.use_fast_path(fused_kernels=False, fp8=recipe)
        images = generate()
        pred, feats = judge_images(images)
        rows.append({"variant": label, "agree": (pred == torch.tensor(labels)).float().mean().item(),
                     "same_class": (pred == ref_pred).float().mean().item(),
                     "fid_test": feature_fid(feats, test_feats), "fid_fp32": feature_fid(feats, ref_feats),
                     "pixel": (images.float() - ref_images.float()).abs().mean().item(),
                     "seconds": time.monotonic() - t0})
        print(f"  {label}: {rows[-1]}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=512, help="tokens fed to each XL layer (2 images of 256)")
    p.add_argument("--xl-images", type=int, default=2, help="images in the whole-model XL forward")
    p.add_argument("--skip-xl", action="store_true", help="skip the whole-model DiT-XL/2 forward")
    p.add_argument("--skip-embedded", action="store_true")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES),
                   help="FP8 variants of the embedded-model run")
    p.add_argument("--model", default=str(ROOT / "weights/fashion_dit.safetensors"))
    p.add_argument("--classifier", default=str(ROOT / "weights/fashion_classifier.safetensors"))
    p.add_argument("--data-dir", default=str(DEFAULT_DIR))
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU emulation of FP8 (e4m3)")

    print("\nDiT-XL/2 layers, random weights, relative L2 error vs float32 (inputs from a float32 block):")
    rows = layer_errors(args.rows)
    print(f"{'layer':>5} {'shape':>10} {'bf16':>9} {'fp8 row':>9} {'fp8 tensor':>10} {'row/bf16':>8}")
    for r in rows:
        print(f"{r['layer']:>5} {r['shape']:>10} {r['bf16']:>9.2e} {r['fp8 row']:>9.2e} {r['fp8 tensor']:>10.2e} "
              f"{r['fp8 row'] / r['bf16']:>7.1f}x")

    if not args.skip_xl:
        print(f"\nDiT-XL/2 whole forward at 256 px, random weights, {args.xl_images} images:")
        errors = model_errors(args.xl_images)
        print("relative L2 error vs float32: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
              + f"; fp8 row / bf16 = {errors['fp8 row'] / errors['bf16']:.2f}x")

    if not args.skip_embedded:
        print("\nEmbedded Fashion-MNIST model (float32 model; the FP8 layers emulated):")
        rows = embedded_quality(args.model, args.per_class, args.data_dir, args.classifier, args.recipes)
        print(f"{'variant':>14} {'class agreement':>15} {'same class as fp32':>18} {'FID vs test':>11} "
              f"{'FID vs fp32':>11} {'mean |pixel diff|':>17} {'seconds':>7}")
        for r in rows:
            print(f"{r['variant']:>14} {r['agree']:>15.1%} {r['same_class']:>18.1%} {r['fid_test']:>11.2f} "
                  f"{r['fid_fp32']:>11.2f} {r['pixel']:>17.2f} {r['seconds']:>7.0f}")


if __name__ == "__main__":
    main()
