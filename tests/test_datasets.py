"""Dataset jobs through the real server (server/service/datasets.py, server/http/routes/datasets.py): a
10 x 8 dataset in both formats, read back with the `webdataset` package and numpy; any image equals
/generate with its documented seed; shards served while the others are made; cancel; per-key isolation;
bad input named; and (slow) kill -9 mid-dataset: the restarted server finishes it, making only the shards
not yet written."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile

import httpx
import numpy as np
import pytest
from PIL import Image
from server_harness import run_server, wait_until

ALICE, BOB = "alice-key", "bob-key"
SAMPLING = {"sampler": "ddim", "steps": 6, "cfg_scale": 2.0, "seed": 77}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def seed_of(base: int, class_id: int, k: int) -> int:
    return base + class_id * 1_000_000 + k  # the README's rule


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("datasets"), env={"DIT_API_KEYS": json.dumps([ALICE, BOB])}) as s:
        yield s


@pytest.fixture(scope="module")
def alice(server):
    with server.client(headers={"X-API-Key": ALICE}) as c:
        yield c


def finished(c: httpx.Client, dataset_id: str, timeout: float = 120) -> dict:
    wait_until(lambda: c.get(f"/datasets/{dataset_id}").json()["status"] != "running", timeout, "the dataset")
    status = c.get(f"/datasets/{dataset_id}").json()
    assert status["status"] == "done", status
    return status


def test_a_webdataset_reads_back_and_each_image_is_generate_with_its_seed(alice, tmp_path):
    import webdataset as wds

    r = alice.post("/datasets", json={"classes": "all", "per_class": 8, "shard_size": 16, **SAMPLING})
    assert r.status_code == 202, r.text
    dataset = r.json()
    assert r.headers["location"] == f"/datasets/{dataset['id']}" and dataset["images_total"] == 80
    status = finished(alice, dataset["id"])
    assert status["shards_done"] == status["shards_total"] == 5 and status["images_done"] == 80
    manifest = alice.get(f"/datasets/{dataset['id']}/manifest").json()["shards"]
    paths = []
    for entry in manifest:
        data = alice.get(entry["url"]).content
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
        paths.append(tmp_path / entry["file"])
        paths[-1].write_bytes(data)
    samples = list(wds.WebDataset([str(p) for p in paths], shardshuffle=False).decode("pil"))
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)) == 80
    by_class = {}
    for s in samples:
        by_class.setdefault(s["json"]["class_id"], []).append(s["json"]["k"])
    assert all(sorted(ks) == list(range(8)) for ks in by_class.values()) and sorted(by_class) == list(range(10))
    for s in (samples[0], samples[37], samples[-1]):  # any image can be made again alone
        c, k = s["json"]["class_id"], s["json"]["k"]
        assert s["json"]["seed"] == seed_of(77, c, k)
        alone = alice.post("/generate", json={"class_id": c, "seed": seed_of(77, c, k), **{
            key: v for key, v in SAMPLING.items() if key != "seed"}})
        stored = np.asarray(s["png"].convert("RGB"), dtype=np.int16)
        assert np.abs(pixels(alone.content) - stored).max() <= 1


def test_an_npz_dataset_has_the_adm_suites_arrays(alice):
    r = alice.post("/datasets", json={"classes": [3, "bag"], "per_class": 5, "format": "npz", "shard_size": 100,
                                      **SAMPLING})
    status = finished(alice, r.json()["id"])
    assert status["shards_total"] == 1
    data = np.load(io.BytesIO(alice.get(f"/datasets/{status['id']}/shards/0").content))
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (10, 28, 28, 3)  # Fashion-MNIST size
    assert data["arr_1"].tolist() == [3] * 5 + [8] * 5


def test_a_dataset_belongs_to_its_key_and_is_cancelled_or_deleted(server, alice):
    r = alice.post("/datasets", json={"classes": "all", "per_class": 200, "shard_size": 50, "steps": 50})
    dataset_id = r.json()["id"]
    with server.client(headers={"X-API-Key": BOB}) as bob:
        assert bob.get(f"/datasets/{dataset_id}").status_code == 404
        assert all(d["id"] != dataset_id for d in bob.get("/datasets").json()["datasets"])
        assert bob.delete(f"/datasets/{dataset_id}").status_code == 404
    # an interactive request is served while the dataset runs: its samples join first
    assert alice.post("/generate", json={"class_id": 1, "steps": 3}).status_code == 200
    assert alice.delete(f"/datasets/{dataset_id}").json()["status"] == "cancelled"
    assert alice.get(f"/datasets/{dataset_id}").json()["status"] == "cancelled"
    assert alice.delete(f"/datasets/{dataset_id}").status_code == 200  # ended: deleted with its files
    assert alice.get(f"/datasets/{dataset_id}").status_code == 404


@pytest.mark.parametrize("body,field", [
    ({"classes": "all", "per_class": 8, "format": "zip"}, "format"),
    ({"classes": "all", "per_class": 8, "shard_size": 0}, "shard_size"),
    ({"classes": "all", "per_class": 10_000}, "per_class"),  # 100,000 images: above --max-dataset-images
    ({"classes": ["no such class"], "per_class": 8}, "classes"),
    ({"classes": "all", "per_class": 8, "colour": "red"}, "colour"),
])
def test_bad_datasets_are_422_naming_the_field(alice, body, field):
    r = alice.post("/datasets", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field, r.json()


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_stop_mid_dataset_then_restart_makes_only_the_missing_shards(tmp_path, stop):
    data = ["--data-dir", str(tmp_path / "store")]
    body = {"classes": "all", "per_class": 8, "shard_size": 8, **dict(SAMPLING, steps=40)}
    with run_server(tmp_path, *data) as s, s.client() as c:
        dataset_id = c.post("/datasets", json=body).json()["id"]
        wait_until(lambda: c.get(f"/datasets/{dataset_id}").json()["shards_done"] >= 2, 120, "two shards")
        s.proc.send_signal(stop)
        s.proc.wait(60)
    with run_server(tmp_path, *data) as s, s.client() as c:
        status = finished(c, dataset_id, timeout=240)
        made = s.metric("dit_dataset_images_total")  # images this process generated
        shards = [c.get(e["url"]).content for e in c.get(f"/datasets/{dataset_id}/manifest").json()["shards"]]
        before = int(re.search(rf"dataset {dataset_id} taken up: (\d+) of 10 shards", s.logs()).group(1))
    assert status["images_done"] == 80 and len(shards) == 10 and before >= 2
    assert made == 80 - 8 * before, (made, before)  # the shards written before the kill were not made again
    keys = [m.name for data in shards for m in tarfile.open(fileobj=io.BytesIO(data)).getmembers()]
    assert len(keys) == len(set(keys)) == 160  # 80 images, each a .png and a .json, no duplicate


@pytest.mark.slow
def test_the_cli_downloads_the_shards_and_resumes(server, tmp_path):
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "dit_client", "dataset", "--url", server.url, "--classes", "0,bag", "--per-class",
           "6", "--shard-size", "4", "--steps", "4", "--seed", "5", "--out", str(out), "--quiet"]
    env = dict(os.environ, DIT_API_KEY=ALICE)
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    shards = sorted(out.glob("shard-*.tar"))
    assert len(shards) == 3 and "3 shards, 12 images (3 shards fetched now)" in first.stdout
    names = [m.name for p in shards for m in tarfile.open(p).getmembers()]
    assert len(names) == 24 and "c0008_000005.png" in names
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)  # resumes: nothing to fetch
    assert again.returncode == 0 and "(0 shards fetched now)" in again.stdout, again.stderr


@pytest.mark.slow
def test_paused_background_samples_give_the_images_they_would_alone(alice):
    """Interactive requests beside a dataset make its samples pause (and resume) mid-denoising: its images
    are still those /generate makes alone."""
    import concurrent.futures as cf

    body = {"classes": [4, 5], "per_class": 8, "shard_size": 16, **dict(SAMPLING, steps=30, seed=9)}
    dataset_id = alice.post("/datasets", json=body).json()["id"]
    with cf.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda k: alice.post("/generate", json={"class_id": 1, "steps": 20, "seed": k}),
                                range(8)))
    assert all(a.status_code == 200 for a in answers)
    finished(alice, dataset_id)
    shard = tarfile.open(fileobj=io.BytesIO(alice.get(f"/datasets/{dataset_id}/shards/0").content))
    for name in ("c0004_000000.png", "c0004_000007.png", "c0005_000003.png"):
        c, k = int(name[1:5]), int(name[6:12])
        alone = alice.post("/generate", json={"class_id": c, "seed": seed_of(9, c, k), **{
            key: v for key, v in dict(SAMPLING, steps=30).items() if key != "seed"}})
        stored = pixels(shard.extractfile(name).read())
        assert np.abs(pixels(alone.content) - stored).max() <= 1, name


@pytest.mark.slow
def test_dit_eval_judges_the_shards_and_merges_them(alice, tmp_path):
    from conftest import require_installed

    from training.data import DEFAULT_DIR

    require_installed(DEFAULT_DIR.exists(), "Fashion-MNIST", "apt-get install dataset-fashion-mnist")
    r = alice.post("/datasets", json={"classes": "all", "per_class": 10, "shard_size": 50, **SAMPLING})
    status = finished(alice, r.json()["id"])
    for entry in alice.get(f"/datasets/{status['id']}/manifest").json()["shards"]:
        (tmp_path / entry["file"]).write_bytes(alice.get(entry["url"]).content)
    merged = tmp_path / "all.npz"
    run = subprocess.run([sys.executable, "-m", "dit_client.evaluate", str(tmp_path), "--merge", str(merged)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "evaluation.json").read_text())
    assert result["images"] == 100 and 0.5 < result["class_agreement"] <= 1 and result["feature_fid"] > 0, result
    data = np.load(merged)
    assert data["arr_0"].shape == (100, 28, 28, 3) and sorted(set(data["arr_1"].tolist())) == list(range(10))
