"""The HTTP API end to end: a real uvicorn process serving the embedded model, driven by httpx."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from server_harness import ROOT, run_server, wait_until


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # --max-steps 1000: the batch-mix test's companion outlasts its mix even where this process is starved
    with run_server(tmp_path_factory.mktemp("srv"), "--max-batch-rows", "64", "--max-steps", "1000") as s:
        yield s


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_image_has_the_model_size_and_metadata(server):
    with server.client() as c:
        r = c.post("/generate", json={"class_id": 7, "seed": 11, "steps": 10, "cfg_scale": 2.0})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(r.content))
        assert image.size == (28, 28) and image.mode == "RGB"
        params = json.loads(image.info["parameters"])
        assert params["class_id"] == 7 and params["seeds"] == [11] and params["steps"] == 10
        assert params["cfg_scale"] == 2.0 and params["class_name"] == "Sneaker"
        assert r.headers["x-seeds"] == "11" and r.headers["x-class-id"] == "7"
        assert "denoise;dur=" in r.headers["server-timing"]


def test_defaults_come_from_the_model(server):
    with server.client() as c:
        info = c.get("/info").json()
        r = c.post("/generate", json={"class_id": 0})
    d = info["defaults"]
    assert r.headers["x-sampler"] == d["sampler"] and r.headers["x-steps"] == str(d["steps"])
    assert float(r.headers["x-cfg-scale"]) == d["cfg_scale"]
    assert int(r.headers["x-seeds"]) >= 0  # a random seed, reported


def test_grid_and_json_answers(server):
    with server.client() as c:
        grid = c.post("/generate", json={"class_id": 1, "seed": 5, "num_images": 4, "steps": 5})
        as_json = c.post("/generate", json={"class_id": 1, "seed": 5, "num_images": 4, "steps": 5},
                         headers={"Accept": "application/json"})
    assert Image.open(io.BytesIO(grid.content)).size == (2 + 2 * 30, 2 + 2 * 30)
    assert grid.headers["x-seeds"] == "5,6,7,8"
    body = as_json.json()
    assert [im["seed"] for im in body["images"]] == [5, 6, 7, 8] and body["class_name"] == "Trouser"
    first = pixels(base64.b64decode(body["images"][0]["data"]))
    assert np.array_equal(first, pixels(grid.content)[2:30, 2:30])  # the grid's top-left cell
    assert set(body["timings"]) >= {"queue", "denoise", "decode", "encode", "total"}


@pytest.mark.parametrize("fmt,media", [("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_other_formats(server, fmt, media):
    with server.client() as c:
        r = c.post("/generate", json={"class_id": 2, "steps": 4, "format": fmt})
    assert r.headers["content-type"] == media and Image.open(io.BytesIO(r.content)).size == (28, 28)


def test_same_seed_same_bytes_alone(server):
    req = {"class_id": 4, "seed": 123, "steps": 12, "cfg_scale": 3.0, "sampler": "ddpm"}
    with server.client() as c:
        a, b = c.post("/generate", json=req), c.post("/generate", json=req)
    assert a.status_code == b.status_code == 200 and a.content == b.content


def test_same_seed_within_one_grey_level_in_any_batch_mix(server):
    req = {"class_id": 9, "seed": 77, "steps": 20, "cfg_scale": 2.5, "sampler": "ddpm"}
    with server.client() as c:
        alone = pixels(c.post("/generate", json=req).content)
    rng = random.Random(0)
    others = [{"class_id": rng.randrange(10), "seed": rng.randrange(10**6), "steps": rng.choice([5, 15, 30]),
               "cfg_scale": rng.choice([1.0, 1.5, 4.0]), "sampler": rng.choice(["ddpm", "ddim", "dpm-solver++"])}
              for _ in range(12)]
    with server.client() as c, cf.ThreadPoolExecutor(13) as pool:
        # A long companion runs before the target is sent and still runs after it is answered: the engine
        # steps every sample in flight in one batch, so each of the target's steps was one of its batches.
        companion = c.post("/jobs", json={"class_id": 0, "steps": 1000, "sampler": "ddim", "cfg_scale": 1.0}).json()
        wait_until(lambda: c.get(companion["status_url"]).json()["step"] > 0, 60, "the companion to run")
        futures = [pool.submit(c.post, "/generate", json=o) for o in others[:6]]
        target = pool.submit(c.post, "/generate", json=req)
        futures += [pool.submit(c.post, "/generate", json=o) for o in others[6:]]
        assert all(f.result().status_code == 200 for f in futures)
        mixed = pixels(target.result().content)
        after = c.delete(companion["status_url"]).json()
    assert after["status"] == "cancelled" and after["step"] < 1000  # it was still running: cancelled, not done
    assert np.abs(alone - mixed).max() <= 1


def test_32_concurrent_mixed_requests_share_forward_passes(server):
    rng = random.Random(1)
    reqs = [{"class_id": rng.randrange(10), "steps": rng.choice([10, 50]), "cfg_scale": rng.choice([1.0, 2.0]),
             "sampler": rng.choice(["ddpm", "ddim", "dpm-solver++"]), "seed": k} for k in range(32)]
    single_before = server.metric("dit_batch_size_bucket", 'le="1.0"')
    total_before = server.metric("dit_batch_size_count")
    with server.client() as c, cf.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda r: c.post("/generate", json=r), reqs))
    assert [a.status_code for a in answers] == [200] * 32
    forwards = server.metric("dit_batch_size_count") - total_before
    multi = forwards - (server.metric("dit_batch_size_bucket", 'le="1.0"') - single_before)
    assert multi > 0, "no forward pass advanced more than one sample"
    # 32 requests x up to 50 steps in far fewer forwards than one per sample-step.
    assert forwards < sum(r["steps"] for r in reqs) / 2


def test_guidance_interval_in_the_answer_the_png_and_info(server):
    req = {"class_id": 3, "seed": 8, "steps": 10, "cfg_scale": 3.0}
    with server.client() as c:
        default = c.get("/info").json()["defaults"]["guidance_interval"]
        plain = c.post("/generate", json=req)
        explicit = c.post("/generate", json=dict(req, guidance_interval=default))
        full = c.post("/generate", json=dict(req, guidance_interval=[0, 1]))
        narrow = c.post("/generate", json=dict(req, guidance_interval=[0.2, 0.6]),
                        headers={"Accept": "application/json"})
    assert plain.content == explicit.content  # omitted = the model's declared interval
    assert plain.headers["x-guidance-interval"] == "{:g},{:g}".format(*default)
    assert full.headers["x-guidance-interval"] == "0,1"
    assert narrow.headers["x-guidance-interval"] == "0.2,0.6" and narrow.json()["guidance_interval"] == [0.2, 0.6]
    image = base64.b64decode(narrow.json()["images"][0]["data"])
    assert json.loads(Image.open(io.BytesIO(image)).info["parameters"])["guidance_interval"] == [0.2, 0.6]
    assert not np.array_equal(pixels(image), pixels(full.content))


def test_step_cache_in_the_answer_the_png_the_job_and_info(server):
    req = {"class_id": 3, "seed": 8, "steps": 10, "cfg_scale": 3.0}
    custom = {"method": "reuse", "every": 3, "order": 0, "warmup": 1}
    with server.client() as c:
        info = c.get("/info").json()
        plain = c.post("/generate", json=req)  # the model's default cache
        named = c.post("/generate", json=dict(req, cache="features3g2"))
        off = c.post("/generate", json=dict(req, cache="off"))
        cached = c.post("/generate", json=dict(req, cache="taylor2"), headers={"Accept": "application/json"})
        job = c.post("/jobs", json=dict(req, cache={"method": "reuse", "every": 3, "warmup": 1})).json()
        wait_until(lambda: c.get(job["status_url"]).json()["status"] == "done", 60, "the cached job")
        status = c.get(job["status_url"]).json()
        result = c.get(job["result_url"])
    assert info["defaults"]["cache"] == "features3g2" and info["cache_presets"]["taylor2"]["method"] == "taylor"
    assert plain.content == named.content and plain.content != off.content
    assert json.loads(Image.open(io.BytesIO(plain.content)).info["parameters"])["cache"] == "features3g2"
    assert "cache" not in json.loads(Image.open(io.BytesIO(off.content)).info["parameters"])  # off: no cache named
    assert cached.json()["cache"] == "taylor2"
    image = base64.b64decode(cached.json()["images"][0]["data"])
    assert json.loads(Image.open(io.BytesIO(image)).info["parameters"])["cache"] == "taylor2"
    assert not np.array_equal(pixels(image), pixels(off.content))  # it skipped the network at some steps
    assert job["cache"] == custom and status["cache"] == custom
    assert json.loads(Image.open(io.BytesIO(result.content)).info["parameters"])["cache"] == custom


BAD_BODIES = [
    ({"class_id": 10}, "class_id"), ({"class_id": -1}, "class_id"), ({"class_id": "3"}, "class_id"),
    ({"class_id": 1.5}, "class_id"), ({}, "class_id"), ({"class_id": 1, "cfg_scale": 0.5}, "cfg_scale"),
    ({"class_id": 1, "cfg_scale": 1e9}, "cfg_scale"), ({"class_id": 1, "steps": 0}, "steps"),
    ({"class_id": 1, "steps": 100000}, "steps"), ({"class_id": 1, "sampler": "euler"}, "sampler"),
    ({"class_id": 1, "num_images": 0}, "num_images"), ({"class_id": 1, "num_images": 1000}, "num_images"),
    ({"class_id": 1, "format": "gif"}, "format"), ({"class_id": 1, "seed": -5}, "seed"),
    ({"class_id": 1, "seed": 2**70}, "seed"), ({"class_id": 1, "cfg": 3}, "cfg"),
    ({"class_id": 2**80}, "class_id"), ({"class_id": 1, "guidance_interval": [0.7, 0.2]}, "guidance_interval"),
    ({"class_id": 1, "guidance_interval": [0.5]}, "guidance_interval"),
    ({"class_id": 1, "cache": "fast"}, "cache"), ({"class_id": 1, "cache": 3}, "cache"),
    ({"class_id": 1, "cache": {"method": "taylor", "every": 2, "order": 5}}, "cache"),
    ({"class_id": 1, "cache": {"method": "reuse", "every": 2, "skip": 1}}, "cache"),
]


@pytest.mark.parametrize("body,field", BAD_BODIES, ids=[json.dumps(b) for b, _ in BAD_BODIES])
def test_bad_input_is_a_4xx_naming_the_field(server, body, field):
    with server.client() as c:
        r = c.post("/generate", json=body)
        assert 400 <= r.status_code < 500, r.text
        err = r.json()["error"]
        assert err["field"] == field and err["message"] and err["code"] == "invalid_request"
        assert c.get("/readyz").status_code == 200


@pytest.mark.parametrize("content,ctype", [(b"{not json", "application/json"), (b"[1, 2]", "application/json"),
                                           (b"class_id=3", "application/x-www-form-urlencoded"),
                                           (b"\xff\xfe", "application/json")])
def test_malformed_bodies(server, content, ctype):
    with server.client() as c:
        r = c.post("/generate", content=content, headers={"content-type": ctype})
        assert 400 <= r.status_code < 500 and "error" in r.json()
        assert c.get("/readyz").status_code == 200


def test_classes_info_docs_and_unknown_paths(server):
    with server.client() as c:
        classes = c.get("/classes").json()["classes"]
        assert [x["id"] for x in classes] == list(range(10)) and classes[9]["name"] == "Ankle boot"
        info = c.get("/info").json()
        assert info["image_size"] == 28 and info["policy"] == "continuous" and info["num_classes"] == 10
        assert c.get("/docs").status_code == 200
        schema = c.get("/openapi.json").json()
        assert schema["components"]["schemas"]["GenerateRequest"]["properties"]["steps"]["anyOf"][0]["maximum"] == 1000
        missing = c.get("/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert c.get("/healthz").json() == {"status": "alive"}


def test_metrics_exposed(server):
    with server.client() as c:
        c.post("/generate", json={"class_id": 3, "steps": 3})
        text = c.get("/metrics").text
    for name in ("dit_requests_total", "dit_request_duration_seconds_bucket", "dit_queue_wait_seconds_bucket",
                 "dit_queue_depth", "dit_active_samples", "dit_batch_size_bucket", "dit_step_duration_seconds_bucket",
                 "dit_decode_duration_seconds_bucket", "dit_encode_duration_seconds_bucket",
                 "dit_images_generated_total", "dit_denoise_steps_total", "dit_model_info"):
        assert name in text, name
    assert 'dit_model_info{device="cpu",dtype="float32",image_size="28"' in text


def test_help_lists_every_setting_with_its_env_name():
    out = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    from server.settings import Settings

    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in out and f"DIT_{name.upper()}" in out, name


def test_webhook_url_is_refused_without_a_secret(server):
    with server.client() as c:
        r = c.post("/jobs", json={"class_id": 1, "steps": 2, "webhook_url": "http://127.0.0.1:9/hook"})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "webhook_url" and "--webhook-secret" in err["message"]
    with server.client() as c:
        r = c.get("/webhooks/secret")
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_webhook_secret", r.text
