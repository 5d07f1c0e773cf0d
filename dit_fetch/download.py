"""Resumable, verified downloads: bytes go to `<file>.part`, resume with an HTTP Range request, and
only a file whose sha256 matches is renamed into place. A mismatch deletes the partial file."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import httpx
from tqdm import tqdm

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class ChecksumError(RuntimeError):
    pass


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _fetch_once(client: httpx.Client, url: str, part: Path, progress: bool) -> None:
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with client.stream("GET", url, headers=headers) as r:
        if r.status_code == 416:  # the partial file is already complete
            return
        r.raise_for_status()
        if offset and r.status_code != 206:  # the server ignored the range: start over
            offset = 0
        total = offset + int(r.headers.get("content-length", 0)) or None
        with open(part, "ab" if offset else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=part.name.removesuffix(".part"),
            disable=not progress, leave=False,
        ) as bar:
            for block in r.iter_bytes(CHUNK):
                f.write(block)
                bar.update(len(block))


def download(client: httpx.Client, url: str, dest: Path, *, sha256: str | None, attempts: int = 4,
             progress: bool = True) -> str:
    """Fetch url to dest (resuming a previous partial download); returns the file's sha256.

    With `sha256` (published by the source) the file must match it, else ChecksumError and no file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, attempts + 1):
        try:
            _fetch_once(client, url, part, progress)
            break
        except (httpx.TransportError, httpx.RemoteProtocolError) as e:
            if attempt == attempts:
                raise RuntimeError(f"{url}: download interrupted {attempts} times ({e}); run again to resume") from e
            log.warning("%s: interrupted (%s); resuming (attempt %d of %d)", url, e, attempt + 1, attempts)
            time.sleep(min(2.0**attempt, 10) * 0.1)
    digest = sha256_of(part)
    if sha256 is not None and digest != sha256:
        part.unlink()
        raise ChecksumError(f"{dest.name}: sha256 {digest} does not match the published {sha256}; the download "
                            "was corrupted and has been deleted, run dit-fetch again")
    part.replace(dest)
    return digest
