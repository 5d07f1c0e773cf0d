"""dit-generate CLASS [options]: generate images from a running server (default) or locally (--local).

CLASS is a class id or (part of) a class name. Shows a progress bar, retries 429 answers after their
Retry-After, writes PNGs (`--out`; with several images, `<stem>-<seed>.png` each), and exits non-zero
with a message on errors.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm


class CliError(Exception):
    pass


def resolve_class(text: str, names: list[str]) -> int:
    if text.isdigit():
        if int(text) >= len(names):
            raise CliError(f"class {text} does not exist: the model has {len(names)} classes (0..{len(names) - 1})")
        return int(text)
    t = text.lower()
    exact = [i for i, n in enumerate(names) if n.lower() == t]
    matches = exact or [i for i, n in enumerate(names) if t in n.lower()]
    if len(matches) != 1:
        shown = ", ".join(f"{i}: {names[i]}" for i in matches[:8]) or "none"
        raise CliError(f"class {text!r} matches {len(matches)} classes ({shown}); give an id or a longer name")
    return matches[0]


def output_paths(out: Path | None, class_name: str, seeds: list[int]) -> list[Path]:
    stem = "".join(ch if ch.isalnum() else "_" for ch in class_name).strip("_")
    if out is None:
        return [Path(f"{stem}-{s}.png") for s in seeds]
    if len(seeds) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{s}{out.suffix or '.png'}") for s in seeds]


def from_server(args, body_extra: dict) -> tuple[str, list[tuple[int, bytes]]]:
    url = args.url.rstrip("/")
    try:
        names = [c["name"] for c in httpx.get(url + "/classes", timeout=30).raise_for_status().json()["classes"]]
    except httpx.TransportError as e:
        raise CliError(f"cannot reach the server at {url} ({e}); is it running? (make serve)") from e
    except httpx.HTTPStatusError as e:
        raise CliError(f"{url}/classes answered {e.response.status_code}: {e.response.text[:200]}") from e
    body = dict(body_extra, class_id=resolve_class(args.class_, names))
    for attempt in range(args.retries + 1):
        with httpx.stream("POST", url + "/generate", json=body, headers={"Accept": "text/event-stream"},
                          timeout=httpx.Timeout(30, read=None)) as r:
            if r.status_code == 429 and attempt < args.retries:
                wait = float(r.headers.get("retry-after", 2))
                print(f"server busy (429); retrying in {wait:g} s ({attempt + 1}/{args.retries})", file=sys.stderr)
                time.sleep(wait)
                continue
            if r.status_code != 200:
                r.read()
                raise CliError(f"the server answered {r.status_code}: {_error_message(r)}")
            return _read_stream(r, names[body["class_id"]], args.quiet)
    raise CliError("the server stayed busy (429) through every retry; try again later")


def _error_message(r: httpx.Response) -> str:
    try:
        err = r.json()["error"]
        return err["message"] + (f" (field {err['field']})" if err.get("field") else "")
    except (ValueError, KeyError):
        return r.text[:200]


def _read_stream(r: httpx.Response, class_name: str, quiet: bool) -> tuple[str, list[tuple[int, bytes]]]:
    bar, event = None, None
    try:
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                if event == "progress":
                    bar = bar or tqdm(total=data["steps"], desc=class_name, unit="step", disable=quiet)
                    bar.update(data["step"] - bar.n)
                elif event == "result":
                    return data["class_name"], [(im["seed"], base64.b64decode(im["data"])) for im in data["images"]]
                elif event == "error":
                    raise CliError(f"generation failed: {data['error']['message']}")
    finally:
        if bar is not None:
            bar.close()
    raise CliError("the server closed the stream without a result")


def locally(args, body: dict) -> tuple[str, list[tuple[int, bytes]]]:
    import random

    from model import Pipeline
    from server.contracts import OutputSpec
    from server.encoding import encode

    pipe = Pipeline.from_pretrained(args.model, vae=args.vae)
    info, d = pipe.info, pipe.info.defaults
    class_id = resolve_class(args.class_, info.class_names)
    seed = body.get("seed", random.randrange(2**63 - 1))
    seeds = [seed + k for k in range(args.count)]
    sampler, steps = body.get("sampler", d.sampler), body.get("steps", d.steps)
    cfg = body.get("cfg_scale", d.cfg_scale)
    with tqdm(total=steps, desc=info.class_names[class_id], unit="step", disable=args.quiet) as bar:
        pixels = pipe.generate([class_id] * len(seeds), seeds, sampler=sampler, steps=steps, cfg_scale=cfg,
                               on_step=lambda _: bar.update()).numpy()
    params = {"model": info.name, "class_id": class_id, "class_name": info.class_names[class_id],
              "cfg_scale": float(cfg), "steps": steps, "sampler": sampler}
    images = encode(pixels, tuple(seeds), OutputSpec(format="png", separate=True, metadata=params))
    return info.class_names[class_id], [(im.seeds[0], im.data) for im in images]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dit-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("class_", metavar="CLASS", help="class id or (part of) its name")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server to ask (default %(default)s)")
    p.add_argument("--local", action="store_true", help="run the model in this process instead of a server")
    p.add_argument("--model", default=None, help="with --local: checkpoint or folder (default: the embedded model)")
    p.add_argument("--vae", default=None, help="with --local: VAE folder for latent checkpoints")
    p.add_argument("--cfg", type=float, dest="cfg_scale", help="guidance scale (default: the model's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm-solver++"], help="default: the model's")
    p.add_argument("--seed", type=int, help="random when absent; image k uses seed + k")
    p.add_argument("--count", type=int, default=1, help="number of images")
    p.add_argument("--out", type=Path, help="output PNG (several images: OUT-<seed>.png)")
    p.add_argument("--retries", type=int, default=5, help="retries of 429 answers")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    body = {k: v for k, v in (("cfg_scale", args.cfg_scale), ("steps", args.steps), ("sampler", args.sampler),
                              ("seed", args.seed)) if v is not None}
    try:
        if args.local:
            if args.model is None:
                from server.settings import EMBEDDED_MODEL
                args.model = EMBEDDED_MODEL
            class_name, images = locally(args, body)
        else:
            class_name, images = from_server(args, dict(body, num_images=args.count))
    except CliError as e:
        print(f"dit-generate: {e}", file=sys.stderr)
        return 1
    for path, (seed, data) in zip(output_paths(args.out, class_name, [s for s, _ in images]), images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"{path}  ({class_name}, seed {seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
