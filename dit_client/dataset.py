"""dit-generate dataset: make a dataset on a running server (POST /datasets) and download its shards as
they finish, with a progress bar (images, rate, ETA). Run it again with the same --out to resume: the
dataset's id is kept in OUT/dataset.json, and shards already downloaded (their SHA-256 checked against the
server's manifest) are not downloaded again.

    dit-generate dataset --classes all --per-class 50 --format webdataset --out ds/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

STATE = "dataset.json"
POLL_SECONDS = 1.0


class DatasetError(Exception):
    pass


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dit-generate dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", default="all", help="\"all\", or ids and names separated by commas "
                   "(default %(default)s)")
    p.add_argument("--per-class", type=int, required=True, help="images of each class")
    p.add_argument("--format", choices=("webdataset", "npz"), default="webdataset", help="shard format")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default %(default)s)")
    p.add_argument("--seed", type=int, help="base seed (random when absent); image k of class c has "
                   "seed + c * 1000000 + k")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--cfg", type=float, dest="cfg_scale", help="guidance scale (default: the model's)")
    p.add_argument("--sampler", help="sampler (default: the model's)")
    p.add_argument("--cache", help="step cache: off or a preset (default: the server's)")
    p.add_argument("--out", required=True, help="folder for the shards and the resume state")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server (default %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("DIT_API_KEY"), help="default: $DIT_API_KEY")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def body(args) -> dict:
    classes = "all" if args.classes == "all" else [
        int(c) if c.strip().isdigit() else c.strip() for c in args.classes.split(",") if c.strip()]
    out = {"classes": classes, "per_class": args.per_class, "format": args.format, "shard_size": args.shard_size}
    for key in ("seed", "steps", "cfg_scale", "sampler", "cache"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    return out


def _check(r: httpx.Response, what: str) -> dict:
    if r.status_code >= 300:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:300]
        raise DatasetError(f"{what}: the server answered {r.status_code}: {message}")
    return r.json()


def start_or_resume(client: httpx.Client, args, out: Path) -> dict:
    """The dataset's status: the one OUT/dataset.json names (resume), else a new one."""
    state = out / STATE
    if state.exists():
        dataset_id = json.loads(state.read_text())["id"]
        r = client.get(f"/datasets/{dataset_id}")
        if r.status_code == 404:
            raise DatasetError(f"the server no longer has dataset {dataset_id} (deleted or expired); remove "
                               f"{state} to make a new one")
        return _check(r, "resuming")
    status = _check(client.post("/datasets", json=body(args)), "making the dataset")
    out.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"id": status["id"], "url": args.url}))
    return status


def download(client: httpx.Client, out: Path, shard: dict) -> bool:
    """Fetch a finished shard unless a file with its SHA-256 is there; True if it was fetched."""
    path = out / Path(shard["file"]).name  # a name, never a path the server could aim elsewhere
    if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]:
        return False
    r = client.get(shard["url"])
    if r.status_code >= 300:
        _check(r, f"shard {shard['shard']}")
    if hashlib.sha256(r.content).hexdigest() != shard["sha256"]:
        raise DatasetError(f"shard {shard['shard']} arrived damaged (SHA-256 differs); run again to retry")
    part = path.with_name(path.name + ".part")
    part.write_bytes(r.content)
    part.replace(path)
    return True


def run(argv: list[str]) -> int:
    args = parse(argv)
    out = Path(args.out)
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    try:
        with httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=60) as client:
            status = start_or_resume(client, args, out)
            bar = tqdm(total=status["images_total"], unit="img", desc=status["id"], disable=args.quiet)
            fetched = 0
            while True:
                manifest = _check(client.get(f"/datasets/{status['id']}/manifest"), "reading the manifest")
                fetched += sum(download(client, out, shard) for shard in manifest["shards"])
                bar.update(manifest["images_done"] - bar.n)
                if manifest["images_per_second"]:
                    bar.set_postfix(rate=f"{manifest['images_per_second']:.1f}/s", eta=f"{manifest['eta_seconds']}s")
                if manifest["status"] != "running":
                    break
                time.sleep(POLL_SECONDS)
            bar.close()
    except (DatasetError, httpx.HTTPError) as e:
        print(f"dit-generate dataset: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nstopped; run the same command again to resume ({out / STATE})", file=sys.stderr)
        return 130
    if manifest["status"] != "done":
        print(f"dit-generate dataset: the dataset ended {manifest['status']}: {manifest['error']}", file=sys.stderr)
        return 1
    print(f"{out}: {len(manifest['shards'])} shards, {manifest['images_total']} images ({fetched} shards fetched now)")
    return 0
