"""GPU benchmark of the fast path and its peers, in one run on one GPU, with random weights.

    python bench/gpu_bench.py [--arch DiT-XL/2] [--profile] [--forward --sizes 256,512] [--server] [--no-compile]
    python bench/gpu_bench.py --dry-run      # the whole script on the CPU at toy sizes (figures meaningless)

Sections in this order (the quick ones first, then the compile peer, whose compile time is the one
nobody can bound); each one's figures go to $OUT/gpu_bench.json as soon as it ends, and a section that
fails is reported while the next one runs (device time is scarce):
  peaks         bf16 matmul 8192^3; FP8 (e4m3) with per-tensor and per-row scales.
  throughput    images/s of 50-step DDIM, cfg 4, batch 32, 256 px, every peer on the same random weights:
                ours bf16, ours FP8 (row; tensor; row + fc1), all with fused kernels and CUDA graphs;
                diffusers' DiTPipeline eager, fp16 and bf16.
  precision     relative L2 error vs float32 of one forward (8 images): bf16 (reference and fast path)
                and each FP8 recipe.
  fp8 layers    each linear of a block at 64 rows of 256 tokens: bf16 (fc1 with its GELU epilogue)
                against FP8 (row and tensor activation scales, quantisation included), the quantisation
                alone, and the bare _scaled_mm (row-wise; tensor-wise; fast accumulation).
  profile       (--profile) the top GPU kernels of one guided denoising step at batch 32, bf16 and FP8.
  compile peer  diffusers' DiTPipeline bf16 with its transformer under torch.compile (default mode), same
                batch, steps and guidance; the compile time is reported and excluded from images/s.
  forward       (--forward) per-forward latency at --sizes px for 2/16/64 rows: reference eager, fused
                eager, fused + CUDA graphs, FP8 + CUDA graphs.
  server        (--server) a lone request's latency through the real server and its time outside the model.
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # Triton's interpreter runs the kernels on the CPU; set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model import DiT, DiTConfig, Join, Pipeline, preset  # noqa: E402
from model.cache import PRESETS as CACHE_PRESETS  # noqa: E402
from model.decoders import VAEDecoder  # noqa: E402
from model.denoise import rows_per_iteration  # noqa: E402
from model.diffusers_layout import to_diffusers  # noqa: E402
from model.fp8 import Fp8Linear, Fp8Recipe, fp8_matmul_supported, quantize_rows  # noqa: E402
from model.pipeline import Defaults, ModelInfo  # noqa: E402
from model.samplers import Sampling  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEV = "cuda"  # "cpu" in the dry run
REPS, WARMUP = 20, 3  # of `timed`; 2 and 1 in the dry run
FP8_RECIPES = {"fp8 row": Fp8Recipe(), "fp8 tensor": Fp8Recipe(activation="tensor"),
               "fp8 row + fc1": Fp8Recipe(fc1=True)}


def forward_gflops(cfg: DiTConfig) -> float:
    """FLOPs of one image-forward: per token and block 24 D^2 (qkv, proj, fc1, fc2) + 4 T D (attention).
    For DiT-XL/2 at 256 px this gives the paper's 237 GFLOPs."""
    t = (cfg.input_size // cfg.patch_size) ** 2
    d = cfg.hidden_size
    return t * cfg.depth * (24 * d * d + 4 * t * d) / 1e9


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int | None = None, warmup: int | None = None) -> float:
    """Median seconds of fn(): CUDA events on the GPU, the wall clock on the CPU."""
    reps, warmup = reps or REPS, WARMUP if warmup is None else warmup
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if DEV == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fp8_backend() -> str:
    """scaled_mm where it runs (CC >= 8.9; in the dry run, torch's CPU _scaled_mm if present), else the emulation."""
    if fp8_matmul_supported(DEV):
        return "scaled_mm"
    if DEV == "cpu":
        try:
            a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
            torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
            return "scaled_mm"
        except (RuntimeError, NotImplementedError, AttributeError):
            pass
    return "emulate"


def random_dit(cfg: DiTConfig, dtype=torch.bfloat16) -> DiT:
    torch.manual_seed(0)
    with torch.device(DEV):  # initialise on the GPU: seconds instead of a minute for XL on the CPU
        dit = DiT(cfg)
    with torch.no_grad():
        for p in dit.parameters():  # no zero-initialised layer, so outputs are informative
            p.normal_(0, 0.02)
    return dit.to(DEV).cast(dtype).eval().requires_grad_(False)


def sd_vae(dtype, image_size: int):
    from diffusers import AutoencoderKL  # the SD VAE's architecture (sd-vae-ft-ema), random weights

    with torch.device(DEV):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=image_size)
    return vae.to(DEV, dtype).eval().requires_grad_(False)


# ---- sections ------------------------------------------------------------------------------------
def peaks(n: int) -> dict:
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    out = {"bf16": 2 * n**3 / timed(lambda: a @ b) / 1e12}
    if fp8_backend() == "scaled_mm":
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.ones((), device=DEV)
        rows, cols = torch.ones(n, 1, device=DEV), torch.ones(1, n, device=DEV)
        out["fp8 tensor"] = 2 * n**3 / timed(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one,
                                                                       out_dtype=torch.bfloat16)) / 1e12
        out["fp8 row"] = 2 * n**3 / timed(lambda: torch._scaled_mm(a8, b8.t(), scale_a=rows, scale_b=cols,
                                                                    out_dtype=torch.bfloat16)) / 1e12
    return out


@torch.no_grad()
def fp8_layers(cfg: DiTConfig, rows: int) -> list[dict]:
    """Milliseconds per linear of one block at `rows` tokens, bf16 vs FP8 (see the module docstring)."""
    d = cfg.hidden_size
    return [_time_layer(name, k, n, rows) for name, k, n in
            (("qkv", d, 3 * d), ("proj", d, d), ("fc1", d, 4 * d), ("fc2", 4 * d, d))]


def _time_layer(name: str, k: int, n: int, rows: int) -> dict:
    from torch import nn

    backend = fp8_backend()
    torch.manual_seed(0)
    linear = nn.Linear(k, n, device=DEV).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(rows, k, device=DEV, dtype=torch.bfloat16)
    if name == "fc1" and DEV == "cuda":  # bf16 fc1 runs with its GELU epilogue
        bf16 = lambda: torch._addmm_activation(linear.bias, x, linear.weight.t(), use_gelu=True)
    else:
        bf16 = lambda: F.linear(x, linear.weight, linear.bias)
    row_layer = Fp8Linear(linear, backend=backend)
    tensor_layer = Fp8Linear(linear, backend=backend, per_tensor=True)
    times = {"bf16": timed(bf16), "fp8 row": timed(lambda: row_layer(x)), "fp8 tensor": timed(lambda: tensor_layer(x)),
             "quantize row": timed(lambda: quantize_rows(x)),
             "quantize tensor": timed(lambda: quantize_rows(x, per_tensor=True))}
    if name == "fc2":  # fc2 fed an FP8 fc1's raw output: the GELU fused into the quantisation
        times["fp8 row, GELU in quantize"] = timed(lambda: row_layer(x, gelu=True))
    if backend == "scaled_mm":  # the bare matmuls: row-wise (ours), tensor-wise scales, fast accumulation
        q, s = quantize_rows(x)
        one = torch.ones((), device=DEV)
        w, ws, b = row_layer.weight, row_layer.weight_scale, row_layer.bias
        mm = lambda scale_a, scale_b, fast=False: torch._scaled_mm(q, w.t(), scale_a=scale_a, scale_b=scale_b, bias=b,
                                                                    out_dtype=torch.bfloat16, use_fast_accum=fast)
        times["scaled_mm row"] = timed(lambda: mm(s, ws))
        times["scaled_mm tensor"] = timed(lambda: mm(one, one))
        times["scaled_mm row, fast accum"] = timed(lambda: mm(s, ws, True))
    flops = 2 * rows * k * n
    return {"layer": name, "shape": f"{rows}x{k}->{n}", **{key: v * 1000 for key, v in times.items()},
            "bf16_tflops": flops / times["bf16"] / 1e12, "fp8_row_tflops": flops / times["fp8 row"] / 1e12}


def _run_ours(pipe, labels, seeds, steps, cfg, reps) -> float:
    pipe.generate(labels, seeds, sampler="ddim", steps=min(5, steps), cfg_scale=cfg)  # warm-up
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        pipe.generate(labels, seeds, sampler="ddim", steps=steps, cfg_scale=cfg)
        sync()
        times.append(time.perf_counter() - t0)
    return len(labels) / statistics.median(times)


def _diffusers_pipe(dit: DiT, dtype, image_size: int):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    c = dit.config
    with torch.device(DEV):
        theirs = DiTTransformer2DModel(num_attention_heads=c.num_heads, attention_head_dim=c.head_dim, in_channels=4,
                                       out_channels=8, num_layers=c.depth, sample_size=c.input_size,
                                       patch_size=c.patch_size, num_embeds_ada_norm=c.num_classes)
    theirs.load_state_dict(to_diffusers({k: v.float() for k, v in dit.state_dict().items()}, c.depth))
    sched = DDIMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    pipe = DiTPipeline(transformer=theirs.to(DEV, dtype).eval(), vae=sd_vae(dtype, image_size), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_theirs(pipe, labels, steps, cfg, reps) -> float:
    generator = torch.Generator(DEV).manual_seed(0)
    pipe(labels, guidance_scale=cfg, num_inference_steps=min(5, steps), output_type="np", generator=generator)
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        pipe(labels, guidance_scale=cfg, num_inference_steps=steps, output_type="np", generator=generator)
        sync()
        times.append(time.perf_counter() - t0)
    return len(labels) / statistics.median(times)


def throughput(cfg: DiTConfig, image_size: int, batch: int, steps: int, guidance: float, reps: int,
               results: dict, save, *, compiled: bool = False) -> None:
    """images/s of the peers, all on the same random weights, batch, steps and guidance; results filled as
    they come. Our pipeline (bf16, each FP8 recipe) and diffusers' eager (fp16, bf16); or, with `compiled`,
    diffusers bf16 with its transformer under torch.compile (a section of its own: it takes the longest)."""
    dit = random_dit(cfg)
    tp = results.setdefault("throughput", {"batch": batch, "steps": steps, "cfg": guidance, "px": image_size})
    if compiled:
        peers = [("diffusers compiled bf16", torch.bfloat16, True)]
    else:
        _throughput_ours(dit, image_size, batch, steps, guidance, reps, tp, save)
        peers = [("diffusers eager fp16", torch.float16, False), ("diffusers eager bf16", torch.bfloat16, False)]
    labels = [k % cfg.num_classes for k in range(batch)]
    for name, dtype, compile_it in peers:
        pipe = _diffusers_pipe(dit, dtype, image_size)
        entry = {}
        if compile_it:  # default mode, as a user would write it; the first call compiles
            pipe.transformer = torch.compile(pipe.transformer)
            t0 = time.perf_counter()
            pipe(labels, guidance_scale=guidance, num_inference_steps=2, output_type="np")
            sync()
            entry["compile_s"] = time.perf_counter() - t0  # compile + 2 steps, excluded from images/s
            print(f"  (compiled in {entry['compile_s']:.0f} s, first 2 steps included)", flush=True)
        entry["img_s"] = _run_theirs(pipe, labels, steps, guidance, reps)
        tp[name] = entry
        print(f"  {name:<24} {entry['img_s']:7.2f} img/s", flush=True)
        del pipe
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()
        save()
    if compiled:
        torch._dynamo.reset()


def _throughput_ours(dit: DiT, image_size: int, batch: int, steps: int, guidance: float, reps: int, tp: dict,
                     save) -> None:
    graphs = DEV == "cuda"
    cfg = dit.config
    vae = sd_vae(torch.float32, image_size)
    info = ModelInfo(name="bench", space="latent", image_size=image_size, channels=4,
                     defaults=Defaults("ddim", steps, guidance))
    ours = Pipeline(dit, VAEDecoder(vae), info)
    labels, seeds = [k % cfg.num_classes for k in range(batch)], list(range(batch))
    for name, recipe in {"ours bf16": None, **{f"ours {k}": v for k, v in FP8_RECIPES.items()}}.items():
        capture = ours.use_fast_path(fused_kernels=True, cuda_graphs=graphs, graph_sizes=[2 * batch],
                                     fp8=recipe or False)
        tp[name] = {"img_s": _run_ours(ours, labels, seeds, steps, guidance, reps), "capture_s": capture}
        print(f"  {name:<24} {tp[name]['img_s']:7.2f} img/s  (graph capture {capture:.1f} s)", flush=True)
        ours.use_fast_path(fused_kernels=False, cuda_graphs=False)  # drops the graphs before the next capture
        gc.collect()
        save()
    del ours, vae
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


STEP_CACHES = ("off", "taylor2", "taylor3", "features3g2")  # model/cache.py presets (features3g2: the reference
# blocks at its computed steps, which hand out the final layer's input; the fused path has none)


def step_cache(cfg: DiTConfig, image_size: int, batch: int, steps: int, guidance: float, reps: int) -> dict:
    """images/s of our pipeline (bf16, fused kernels, CUDA graphs) with and without a step cache, in one run,
    the settings interleaved in each repetition; and each setting's forward rows per image (exact: the
    caches' schedules are fixed). Random weights: what a cache does to DiT-XL/2's FID is not measured."""
    dit = random_dit(cfg)
    info = ModelInfo(name="bench", space="latent", image_size=image_size, channels=4,
                     defaults=Defaults("ddim", steps, guidance))
    ours = Pipeline(dit, VAEDecoder(sd_vae(torch.float32, image_size)), info)
    ours.use_fast_path(fused_kernels=True, cuda_graphs=DEV == "cuda", graph_sizes=[2 * batch])
    labels, seeds = [k % cfg.num_classes for k in range(batch)], list(range(batch))
    times: dict[str, list[float]] = {c: [] for c in STEP_CACHES}
    for c in STEP_CACHES:  # warm-up of each path
        ours.generate(labels, seeds, sampler="ddim", steps=min(5, steps), cfg_scale=guidance, cache=c)
    for _ in range(reps):
        for c in STEP_CACHES:
            sync()
            t0 = time.perf_counter()
            ours.generate(labels, seeds, sampler="ddim", steps=steps, cfg_scale=guidance, cache=c)
            sync()
            times[c].append(time.perf_counter() - t0)
    out = {}
    for c in STEP_CACHES:
        rows = sum(rows_per_iteration("ddim", steps, guidance, (0.0, 1.0), CACHE_PRESETS[c]))
        out[c] = {"img_s": batch / statistics.median(times[c]), "rows_per_image": rows}
    for v in out.values():
        v["vs_off"] = v["img_s"] / out["off"]["img_s"]
    del ours
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return out


@torch.no_grad()
def precision(cfg: DiTConfig, images: int) -> dict:
    from model.fast_forward import FastDiT

    dit32 = random_dit(cfg, torch.float32)
    x = torch.randn(images, 4, cfg.input_size, cfg.input_size, device=DEV)
    t = torch.randint(0, 1000, (images,), device=DEV)
    y = torch.randint(0, cfg.num_classes, (images,), device=DEV)
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = dit32(x, t, y)
        del dit32
        rel = lambda out: ((out.float() - ref).norm() / ref.norm()).item()
        dit16 = random_dit(cfg, torch.bfloat16)
        errors = {"bf16 reference path": rel(dit16(x, t, y)), "bf16": rel(FastDiT(dit16)(x, t, y))}
        for name, recipe in FP8_RECIPES.items():
            errors[name] = rel(FastDiT(dit16, fp8=recipe)(x, t, y))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    return errors


def profile_step(cfg: DiTConfig, batch: int, top: int = 15) -> None:
    """torch.profiler table of the top kernels for one guided DDIM step, bf16 and FP8 (row), eager."""
    from torch.profiler import ProfilerActivity, profile

    dit = random_dit(cfg)
    info = ModelInfo(name="bench", space="latent", image_size=cfg.input_size * 8, channels=4)
    pipe = Pipeline(dit, None, info)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    for name, recipe in (("bf16", None), ("fp8 row", Fp8Recipe())):
        pipe.use_fast_path(fused_kernels=True, cuda_graphs=False, fp8=recipe or False)
        samples = pipe.new_batch(batch)  # the per-step API the server drives
        samples.join([Join(k, k % cfg.num_classes, k, Sampling("ddim", 50, 4.0)) for k in range(batch)])
        for _ in range(3):
            samples.step()
        sync()
        with profile(activities=activities) as prof:
            samples.step()
            sync()
        print(f"\nprofile: one guided DDIM step, batch {batch} ({2 * batch} rows), fused kernels, {name}, eager")
        sort = "cuda_time_total" if DEV == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=60), flush=True)
    del pipe, dit
    gc.collect()


@torch.no_grad()
def forward_latencies(arch_cfg, sizes: list[int], rows_list: list[int]) -> list[dict]:
    from model.cuda_graphs import GraphedForward
    from model.fast_forward import FastDiT

    out = []
    for size in sizes:
        cfg = arch_cfg(size)
        dit, ref = random_dit(cfg), random_dit(cfg)
        fast, fp8 = FastDiT(dit), FastDiT(random_dit(cfg), fp8=Fp8Recipe())
        shape = (4, cfg.input_size, cfg.input_size)
        for n in rows_list:
            x = torch.randn(n, *shape, device=DEV)
            t = torch.randint(0, 1000, (n,), device=DEV)
            y = torch.randint(0, cfg.num_classes, (n,), device=DEV)
            peers = {"reference": ref, "fused": fast}
            if DEV == "cuda":
                for name, f in (("fused+graphs", fast), ("fp8+graphs", fp8)):
                    peers[name] = GraphedForward(f, shape, null_class=cfg.num_classes, device=DEV, sizes=[n])
                    peers[name].capture()
            else:
                peers["fp8"] = fp8
            times = {name: timed(lambda f=f, x=x, t=t, y=y: f(x, t, y)) for name, f in peers.items()}
            best = times.get("fp8+graphs", times.get("fp8"))
            out.append({"size": size, "rows": n, **{k: v * 1000 for k, v in times.items()},
                        "fp8_tflops": n * forward_gflops(cfg) / 1e3 / best})
            del peers
        del dit, ref, fast, fp8
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return out


def server_figures(arch: str, clients: int, seconds: float) -> dict:
    import asyncio

    import httpx
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests"))
    from server_harness import free_port, wait_until

    tmp = Path(tempfile.mkdtemp())
    dit = random_dit(preset(arch, input_size=32))
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(tmp / "dit.safetensors"))
    sd_vae(torch.float32, 256).save_pretrained(tmp / "vae")
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


# ---- the run ------------------------------------------------------------------------------------
def main() -> None:
    global DEV, REPS, WARMUP
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="DiT-XL/2")
    p.add_argument("--sizes", default="256", help="image sizes (px) of the forward-latency table, e.g. 256,512")
    p.add_argument("--no-compile", action="store_true", help="skip the diffusers + torch.compile peer")
    p.add_argument("--profile", action="store_true", help="also profile one denoising step at batch 32")
    p.add_argument("--forward", action="store_true", help="also the per-forward latency table at --sizes")
    p.add_argument("--server", action="store_true", help="also measure through the running server")
    p.add_argument("--clients", type=int, default=64, help="more than the 32 guided samples a 64-row batch "
                   "holds, so that requests wait and the server is saturated")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--dry-run", action="store_true", help="run every section on the CPU with a toy DiT "
                   "(depth 2, 32 px, batch 2, 2 steps): proves the script, measures nothing")
    args = p.parse_args()

    if args.dry_run:
        DEV, REPS, WARMUP = "cpu", 2, 1
        image_size, batch, steps, reps, layer_rows, peak_n, images = 32, 2, 2, 1, 64, 128, 2
        arch_cfg = lambda size: DiTConfig(input_size=size // 8, patch_size=2, in_channels=4, hidden_size=128,
                                          depth=2, num_heads=2, num_classes=1000)
        sizes, rows_list = [32], [2, 4]
        name = "toy DiT (depth 2, hidden 128)"
        print("DRY RUN on the CPU with toy sizes: the figures mean nothing; this proves the script runs.")
    else:
        if not torch.cuda.is_available():
            sys.exit("needs CUDA (or --dry-run)")
        image_size, batch, steps, reps, layer_rows, peak_n, images = 256, 32, 50, 2, 64 * 256, 8192, 8
        arch_cfg = lambda size: preset(args.arch, input_size=size // 8)
        sizes, rows_list = [int(s) for s in args.sizes.split(",")], [2, 16, 64]
        name = args.arch
    cfg = arch_cfg(image_size)
    torch.backends.cuda.matmul.allow_tf32 = True
    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        device_name = f"{props.name}, {props.multi_processor_count} SMs, CC {props.major}.{props.minor}"
    else:
        device_name = f"CPU, {torch.get_num_threads()} threads"
    print(f"{device_name}, torch {torch.__version__}, {name}, random weights, FP8 backend: {fp8_backend()}")
    results: dict = {"device": device_name, "torch": torch.__version__, "arch": name, "dry_run": args.dry_run,
                     "fp8_backend": fp8_backend()}
    out_dir = Path(os.environ.get("OUT", ROOT / "out"))

    def save():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gpu_bench.json").write_text(json.dumps(results, indent=1))

    def section(title, fn):  # one failing section must not cost the others (device time is scarce)
        t0 = time.monotonic()
        try:
            fn()
        except Exception:
            print(f"\n[{title} failed]\n{traceback.format_exc()}", flush=True)
            results.setdefault("failed", []).append(title)
        results.setdefault("section_s", {})[title] = time.monotonic() - t0
        save()

    def show_peaks():
        pk = results["peaks_tflops"] = peaks(peak_n)
        print(f"matmul {peak_n}^3, TFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in pk.items()), flush=True)

    def show_layers():
        rows = results["fp8_layers"] = fp8_layers(cfg, layer_rows)
        keys = [k for k in rows[0] if k not in ("layer", "shape", "bf16_tflops", "fp8_row_tflops")]
        print(f"\nms per linear at {layer_rows} token rows:")
        print(f"{'layer':>5} {'shape':>18} " + " ".join(f"{k:>14}" for k in keys))
        for r in rows:
            print(f"{r['layer']:>5} {r['shape']:>18} " + " ".join(f"{r.get(k, float('nan')):>14.3f}" for k in keys)
                  + f"   bf16 {r['bf16_tflops']:.0f} / fp8 row {r['fp8_row_tflops']:.0f} TFLOP/s", flush=True)

    def show_throughput(compiled: bool):
        if not compiled:
            print(f"\n{steps}-step DDIM, cfg 4, batch {batch}, {image_size} px, images/s (median of {reps}):",
                  flush=True)
        throughput(cfg, image_size, batch, steps, 4.0, reps, results, save, compiled=compiled)
        tp = results["throughput"]
        base = tp["ours bf16"]["img_s"]
        flop = 2 * steps * forward_gflops(cfg) / 1e3  # TFLOP per image (two rows per guided image)
        for v in tp.values():
            if isinstance(v, dict) and "img_s" in v:
                v["vs_ours_bf16"] = v["img_s"] / base
                v["mfu_bf16_peak"] = v["img_s"] * flop / results.get("peaks_tflops", {}).get("bf16", float("nan"))
        if not compiled:
            print(f"  ours fp8 row / ours bf16: {tp['ours fp8 row']['img_s'] / base:.2f}x (target >= 1.3); "
                  f"ours bf16 / diffusers eager fp16: {base / tp['diffusers eager fp16']['img_s']:.2f}x", flush=True)
        else:
            print(f"  ours bf16 / diffusers compiled bf16: {base / tp['diffusers compiled bf16']['img_s']:.2f}x "
                  "(target >= 1.3)", flush=True)

    def show_step_cache():
        sc = results["step_cache"] = step_cache(cfg, image_size, batch, steps, 4.0, reps)
        print(f"\nstep cache, {steps}-step DDIM, cfg 4, batch {batch}, {image_size} px, ours bf16, interleaved:")
        for name, v in sc.items():
            print(f"  {name:<11} {v['rows_per_image']:>4} rows/image  {v['img_s']:7.2f} img/s  "
                  f"({v['vs_off']:.2f}x off)", flush=True)

    def show_precision():
        errors = results["rel_error_vs_fp32"] = precision(cfg, images)
        print(f"\nrelative L2 error vs float32, one forward of {images} images: "
              + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
              + f"; fp8 row / bf16 = {errors['fp8 row'] / errors['bf16']:.2f}x (target <= 2)", flush=True)

    def show_forward():
        results["forward"] = forward_latencies(arch_cfg, sizes, rows_list)
        keys = [k for k in results["forward"][0] if k not in ("size", "rows", "fp8_tflops")]
        print(f"\nper-forward ms: {'px':>4} {'rows':>4} " + " ".join(f"{k:>12}" for k in keys) + "  fp8 TFLOP/s")
        for r in results["forward"]:
            print(f"                {r['size']:>4} {r['rows']:>4} " + " ".join(f"{r[k]:>12.2f}" for k in keys)
                  + f"  {r['fp8_tflops']:>10.0f}", flush=True)

    def show_server():
        s = results["server"] = server_figures(args.arch, args.clients, args.seconds)
        print(f"server: ready in {s['startup_s']:.0f} s; lone request (256 px, 50-step DDIM, cfg 4) "
              f"{s['lone_ms']:.0f} ms; {args.clients} clients: {s['server_img_s']:.1f} img/s, time outside the "
              f"model {s['outside_model']:.1%}", flush=True)

    # Most important first, and the compile peer, whose compile time nobody can bound, after the quick ones:
    # if the device time runs out, the figures already taken are in the JSON.
    section("peaks", show_peaks)
    section("throughput", lambda: show_throughput(False))
    section("step cache", show_step_cache)
    section("precision", show_precision)
    section("fp8 layers", show_layers)
    if args.profile:
        section("profile", lambda: profile_step(cfg, batch))
    if not args.no_compile:
        section("compile peer", lambda: show_throughput(True))
    if args.forward:
        section("forward latency", show_forward)
    if args.server and not args.dry_run:
        section("server", show_server)
    print("\nsection seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results["section_s"].items()))


if __name__ == "__main__":
    main()
