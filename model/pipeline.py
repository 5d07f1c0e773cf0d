"""`Pipeline`: DiT + sampler + decoder + the model's declared defaults -> uint8 RGB images."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .batch import Join, SlotBatch
from .cache import OFF, Cache
from .checkpoint import RawCheckpoint, read_checkpoint
from .decoders import PixelDecoder, VAEDecoder, to_uint8
from .denoise import Denoiser
from .loading import build, infer_config
from .previews import fit_latent_rgb, latent_rgb
from .samplers import FULL_INTERVAL, Sampling


@dataclass(frozen=True)
class Defaults(Sampling):
    """What a request that names nothing gets. The paper's sample.py: DDPM, 250 steps, scale 4, guided at
    every step."""

    sampler: str = "ddpm"
    steps: int = 250
    cfg_scale: float = 4.0
    guidance_interval: tuple[float, float] = FULL_INTERVAL
    cache: Cache = OFF

    def resolve(self, *, sampler: str | None = None, steps: int | None = None, cfg_scale: float | None = None,
                guidance_interval: Sequence[float] | None = None, cache=None,
                max_steps: int | None = None) -> Sampling:
        """A request's settings: each one it leaves out (None) takes this default, the default step count
        capped at `max_steps` (a server's limit). Raises SettingError naming a setting that cannot run."""
        default_steps = self.steps if max_steps is None else min(self.steps, max_steps)
        return Sampling(
            sampler=self.sampler if sampler is None else sampler,
            steps=default_steps if steps is None else steps,
            cfg_scale=self.cfg_scale if cfg_scale is None else cfg_scale,
            guidance_interval=self.guidance_interval if guidance_interval is None else tuple(guidance_interval),
            cache=self.cache if cache is None else cache,
        )


@dataclass
class ModelInfo:
    name: str
    space: str  # "latent" or "pixel"
    image_size: int
    channels: int  # of the sampler's space
    class_names: list[str] = field(default_factory=list)
    defaults: Defaults = field(default_factory=Defaults)


def _class_names(raw: RawCheckpoint, num_classes: int) -> list[str]:
    names = raw.extra.get("class_names")
    if names is None and "id2label" in raw.extra:  # a diffusers pipeline: {"0": "tench, Tinca tinca", ...}
        id2label = raw.extra["id2label"]
        names = [id2label.get(str(i), str(i)) for i in range(num_classes)]
    if names is None and num_classes == 1000:  # an ImageNet checkpoint that carries no names
        names = json.loads((Path(__file__).parent / "imagenet_classes.json").read_text())
    if names is None:
        return [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{raw.source}: {len(names)} class names for {num_classes} classes")
    return list(names)


class Pipeline:
    def __init__(self, dit, decoder, info: ModelInfo, *, cfg_channels: int | None = None):
        self.dit = dit
        self.decoder = decoder
        self.info = info
        self._latent_rgb: torch.Tensor | None = None  # fitted on the first latent preview
        clip = (-1.0, 1.0) if info.space == "pixel" else None  # pixel models clip x0, latent ones do not
        self.denoiser = Denoiser(dit, cfg_channels=cfg_channels, clip_x0=clip)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, vae: str | Path | None = None, arch: str | None = None,
                        num_heads: int | None = None, dtype=None, device=None,
                        cfg_channels: int | None = None) -> Pipeline:
        """A diffusers pipeline folder, or a DiT checkpoint (+ `vae` folder for latent models)."""
        raw = read_checkpoint(path)
        config = infer_config(raw, arch=arch, num_heads=num_heads)
        dit = build(raw, config, dtype=dtype, device=device)
        space = raw.extra.get("space", "latent")
        if space == "pixel":
            decoder = PixelDecoder(tuple(raw.extra.get("data_range", (-1.0, 1.0))))
            image_size = config.input_size
        else:
            vae_dir = Path(vae) if vae is not None else (raw.pipeline_dir / "vae" if raw.pipeline_dir else None)
            if vae_dir is None:
                raise ValueError(f"{path}: a latent-space DiT needs a VAE; pass vae=<AutoencoderKL folder>")
            decoder = VAEDecoder.from_folder(vae_dir, device=device)
            image_size = config.input_size * 8
        d = raw.extra.get("defaults", {})
        info = ModelInfo(
            name=Path(path).stem if Path(path).is_file() else Path(path).name,
            space=space, image_size=image_size, channels=config.in_channels,
            class_names=_class_names(raw, config.num_classes),
            defaults=Defaults(**d) if d else Defaults(),
        )
        return cls(dit, decoder, info, cfg_channels=cfg_channels)

    def use_fast_path(self, *, fused_kernels: bool = True, cuda_graphs: bool = False,
                      graph_sizes: Sequence[int] | None = None, fp8=False) -> float:
        """Switch the denoiser's forward to FastDiT (fused kernels, FP8 linears) and/or CUDA graphs.

        `fp8`: False, True (the default `Fp8Recipe`) or an `Fp8Recipe` (model/fp8.py: which layers, and
        where it runs). `graph_sizes`: the row counts to capture graphs for (a batch replays the smallest
        that holds it; larger ones run eagerly). Returns the seconds spent capturing graphs (0 without).
        All off restores the reference path.
        """
        from .cuda_graphs import GraphedForward
        from .fast_forward import FastDiT
        from .fp8 import Fp8Recipe

        recipe = Fp8Recipe() if fp8 is True else (fp8 or None)
        forward = FastDiT(self.dit, fused=fused_kernels, fp8=recipe) if fused_kernels or recipe else self.dit
        if cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError("CUDA graphs need the model on a CUDA device")
            if not graph_sizes:
                raise ValueError("CUDA graphs need graph_sizes: the batch row counts to capture, e.g. (1, 2, 4, 8)")
            forward = GraphedForward(forward, self.sample_shape, null_class=self.dit.null_class, device=self.device,
                                     sizes=graph_sizes)
            seconds = forward.capture()
        else:
            seconds = 0.0
        self.denoiser.forward = forward
        return seconds

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.dit.config
        return (c.in_channels, c.input_size, c.input_size)

    def new_batch(self, capacity: int = 8) -> SlotBatch:
        """An empty SlotBatch on this pipeline's denoiser (the per-step API the server drives)."""
        return SlotBatch(self.denoiser, capacity)

    def check_class(self, label: int) -> None:
        if not 0 <= label < self.dit.config.num_classes:
            raise ValueError(f"class {label} is outside 0..{self.dit.config.num_classes - 1}")

    @torch.no_grad()
    def preview(self, x0: torch.Tensor) -> torch.Tensor:
        """A cheap look at predicted clean samples (N, C, h, w): uint8 RGB on the CPU, (N, h, w, 3) for
        latent models (one pixel per latent position, see model/previews.py), full size for pixel models."""
        if isinstance(self.decoder, PixelDecoder):
            return to_uint8(self.decoder(x0)).cpu()
        if self._latent_rgb is None:
            self._latent_rgb = fit_latent_rgb(self.decoder, self.dit.config.in_channels)
        return to_uint8(latent_rgb(x0, self._latent_rgb)).cpu()

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Sampler-space (N, C, h, w) -> uint8 RGB (N, H, W, 3) on the CPU."""
        return to_uint8(self.decoder(x)).cpu()

    @torch.no_grad()
    def generate(self, class_ids: Sequence[int], seeds: Sequence[int], *, sampler: str | None = None,
                 steps: int | None = None, cfg_scale: float | None = None,
                 guidance_interval: tuple[float, float] | None = None, cache=None,
                 on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """One image per (class, seed): uint8 (N, H, W, 3). Omitted settings take the model's defaults.
        on_step(k) is called after each of the k = 1..steps iterations (progress bars)."""
        s = self.info.defaults.resolve(sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                                       guidance_interval=guidance_interval, cache=cache)
        for c in class_ids:
            self.check_class(int(c))
        batch = self.new_batch(len(seeds))
        batch.join([Join(k, int(c), int(seed), s) for k, (c, seed) in enumerate(zip(class_ids, seeds, strict=True))])
        for k in range(s.steps):
            batch.step()
            if on_step is not None:
                on_step(k + 1)
        return self.decode(batch.read(range(len(seeds))))
