"""GPU benchmark of the fast path, in one run on one GPU, with random weights.

    python bench/gpu_bench.py [--arch DiT-XL/2] [--server]

Prints: the measured bf16 matmul peak; per-forward latency at 256 px (2/16/64 rows) and 512 px (2/16
rows) for the reference path (eager bf16), FastDiT (fused kernels) and FastDiT + CUDA graphs; images/s
of 50-step DDIM, cfg 4, batch 32 at 256 px through our pipeline and through diffusers' DiTPipeline
(fp16, SDPA), with the ratio and the model FLOP utilisation; the bf16-vs-fp32 error of one forward;
and with --server, a lone request's latency through the running server and its time outside the
model at saturation. 250-step and 512 px throughput follow from the per-forward figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from model import DiT, Pipeline, preset
from model.decoders import VAEDecoder
from model.diffusers_layout import to_diffusers
from model.pipeline import Defaults, ModelInfo

ROOT = Path(__file__).resolve().parent.parent
GFLOPS = {256: 237.0, 512: 1049.0}  # the paper's DiT-XL/2 cost per image-forward


def cuda_time(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn() timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    return statistics.median(times)


def matmul_peak() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / cuda_time(lambda: a @ b) / 1e12


def random_dit(arch: str, image_size: int, dtype=torch.bfloat16) -> DiT:
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise on the GPU: seconds instead of a minute for XL on the CPU
        dit = DiT(preset(arch, input_size=image_size // 8))
    with torch.no_grad():
        for p in dit.parameters():  # no zero-initialised layer, so outputs are informative
            p.normal_(0, 0.02)
    return dit.cuda().cast(dtype).eval().requires_grad_(False)


def sd_vae(dtype):
    from diffusers import AutoencoderKL  # the SD VAE's architecture (sd-vae-ft-ema), random weights

    with torch.device("cuda"):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256)
    return vae.to("cuda", dtype).eval().requires_grad_(False)


def forward_latencies(arch: str, rows_by_size: dict[int, list[int]]) -> list[dict]:
    from model.cuda_graphs import GraphedForward
    from model.fast_forward import FastDiT

    out = []
    for size, rows_list in rows_by_size.items():
        dit = random_dit(arch, size)
        ref = random_dit(arch, size)
        fast = FastDiT(dit)
        shape = (4, size // 8, size // 8)
        for n in rows_list:
            x = torch.randn(n, *shape, device="cuda")
            t = torch.randint(0, 1000, (n,), device="cuda")
            y = torch.randint(0, 1000, (n,), device="cuda")
            graphed = GraphedForward(fast, shape, null_class=1000, device="cuda", sizes=[n])
            graphed.capture()
            with torch.no_grad():
                times = {name: cuda_time(lambda f=f, x=x, t=t, y=y: f(x, t, y)) for name, f in
                         (("reference", ref), ("fused", fast), ("fused+graphs", graphed))}
            tflops = n * GFLOPS[size] / 1e3 / times["fused+graphs"]
            out.append({"size": size, "rows": n, **{k: v * 1000 for k, v in times.items()}, "tflops": tflops})
            del graphed
        del dit, ref, fast
        torch.cuda.empty_cache()
    return out


def pipeline_throughput(arch: str, batch: int, steps: int, cfg: float) -> dict:
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    dit = random_dit(arch, 256)
    vae = sd_vae(torch.float32)
    info = ModelInfo(name=arch, space="latent", image_size=256, channels=4, defaults=Defaults("ddim", steps, cfg))
    ours = Pipeline(dit, VAEDecoder(vae), info)
    capture = ours.use_fast_path(fused_kernels=True, cuda_graphs=True, graph_sizes=[2 * batch])
    labels, seeds = list(range(batch)), list(range(batch))
    ours.generate(labels, seeds, sampler="ddim", steps=5, cfg_scale=cfg)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ours.generate(labels, seeds, sampler="ddim", steps=steps, cfg_scale=cfg)
    ours_s = time.perf_counter() - t0

    c = dit.config
    with torch.device("cuda"):
        theirs_dit = DiTTransformer2DModel(num_attention_heads=c.num_heads, attention_head_dim=c.head_dim,
                                           in_channels=4, out_channels=8, num_layers=c.depth, sample_size=c.input_size,
                                           patch_size=c.patch_size, num_embeds_ada_norm=1000)
    theirs_dit.load_state_dict(to_diffusers({k: v.float() for k, v in dit.state_dict().items()}, c.depth))
    del ours, dit
    torch.cuda.empty_cache()
    sched = DDIMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    pipe = DiTPipeline(transformer=theirs_dit.to("cuda", torch.float16), vae=sd_vae(torch.float16), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    pipe(labels, guidance_scale=cfg, num_inference_steps=5, output_type="np")  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pipe(labels, guidance_scale=cfg, num_inference_steps=steps, output_type="np")
    theirs_s = time.perf_counter() - t0
    del pipe
    torch.cuda.empty_cache()
    return {"ours_img_s": batch / ours_s, "diffusers_img_s": batch / theirs_s, "capture_s": capture}


def precision_error(arch: str) -> float:
    dit32 = random_dit(arch, 256, torch.float32)
    dit16 = random_dit(arch, 256, torch.bfloat16)
    x = torch.randn(8, 4, 32, 32, device="cuda")
    t, y = torch.randint(0, 1000, (8,), device="cuda"), torch.randint(0, 1000, (8,), device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        a, b = dit32(x, t, y), dit16(x, t, y).float()
    return ((a - b).norm() / a.norm()).item()


def server_figures(arch: str, clients: int, seconds: float) -> dict:
    import asyncio

    import httpx
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests"))
    from server_harness import free_port, wait_until

    tmp = Path(tempfile.mkdtemp())
    dit = random_dit(arch, 256)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(tmp / "dit.safetensors"))
    sd_vae(torch.float32).save_pretrained(tmp / "vae")
    del dit
    torch.cuda.empty_cache()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(tmp / "dit.safetensors"), "--vae",
                             str(tmp / "vae"), "--arch", arch, "--port", str(port), "--max-batch-rows", "64",
                             "--log-level", "warning"], cwd=ROOT)
    body = {"class_id": 1, "steps": 50, "sampler": "ddim", "cfg_scale": 4.0}

    def ready():
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            return httpx.get(url + "/readyz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        t0 = time.monotonic()
        wait_until(ready, 300, "the server")
        start_s = time.monotonic() - t0
        lone = []
        for k in range(6):
            t0 = time.perf_counter()
            assert httpx.post(url + "/generate", json=dict(body, seed=k), timeout=60).status_code == 200
            lone.append(time.perf_counter() - t0)

        def scrape():
            vals = {}
            for line in httpx.get(url + "/metrics").text.splitlines():
                if line and line[0] != "#" and "{" not in line:
                    k, v = line.rsplit(" ", 1)
                    vals[k] = float(v)
            return vals

        async def load():
            end, count = time.monotonic() + seconds, [0]

            async def one(k):
                async with httpx.AsyncClient(base_url=url, timeout=120) as c:
                    while time.monotonic() < end:
                        if (await c.post("/generate", json=dict(body, seed=k))).status_code == 200:
                            count[0] += 1
            await asyncio.gather(*(one(k) for k in range(clients)))
            return count[0]

        asyncio.run(load())  # warm
        before, t0 = scrape(), time.monotonic()
        images = asyncio.run(load())
        wall, after = time.monotonic() - t0, scrape()
        model_s = sum(after[k] - before.get(k, 0) for k in ("dit_step_duration_seconds_sum",
                                                            "dit_decode_duration_seconds_sum"))
        return {"startup_s": start_s, "lone_ms": statistics.median(lone[1:]) * 1000, "server_img_s": images / wall,
                "outside_model": 1 - model_s / wall}
    finally:
        proc.terminate()
        proc.wait(60)


def profile_step(arch: str, batches: list[int], top: int = 12) -> None:
    """torch.profiler table of the top GPU kernels for one denoising step (guided) of the fast path."""
    from torch.profiler import ProfilerActivity, profile

    dit = random_dit(arch, 256)
    info = ModelInfo(name=arch, space="latent", image_size=256, channels=4)
    pipe = Pipeline(dit, None, info)
    pipe.use_fast_path(fused_kernels=True, cuda_graphs=False)
    for n in batches:
        states = [pipe.new_state(k % 1000, k, sampler="ddim", steps=50, cfg_scale=4.0) for k in range(n)]
        for _ in range(3):
            pipe.denoiser.step(states)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            pipe.denoiser.step(states)
            torch.cuda.synchronize()
        print(f"\nprofile: one guided DDIM step, batch {n} ({2 * n} rows), fused kernels, eager")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60))
    del pipe, dit
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="DiT-XL/2")
    p.add_argument("--server", action="store_true", help="also measure through the running server")
    p.add_argument("--clients", type=int, default=64, help="more than the 32 guided samples a 64-row batch "
                   "holds, so that requests wait and the server is saturated")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--profile", action="store_true", help="also profile one denoising step at batch 32 and 2")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, {args.arch}, random weights")
    results: dict = {"gpu": props.name, "torch": torch.__version__, "arch": args.arch}
    peak = results["matmul_tflops"] = matmul_peak()
    print(f"bf16 matmul 8192^3: {peak:.0f} TFLOP/s")

    def section(name, fn):  # one failing section must not cost the others (device time is scarce)
        try:
            fn()
        except Exception:
            print(f"\n[{name} failed]\n{traceback.format_exc()}", flush=True)

    def forward():
        results["forward"] = forward_latencies(args.arch, {256: [2, 16, 64], 512: [2, 16]})
        print(f"\n{'px':>4} {'rows':>4} {'reference ms':>12} {'fused ms':>9} {'+graphs ms':>10} {'speed-up':>8} "
              f"{'TFLOP/s':>8}")
        for r in results["forward"]:
            print(f"{r['size']:>4} {r['rows']:>4} {r['reference']:>12.2f} {r['fused']:>9.2f} "
                  f"{r['fused+graphs']:>10.2f} {r['reference'] / r['fused+graphs']:>7.2f}x {r['tflops']:>8.0f}")

    def throughput():
        tp = results["throughput"] = pipeline_throughput(args.arch, batch=32, steps=50, cfg=4.0)
        mfu = tp["ours_img_s"] * 50 * 2 * GFLOPS[256] / 1e3 / peak
        print(f"\n50-step DDIM, cfg 4, batch 32, 256 px: ours {tp['ours_img_s']:.1f} img/s, diffusers DiTPipeline "
              f"fp16 {tp['diffusers_img_s']:.1f} img/s, ratio {tp['ours_img_s'] / tp['diffusers_img_s']:.2f}x, "
              f"MFU {mfu:.0%} of the measured peak (graph capture {tp['capture_s']:.1f} s)", flush=True)

    def precision():
        results["bf16_rel_error"] = precision_error(args.arch)
        print(f"bf16 vs fp32 forward, relative L2 error: {results['bf16_rel_error']:.2e}", flush=True)

    def server():
        s = results["server"] = server_figures(args.arch, args.clients, args.seconds)
        print(f"server: ready in {s['startup_s']:.0f} s; lone request (256 px, 50-step DDIM, cfg 4) "
              f"{s['lone_ms']:.0f} ms; {args.clients} clients: {s['server_img_s']:.1f} img/s, time outside the "
              f"model {s['outside_model']:.1%}", flush=True)

    section("forward latency", forward)
    section("pipeline throughput", throughput)
    section("precision", precision)
    if args.profile:
        section("profile", lambda: profile_step(args.arch, [32, 2]))
    if args.server:
        section("server", server)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_bench.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
