"""Dataset jobs through the real server (server/service/datasets.py, server/http/routes/datasets.py): a
10 x 8 dataset in both formats, read back with the `webdataset` package and numpy; any image equals
/generate with its documented seed; shards served while the others are made; progress as server-sent
events; a signed webhook at the end; the judge's figures with `evaluate`; cancel; per-key isolation; bad
input named; and (slow) kill -9 mid-dataset: the restarted server finishes it, making only the shards not
yet written; a webhook left undelivered by a kill is delivered after the restart; a full disk mid-dataset
fails it with its finished shards kept."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from server_harness import run_server, sse_events, wait_until
from webhook_receiver import Receiver, verify

ALICE, BOB = "alice-key", "bob-key"
SECRET = "whsec_" + "dGVzdC1zZWNyZXQtb2YtdGhpcy1zZXJ2ZXItMzItYnl0ZXM="  # base64 of 32 bytes
WEBHOOKS = ("--webhook-secret", SECRET, "--webhook-allow-hosts", '["127.0.0.1"]')
SAMPLING = {"sampler": "ddim", "steps": 6, "cfg_scale": 2.0, "seed": 77}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def seed_of(base: int, class_id: int, k: int) -> int:
    return base + class_id * 1_000_000 + k  # the README's rule


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    keys = {"DIT_API_KEYS": json.dumps([ALICE, BOB])}
    with run_server(tmp_path_factory.mktemp("datasets"), *WEBHOOKS, env=keys) as s:
        yield s


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.http.shutdown()


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
    ({"classes": "all", "per_class": 8, "webhook_url": "http://example.com/hook"}, "webhook_url"),  # not allowed
])
def test_bad_datasets_are_422_naming_the_field(alice, body, field):
    r = alice.post("/datasets", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field, r.json()


def events_of(c: httpx.Client, path: str) -> list[tuple[str, dict]]:
    """A server-sent event stream, read to its end: (event, data) pairs."""
    with c.stream("GET", path, headers={"Accept": "text/event-stream"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.status_code
        return sse_events(r)


def test_progress_streams_as_events_then_the_manifest(alice):
    dataset_id = alice.post("/datasets", json={"classes": [0, 1], "per_class": 16, "shard_size": 8,
                                               **dict(SAMPLING, steps=20)}).json()["id"]
    events = events_of(alice, f"/datasets/{dataset_id}")
    names = [name for name, _ in events]
    assert names[-1] == "result" and set(names[:-1]) == {"progress"}, names
    made = [data["images_generated"] for _, data in events[:-1]]
    assert made == sorted(made) and made[-1] == 32 and events[-2][1]["status"] == "done", made
    result = events[-1][1]
    assert result["id"] == dataset_id and [e["shard"] for e in result["shards"]] == [0, 1, 2, 3]
    assert len({tuple(e["replicas"]) for e in result["shards"]}) == 1 == len(result["shards"][0]["replicas"])
    # an ended dataset's stream: its last state and its result at once
    assert [name for name, _ in events_of(alice, f"/datasets/{dataset_id}")] == ["progress", "result"]


def test_a_dataset_with_a_webhook_is_delivered_signed_when_it_ends(alice, receiver):
    secret = alice.get("/webhooks/secret").json()["secret"]
    r = alice.post("/datasets", json={"classes": ["bag"], "per_class": 4, "shard_size": 4, "tag": "hooked",
                                      "webhook_url": receiver.url + "/ok", **SAMPLING})
    dataset_id = r.json()["id"]
    assert r.json()["webhook_state"] is None  # nothing to deliver until it ends
    delivery = receiver.wait_for(dataset_id, 1)[0]
    body = verify(delivery, secret)  # signed with alice's own secret, as her jobs' webhooks are
    assert delivery["headers"]["webhook-id"] == dataset_id
    assert (body["status"], body["images_done"], body["tag"]) == ("done", 4, "hooked"), body
    wait_until(lambda: alice.get(f"/datasets/{dataset_id}").json()["webhook_state"] == "delivered", 30,
               "the delivery to be recorded")


def test_evaluate_puts_the_judges_figures_in_the_status_and_manifest(alice, tmp_path):
    import torch
    from conftest import require_installed

    from training.data import DEFAULT_DIR
    from training.judge import judge, read_shards

    require_installed(DEFAULT_DIR.exists(), "Fashion-MNIST", "apt-get install dataset-fashion-mnist")
    r = alice.post("/datasets", json={"classes": "all", "per_class": 10, "shard_size": 50, "format": "npz",
                                      "evaluate": True, **SAMPLING})
    assert r.json()["evaluate"] == "judge" and r.json()["evaluation"] is None
    status = finished(alice, r.json()["id"])
    manifest = alice.get(f"/datasets/{status['id']}/manifest").json()
    evaluation = manifest["evaluation"]
    assert evaluation == status["evaluation"] and evaluation["images"] == 100, evaluation
    paths = []
    for entry in manifest["shards"]:
        paths.append(tmp_path / entry["file"])
        paths[-1].write_bytes(alice.get(entry["url"]).content)
    images, labels = read_shards(paths)  # the judge run here on the served shards says the same
    here = judge(torch.from_numpy(images), torch.from_numpy(labels))
    assert {k: evaluation[k] for k in here} == here and 0.5 < here["class_agreement"] <= 1


def test_evaluate_for_a_model_the_judge_does_not_know_writes_the_adm_suites_npz(tmp_path):
    """An ImageNet-class model (the tiny DiT fixture: 1000 classes, a VAE, 64x64 images): `evaluate` gives
    every image in the one .npz the ADM suite reads, equal to the shards' images in order."""
    from conftest import FIXTURES

    from training.judge import read_shard

    with run_server(tmp_path, "--model", str(FIXTURES / "tiny_dit_diffusers")) as s, s.client() as c:
        r = c.post("/datasets", json={"classes": [0, 5], "per_class": 3, "shard_size": 4, "steps": 4, "seed": 1,
                                      "evaluate": True})
        assert r.status_code == 202 and r.json()["evaluate"] == "adm", r.text
        status = finished(c, r.json()["id"])
        evaluation = status["evaluation"]
        assert evaluation["images"] == 6 and "evaluator.py VIRTUAL_imagenet64_labeled.npz" in evaluation["command"]
        adm = np.load(io.BytesIO(c.get(evaluation["adm_npz"]).content))
        shards = []
        for entry in c.get(f"/datasets/{status['id']}/manifest").json()["shards"]:
            shards.append(tmp_path / entry["file"])
            shards[-1].write_bytes(c.get(entry["url"]).content)
    images = np.concatenate([read_shard(p)[0] for p in shards])
    assert adm["arr_0"].dtype == np.uint8 and adm["arr_0"].shape == (6, 64, 64, 3)
    assert np.array_equal(adm["arr_0"], images) and adm["arr_1"].tolist() == [0, 0, 0, 5, 5, 5]


@pytest.mark.slow
def test_a_webhook_left_undelivered_by_a_kill_is_delivered_after_the_restart(tmp_path):
    receiver = Receiver()
    receiver.refusing = True  # 503: the server retries (1, 2, 4... s) until it is killed
    data = ["--data-dir", str(tmp_path / "store"), *WEBHOOKS]
    body = {"classes": [3], "per_class": 4, "shard_size": 4, "webhook_url": receiver.url + "/ok", **SAMPLING}
    try:
        with run_server(tmp_path, *data) as s, s.client() as c:
            dataset_id = c.post("/datasets", json=body).json()["id"]
            receiver.wait_for(dataset_id, 1)
            assert c.get(f"/datasets/{dataset_id}").json()["webhook_state"] == "pending"
            s.proc.kill()
            s.proc.wait(30)
        receiver.refusing = False
        with run_server(tmp_path, *data) as s, s.client() as c:
            wait_until(lambda: c.get(f"/datasets/{dataset_id}").json()["webhook_state"] == "delivered", 60,
                       "the webhook to be delivered after the restart")
        last = receiver.of(dataset_id)[-1]
        assert last["code"] == 200 and last["headers"]["webhook-id"] == dataset_id
        assert verify(last, SECRET)["status"] == "done"  # no API keys: the server's secret signs it
    finally:
        receiver.http.shutdown()


@pytest.mark.slow
def test_a_full_disk_fails_the_dataset_and_keeps_its_finished_shards(tmp_path):
    """The shards' folder is a 48 KiB tmpfs (mounted in a mount namespace of the server's own, as an
    unprivileged user can): two npz shards of eight 28x28 images (19 KB each) fit, the third does not."""
    import shutil

    from conftest import require_installed
    require_installed(shutil.which("unshare") is not None, "unshare", "apt-get install util-linux")
    store = tmp_path / "store"
    (store / "datasets").mkdir(parents=True)
    mount = ["unshare", "-r", "-m", "sh", "-c", 'mount -t tmpfs -o size=48k tmpfs "$0" && exec "$@"',
             str(store / "datasets")]
    with run_server(tmp_path, "--data-dir", str(store), "--judge-data", str(tmp_path / "none"), prefix=mount) as s, \
            s.client() as c:
        r = c.post("/datasets", json={"classes": "all", "per_class": 8, "format": "npz", "evaluate": True})
        assert r.status_code == 422 and r.json()["error"]["field"] == "evaluate", r.text  # no test set here
        body = {"classes": "all", "per_class": 8, "shard_size": 8, "format": "npz", **SAMPLING}
        dataset_id = c.post("/datasets", json=body).json()["id"]
        wait_until(lambda: c.get(f"/datasets/{dataset_id}").json()["status"] != "running", 120, "the dataset")
        status = c.get(f"/datasets/{dataset_id}").json()
        assert status["status"] == "failed" and f"[Errno {errno.ENOSPC}]" in status["error"], status
        assert "the finished shards stay" in status["error"]
        shards = c.get(f"/datasets/{dataset_id}/manifest").json()["shards"]
        assert len(shards) == status["shards_done"] == 2, shards
        for entry in shards:  # each served whole
            data = c.get(entry["url"]).content
            assert hashlib.sha256(data).hexdigest() == entry["sha256"]
            assert np.load(io.BytesIO(data))["arr_0"].shape == (8, 28, 28, 3)
        seen = sorted(p.name for p in (Path(f"/proc/{s.proc.pid}/root") / store.relative_to("/") / "datasets" /
                                       dataset_id).iterdir())  # the folder as the server sees it
        assert seen == ["shard-00000.npz", "shard-00001.npz"], seen  # no part of the third


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
