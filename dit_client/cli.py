"""dit-generate CLASS [options]: generate images from a running server (default) or locally (--local).
`dit-generate dataset --help`: many images per class, as shards (POST /datasets).

CLASS is a class id or a class name, matched by the server's rule: any of its names, case-insensitive, or a
prefix only one class has ("ankle"); `dit-generate --list-classes` lists them. Shows a progress
bar (and the queue position while waiting), retries 429 answers after their Retry-After, and exits
non-zero with a message on errors.

Files: one image per seed, each with its generation parameters inside. `--out sneakers.png` with one
image writes sneakers.png; with `--count 4` it writes sneakers-<seed>.png for each of the 4 seeds
(seed, seed+1, ...). Without --out: <Class>-<seed>.png here; --out DIR/ puts those names in DIR. The
suffix picks the format: .png (default), .jpg/.jpeg or .webp (lossless).
"""

from __future__ import annotations

import argparse
import base64
import difflib
import json
import os
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}  # file suffix -> API format
LIST_ALL_UP_TO = 50  # an unknown name lists every class of a model this small; of a larger one, the nearest


class CliError(Exception):
    pass


def _listing(ids, names: list[str]) -> str:
    return ", ".join(f"{i}: {names[i]}" for i in ids)


def _valid_classes(text: str, names: list[str]) -> str:
    """What to tell someone whose class matched nothing: every class, or for ImageNet-sized models the
    nearest names and how to see them all."""
    if len(names) <= LIST_ALL_UP_TO:
        return f"the classes are {_listing(range(len(names)), names)}"
    lowered = [n.lower() for n in names]
    near = difflib.get_close_matches(text.lower(), lowered, n=8, cutoff=0.5)
    hint = f"the nearest are {_listing([lowered.index(n) for n in near], names)}; " if near else ""
    return f"{hint}dit-generate --list-classes shows all {len(names)}"


def resolve_class(text: str, names: list[str]) -> int:
    """An id, or a name by the server's own rule (server/service/class_names.py), so that a name the CLI
    takes is one the server takes."""
    from server.service.class_names import ClassNameError, class_index

    if text.isdigit():
        if int(text) >= len(names):
            raise CliError(f"class {text} does not exist: the model has {len(names)} classes (0..{len(names) - 1}); "
                           + _valid_classes(text, names))
        return int(text)
    try:
        return class_index(tuple(names)).resolve(text)
    except ClassNameError as e:
        raise CliError(f"{e}; {_valid_classes(text, names)}") from e


def is_folder(out: str) -> bool:
    return out.endswith(("/", os.sep)) or Path(out).is_dir()


def output_format(out: str | None) -> str:
    """The API's format for the --out suffix (png when there is none)."""
    if out is None or is_folder(out) or Path(out).suffix == "":
        return "png"
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise CliError(f"cannot write {suffix!r} files: use {', '.join(FORMATS)} (or no suffix for .png)")
    return FORMATS[suffix]


def output_paths(out: str | None, class_name: str, seeds: list[int]) -> list[Path]:
    """One file per seed: OUT itself for one image, OUT-<seed>.EXT for several; <Class>-<seed>.png in the
    current folder (or in OUT, when OUT is a folder) without a file name."""
    if out is None or is_folder(out):
        stem = "".join(ch if ch.isalnum() else "_" for ch in class_name).strip("_")
        return [Path(out or ".") / f"{stem}-{s}.png" for s in seeds]
    path = Path(out)
    if len(seeds) == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{s}{path.suffix or '.png'}") for s in seeds]


def auth_headers(args) -> dict[str, str]:
    return {"X-API-Key": args.api_key} if args.api_key else {}


def fetch_classes(url: str, args) -> list[str]:
    try:
        r = httpx.get(url + "/classes", headers=auth_headers(args), timeout=30)
    except httpx.TransportError as e:
        raise CliError(f"cannot reach the server at {url} ({e}); is it running? (make serve)") from e
    if r.status_code == 401:
        raise CliError(f"{url} needs an API key: pass --api-key KEY or set DIT_API_KEY"
                       + (" (the one given was refused)" if args.api_key else ""))
    if r.status_code != 200:
        raise CliError(f"{url}/classes answered {r.status_code}: {_error_message(r)}")
    return [c["name"] for c in r.json()["classes"]]


def from_server(args, body_extra: dict) -> tuple[str, list[tuple[int, bytes]]]:
    url = args.url.rstrip("/")
    names = fetch_classes(url, args)
    body = dict(body_extra, class_id=resolve_class(args.class_, names))
    headers = {"Accept": "text/event-stream", **auth_headers(args)}
    for attempt in range(args.retries + 1):
        with httpx.stream("POST", url + "/generate", json=body, headers=headers,
                          timeout=httpx.Timeout(30, read=None)) as r:
            if r.status_code == 429 and attempt < args.retries:
                wait = min(float(r.headers.get("retry-after", 2)), args.retry_wait_max)
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
    bar, event, shown = None, None, ""
    try:
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                if event == "progress":
                    bar = bar or tqdm(total=data["steps"], desc=class_name, unit="step", disable=quiet)
                    position = data.get("queue_position") if data.get("status") == "queued" else None
                    waiting = f"queued, position {position}" if position else ""
                    if waiting != shown:
                        bar.set_postfix_str(shown := waiting)
                    bar.update(data["step"] - bar.n)
                elif event == "result":
                    return data["class_name"], [(im["seed"], base64.b64decode(im["data"])) for im in data["images"]]
                elif event == "error":
                    raise CliError(f"generation failed: {data['error']['message']}")
    finally:
        if bar is not None:
            bar.close()
    raise CliError("the server closed the stream without a result")


def locally(args, body: dict, output_format: str) -> tuple[str, list[tuple[int, bytes]]]:
    """The server's answer, computed in this process: the same defaults, seeds, pipeline and encoding."""
    from model import Pipeline
    from server.service.encoding import encode
    from server.service.job import Job
    from server.service.requests import InvalidSettings, new_request
    from server.settings import Settings

    pipe = Pipeline.from_pretrained(args.model, vae=args.vae)
    info = pipe.info
    class_id = resolve_class(args.class_, info.class_names)
    # The server's door, with a default server's limits (but no cap on the steps or images asked for).
    limits = Settings.model_construct(model=args.model, max_steps=1000, max_images=args.count)  # not the env's
    try:
        request = new_request(info, limits, class_id=class_id, num_images=args.count, **body)
    except InvalidSettings as e:
        raise CliError("; ".join(message for _, message in e.problems)) from e
    s = request.sampling
    with tqdm(total=s.steps, desc=info.class_names[class_id], unit="step", disable=args.quiet) as bar:
        pixels = pipe.generate([class_id] * request.num_images, request.seeds, sampler=s.sampler, steps=s.steps,
                               cfg_scale=s.cfg_scale, guidance_interval=s.guidance_interval,
                               on_step=lambda _: bar.update()).numpy()
    job = Job(request, info.name, info.class_names[class_id], format=output_format, separate=True)
    images = encode(pixels, request.seeds, job.format, separate=True, parameters=job.parameters)
    return info.class_names[class_id], list(zip(request.seeds, images, strict=True))


def list_classes(args) -> int:
    if args.local:
        from model import Pipeline

        names = Pipeline.from_pretrained(args.model, vae=args.vae).info.class_names
    else:
        names = fetch_classes(args.url.rstrip("/"), args)
    print("\n".join(f"{i}\t{n}" for i, n in enumerate(names)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["dataset"]:  # dit-generate dataset ...: many images as shards (dit_client/dataset.py)
        from .dataset import run

        return run(argv[1:])
    p = argparse.ArgumentParser(prog="dit-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("class_", metavar="CLASS", nargs="?", help="class id or name (any of its names, or a prefix "
                   "only one class has)")
    p.add_argument("--list-classes", action="store_true", help="list the model's class ids and names, then exit")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server to ask (default %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("DIT_API_KEY"),
                   help="for a server with API keys (default: $DIT_API_KEY; a flag shows in `ps`)")
    p.add_argument("--local", action="store_true", help="run the model in this process instead of a server")
    p.add_argument("--model", default=None, help="with --local: checkpoint or folder (default: the embedded model)")
    p.add_argument("--vae", default=None, help="with --local: VAE folder for latent checkpoints")
    p.add_argument("--cfg", type=float, dest="cfg_scale", help="guidance scale (default: the model's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    # The server (or, with --local, the model) checks the name and lists the samplers in its answer.
    p.add_argument("--sampler", help="the sampler (default: the model's; a wrong name lists them)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only the steps whose timestep t has LO <= t/999 <= HI, 0 <= LO < HI <= 1 "
                   "(fewer forward rows; default: the model's, as GET /info shows it: 0 0.5 for the embedded model; "
                   "0 1 guides every step)")
    p.add_argument("--seed", type=int, help="random when absent; image k uses seed + k")
    p.add_argument("--count", type=int, default=1, help="number of images (one file each)")
    p.add_argument("--out", help="output file: .png, .jpg or .webp; with --count > 1, OUT-<seed>.EXT "
                   "for each seed; a folder (ending in /) gets <Class>-<seed>.png files")
    p.add_argument("--retries", type=int, default=5, help="retries of 429 answers")
    p.add_argument("--retry-wait-max", type=float, default=60, metavar="SECONDS",
                   help="longest wait before a retry: a longer Retry-After is cut to it (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.class_ is None and not args.list_classes:
        p.error("give a CLASS (an id or a name), or --list-classes to see them")
    if args.count < 1:
        p.error("--count must be at least 1")
    if args.guidance_interval is not None and not 0 <= args.guidance_interval[0] < args.guidance_interval[1] <= 1:
        p.error("--guidance-interval LO HI needs 0 <= LO < HI <= 1, e.g. --guidance-interval 0 0.7")
    if args.local and args.model is None:
        from server.settings import EMBEDDED_MODEL
        args.model = EMBEDDED_MODEL
    try:
        if args.list_classes:
            return list_classes(args)
        body = {k: v for k, v in (("cfg_scale", args.cfg_scale), ("steps", args.steps), ("sampler", args.sampler),
                                  ("seed", args.seed), ("guidance_interval", args.guidance_interval))
                if v is not None}
        if args.local:
            class_name, images = locally(args, body, output_format(args.out))
        else:
            class_name, images = from_server(args, dict(body, num_images=args.count, format=output_format(args.out)))
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
