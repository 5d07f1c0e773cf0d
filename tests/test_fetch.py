"""dit-fetch against a model hub and a file server on loopback: good, corrupted and interrupted downloads."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, rel_err
from safetensors.torch import load_file

from dit_fetch.cli import main as dit_fetch
from dit_fetch.download import ChecksumError
from dit_fetch.fetch import fetch, verify
from model import load_dit


class FakeHub:
    """Serves `root/<repo>/<path>` like the hub: the tree API (sha256 of weight files) and resolve URLs
    with Range support. `corrupt` paths are served with one byte changed; `interrupt` paths are cut
    off half-way on their first request."""

    def __init__(self, root: Path):
        self.root, self.corrupt, self.interrupt, self.ranges, self.cut = root, set(), set(), [], set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.startswith("/api/models/"):
                    repo = self.path.removeprefix("/api/models/").split("/tree/")[0]
                    return self._send(200, json.dumps(hub.tree(repo)).encode(), "application/json")
                for marker in ("/resolve/main/", "/DiT/models/"):
                    if marker in self.path:
                        rel = self.path.lstrip("/") if marker == "/DiT/models/" else self.path.lstrip("/").replace(
                            "resolve/main/", "")
                        return self._file(rel)
                self._send(404, b"not found", "text/plain")

            def _file(self, rel: str):
                path = hub.root / rel
                if not path.is_file():
                    return self._send(404, b"not found", "text/plain")
                data = bytearray(path.read_bytes())
                if rel in hub.corrupt:
                    data[len(data) // 2] ^= 0xFF
                start = 0
                if "Range" in self.headers:
                    hub.ranges.append((rel, self.headers["Range"]))
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                body = bytes(data[start:])
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if rel in hub.interrupt and rel not in hub.cut:
                    hub.cut.add(rel)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.close()  # the client sees a short body
                    return
                self.wfile.write(body)

            def _send(self, code, body, ctype):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def tree(self, repo: str) -> list[dict]:
        out = []
        for p in sorted((self.root / repo).rglob("*")):
            if p.is_file():
                entry = {"type": "file", "path": str(p.relative_to(self.root / repo)), "size": p.stat().st_size}
                if p.suffix in (".bin", ".safetensors"):  # large files are LFS: the hub publishes their sha256
                    entry["lfs"] = {"oid": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
                out.append(entry)
        return out


@pytest.fixture()
def hub(tmp_path):
    """facebook/DiT-XL-2-256 as the hub lays it out (pickled .bin weights), made from the tiny fixture."""
    repo = tmp_path / "served" / "facebook" / "DiT-XL-2-256"
    shutil.copytree(FIXTURES / "tiny_dit_diffusers", repo)
    for sub in ("transformer", "vae"):
        st = repo / sub / "diffusion_pytorch_model.safetensors"
        torch.save(load_file(str(st)), repo / sub / "diffusion_pytorch_model.bin")
        st.unlink()
    (repo / "README.md").write_text("model card")
    original = tmp_path / "served" / "DiT" / "models"
    original.mkdir(parents=True)
    torch.save(load_file(str(FIXTURES / "tiny_dit.safetensors")), original / "DiT-XL-2-256x256.pt")
    server = FakeHub(tmp_path / "served")
    yield server
    server.server.shutdown()


def run(hub, tmp_path, name="DiT-XL-2-256"):
    return fetch(name, tmp_path / "weights", hub_url=hub.url, files_url=hub.url, progress=False)


def test_good_download_is_verified_converted_and_loads(hub, tmp_path, reference, capsys):
    assert dit_fetch(["DiT-XL-2-256", "--dest", str(tmp_path / "weights"), "--hub-url", hub.url, "--quiet"]) == 0
    folder = tmp_path / "weights" / "DiT-XL-2-256"
    assert "CC-BY-NC" in capsys.readouterr().out
    manifest = json.loads((folder / "manifest.json").read_text())
    weights = manifest["files"]["transformer/diffusion_pytorch_model.bin"]
    assert weights["sha256_from"] == "published" and weights["converted_to"].endswith(".safetensors")
    assert manifest["files"]["model_index.json"]["sha256_from"] == "computed"
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.part")) and not (folder / "README.md").exists()
    dit = load_dit(folder)  # the converted pipeline folder serves as it is
    out = dit(reference["fwd_x"], reference["fwd_t"], reference["fwd_y"])
    assert rel_err(out, reference["fwd_out"]) <= 1e-4
    assert verify("DiT-XL-2-256", tmp_path / "weights") == []
    assert dit_fetch(["DiT-XL-2-256", "--dest", str(tmp_path / "weights"), "--verify"]) == 0


def test_second_run_downloads_nothing(hub, tmp_path):
    run(hub, tmp_path)
    hub.ranges.clear()
    hub.corrupt.add("facebook/DiT-XL-2-256/transformer/diffusion_pytorch_model.bin")  # would fail if fetched again
    run(hub, tmp_path)


def test_corrupted_download_fails_and_leaves_nothing(hub, tmp_path):
    hub.corrupt.add("facebook/DiT-XL-2-256/transformer/diffusion_pytorch_model.bin")
    with pytest.raises(ChecksumError, match="does not match the published"):
        run(hub, tmp_path)
    tdir = tmp_path / "weights" / "DiT-XL-2-256" / "transformer"
    assert not list(tdir.glob("diffusion_pytorch_model*"))  # no final file, no .part


def test_interrupted_download_resumes(hub, tmp_path):
    rel = "facebook/DiT-XL-2-256/transformer/diffusion_pytorch_model.bin"
    hub.interrupt.add(rel)
    folder = run(hub, tmp_path)
    assert any(r == rel and v.startswith("bytes=") and v != "bytes=0-" for r, v in hub.ranges)
    assert verify("DiT-XL-2-256", tmp_path / "weights") == []
    assert load_dit(folder).config.depth == 2


def test_original_checkpoint_gets_a_computed_manifest_entry(hub, tmp_path):
    folder = run(hub, tmp_path, "DiT-XL-2-256-original")
    entry = json.loads((folder / "manifest.json").read_text())["files"]["DiT-XL-2-256x256.pt"]
    assert entry["sha256_from"] == "computed"
    converted = folder / entry["converted_to"]
    assert load_dit(converted, num_heads=2).config.hidden_size == 128
    converted.write_bytes(converted.read_bytes()[:-10])  # tampered with afterwards
    assert "differs from the manifest" in verify("DiT-XL-2-256-original", tmp_path / "weights")[0]


def test_unknown_name_and_unreachable_hub(tmp_path, capsys):
    with pytest.raises(SystemExit):
        dit_fetch(["DiT-XXL", "--dest", str(tmp_path)])
    assert dit_fetch(["sd-vae-ft-ema", "--dest", str(tmp_path), "--hub-url", "http://127.0.0.1:9", "--quiet"]) == 1
    assert "sd-vae-ft-ema" in capsys.readouterr().err
