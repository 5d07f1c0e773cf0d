"""Fetch one named source into `<dest>/<name>/`, verify every file, convert pickles to safetensors,
and keep a manifest of what was verified against what."""

from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath

import httpx
import torch
from safetensors.torch import save_file

from .download import download, sha256_of
from .sources import SOURCES, WANTED_SUFFIXES, Source

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def _hub_files(client: httpx.Client, hub_url: str, repo: str) -> list[tuple[str, str, str | None]]:
    """(path, url, published sha256 or None) for the wanted files of a hub repo's main branch."""
    r = client.get(f"{hub_url}/api/models/{repo}/tree/main", params={"recursive": "true"})
    r.raise_for_status()
    entries = [e for e in r.json() if e.get("type") == "file" and e["path"].endswith(WANTED_SUFFIXES)]
    safetensors = {PurePosixPath(e["path"]).with_suffix("") for e in entries if e["path"].endswith(".safetensors")}
    files = []
    for e in entries:
        path = PurePosixPath(e["path"])
        if path.suffix in (".bin", ".pt") and path.with_suffix("") in safetensors:
            continue  # the same weights as safetensors: take those
        lfs = e.get("lfs") or {}
        files.append((e["path"], f"{hub_url}/{repo}/resolve/main/{e['path']}", lfs.get("oid")))
    if not files:
        raise RuntimeError(f"{repo}: no weights or configs found in the repository listing")
    return files


def _convert(path: Path) -> Path:
    """A pickled state dict -> safetensors beside it (read with weights_only=True); the pickle is removed."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        obj = obj["ema"]
    out = path.with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in obj.items()}, str(out), metadata={"format": "pt"})
    path.unlink()
    return out


def fetch(name: str, dest: Path, *, hub_url: str, files_url: str, progress: bool = True,
          client: httpx.Client | None = None) -> Path:
    """Download `name` into dest/name; returns that folder. Files already there and verified are kept."""
    if name not in SOURCES:
        raise KeyError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    src: Source = SOURCES[name]
    target = dest / name
    target.mkdir(parents=True, exist_ok=True)
    manifest_path = target / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"files": {}}
    recorded = manifest["files"]
    own_client = client is None
    client = client or httpx.Client(follow_redirects=True, timeout=httpx.Timeout(60.0, connect=20.0))
    try:
        if src.kind == "hub":
            files = _hub_files(client, hub_url.rstrip("/"), src.location)
        else:
            files = [(PurePosixPath(src.location).name, f"{files_url.rstrip('/')}/{src.location}", None)]
        for path, url, published in files:
            local = target / path
            entry = recorded.get(path, {})
            converted = entry.get("converted_to")
            if converted and (target / converted).exists() \
                    and sha256_of(target / converted) == entry["converted_sha256"]:
                continue  # fetched and converted before, and intact
            expected = published or entry.get("sha256")  # a source that publishes none: what we recorded
            if local.exists() and expected and sha256_of(local) == expected:
                continue
            log.info("fetching %s", url)
            digest = download(client, url, local, sha256=expected, progress=progress)
            recorded[path] = {"sha256": digest, "sha256_from": "published" if published else "computed"}
            if local.suffix in (".bin", ".pt"):
                out = _convert(local)
                recorded[path].update(converted_to=str(out.relative_to(target)), converted_sha256=sha256_of(out))
        manifest.update(name=name, source=src.location, license=src.license)
        tmp = manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        tmp.replace(manifest_path)
    finally:
        if own_client:
            client.close()
    return target


def verify(name: str, dest: Path) -> list[str]:
    """Problems found re-checking dest/name against its manifest (empty when all is well)."""
    target = dest / name
    manifest_path = target / MANIFEST
    if not manifest_path.exists():
        return [f"{target}: no {MANIFEST}; run dit-fetch {name} first"]
    problems = []
    for path, entry in json.loads(manifest_path.read_text())["files"].items():
        if "converted_to" in entry:
            file, sha = entry["converted_to"], entry["converted_sha256"]
        else:
            file, sha = path, entry["sha256"]
        if not (target / file).exists():
            problems.append(f"{file}: missing")
        elif sha256_of(target / file) != sha:
            problems.append(f"{file}: sha256 differs from the manifest (modified or corrupted)")
    return problems
