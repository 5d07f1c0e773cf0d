"""deploy/kubernetes/rayservice.yaml, offline: no cluster runs here, so what can be checked is checked. The
embedded Serve config goes through Ray's own schema and the builder's argument model; the RayService goes
through a small schema of KubeRay's (ray.io/v1) plus the rules that make it serve: GPUs where the engines
run, none on the head, room for the autoscaler, the weights mounted under the model's path.
`manifest_problems` names each thing wrong; mutated copies of the manifest show that it does."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path, PurePosixPath

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is not installed: make test installs it")
serve_schema = pytest.importorskip("ray.serve.schema", reason="Ray is not installed: make test installs it")

MANIFEST = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes" / "rayservice.yaml"
BUILDER = "server.ray_app:build"
GPU = "nvidia.com/gpu"

# The fields of KubeRay's RayService that this deployment needs, written from KubeRay's API reference
# (RayServiceSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec): a dotted path -> the type of its value.
RAYSERVICE = {
    "apiVersion": str, "kind": str, "metadata.name": str, "spec.serveConfigV2": str,
    "spec.rayClusterConfig.headGroupSpec.rayStartParams": dict,
    "spec.rayClusterConfig.headGroupSpec.template.spec.containers": list,
    "spec.rayClusterConfig.workerGroupSpecs": list,
}
WORKER_GROUP = {"groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int, "rayStartParams": dict,
                "template.spec.containers": list}
CONTAINER = {"name": str, "image": str}
_MISSING = object()


def _get(node, path: str):
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _schema_problems(node, schema: dict, where: str) -> list[str]:
    problems = []
    for path, kind in schema.items():
        value = _get(node, path)
        if value is _MISSING:
            problems.append(f"{where}{path}: missing")
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            problems.append(f"{where}{path}: expected {kind.__name__}, got {type(value).__name__}")
    return problems


# ---- the checker ----------------------------------------------------------------------------------------
def manifest_problems(doc: dict) -> list[str]:
    """Everything wrong with a RayService document for dit-serve, one line each (empty: none found)."""
    from server.transport.ray.args import parse_args

    problems = _structure(doc)
    if problems:
        return problems  # the rules below read these fields
    cluster = doc["spec"]["rayClusterConfig"]
    problems = _pods(cluster)
    try:
        config = serve_schema.ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    except (yaml.YAMLError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        return problems + [f"serveConfigV2: not a Serve config: {e}"]
    serve_port = [p.get("containerPort") for p in _ray_container(cluster["headGroupSpec"]).get("ports", [])
                  if p.get("name") == "serve"]
    if serve_port != [config.http_options.port]:
        problems.append(f"head: needs a container port named serve = http_options.port "
                        f"{config.http_options.port} (KubeRay builds the serve Service from it), got {serve_port}")
    for app in config.applications:
        where = f"serveConfigV2 application {app.name!r}"
        target = _resolve(app.import_path)
        if target is not _resolve(BUILDER):
            problems.append(f"{where}: import_path {app.import_path!r} does not name {BUILDER} ({target!r})")
        args, store = dict(app.args), _head_store(cluster)
        if store is not None and "job_store" not in args:  # the builder reads DIT_JOB_STORE on the head
            args["job_store"] = store
        if "job_store" in app.args:
            problems.append(f"{where}: job_store holds the database's password: give it as DIT_JOB_STORE from a "
                            "Secret on the head instead")
        try:
            fleet, settings = parse_args(args)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        problems += _fleet_fits(cluster, fleet, settings)
    return problems


def _structure(doc: dict) -> list[str]:
    problems = _schema_problems(doc, RAYSERVICE, "")
    if (doc.get("apiVersion"), doc.get("kind")) != ("ray.io/v1", "RayService"):
        problems.append(f"expected apiVersion ray.io/v1 and kind RayService, got {doc.get('apiVersion')}, "
                        f"{doc.get('kind')}")
    if problems:
        return problems
    cluster = doc["spec"]["rayClusterConfig"]
    for i, group in enumerate(cluster["workerGroupSpecs"]):
        problems += _schema_problems(group, WORKER_GROUP, f"workerGroupSpecs[{i}].")
    if problems:
        return problems
    for name, group in _groups(cluster):
        for key, value in group["rayStartParams"].items():
            if not isinstance(value, str):  # map[string]string: the API server refuses a number
                problems.append(f"{name}: rayStartParams.{key} must be a string, got {value!r}")
        for container in group["template"]["spec"]["containers"]:
            problems += _schema_problems(container, CONTAINER, f"{name}: container ")
    for name, group in _groups(cluster)[1:]:
        if not group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]:
            problems.append(f"{name}: needs minReplicas <= replicas <= maxReplicas, got "
                            f"{group['minReplicas']}, {group['replicas']}, {group['maxReplicas']}")
    return problems


def _pods(cluster: dict) -> list[str]:
    """Rules on the pods alone: one image, GPUs on the workers and not on the head, autoscaling on."""
    problems = []
    groups = _groups(cluster)
    images = {c["image"] for _, g in groups for key in ("containers", "initContainers")
              for c in g["template"]["spec"].get(key, [])}
    if len(images) != 1:
        problems.append(f"every Ray pod's containers must run one image (the dit-serve image), got {sorted(images)}")
    for name, group in groups:
        env = {e.get("name"): e.get("value") for e in _ray_container(group).get("env", [])}
        if env.get("RAY_USAGE_STATS_ENABLED") != "0":
            problems.append(f"{name}: the Ray container needs env RAY_USAGE_STATS_ENABLED: \"0\"")
    head = groups[0][1]
    if head["rayStartParams"].get("num-cpus") != "0" or _gpus(head):
        problems.append("head: needs rayStartParams num-cpus: \"0\" and no GPU, so that no engine replica lands there")
    for name, group in groups[1:]:
        resources = _ray_container(group).get("resources", {})
        for part in ("limits", "requests"):
            if str(resources.get(part, {}).get(GPU)) != "1":
                problems.append(f"{name}: the Ray container's resources.{part} need {GPU}: 1 (one engine per GPU)")
        given = group["rayStartParams"].get("num-gpus")
        if given is not None and GPU in resources.get("limits", {}) and given != str(resources["limits"][GPU]):
            problems.append(f"{name}: rayStartParams num-gpus {given} differs from the {GPU} limit")
    if cluster.get("enableInTreeAutoscaling") is not True:
        problems.append("rayClusterConfig.enableInTreeAutoscaling must be true: worker pods follow Serve's replicas")
    return problems


def _head_store(cluster: dict) -> str | None:
    """A stand-in for the job store URL when the head's DIT_JOB_STORE comes from a Secret (else None)."""
    for var in _ray_container(cluster["headGroupSpec"]).get("env", []):
        if var.get("name") == "DIT_JOB_STORE" and "secretKeyRef" in var.get("valueFrom", {}):
            return "postgresql+psycopg://from-the-secret/db"
    return None


def _fleet_fits(cluster: dict, fleet, settings) -> list[str]:
    """The builder's fleet against the worker groups: each replica fits a pod, the autoscaler can reach
    max_replicas, no GPU is held that no replica can use, and the weights are mounted where engines run."""
    problems, workers = [], _groups(cluster)[1:]
    needed = fleet.max_replicas * fleet.gpus_per_replica
    if sum(g["maxReplicas"] * _gpus(g) for _, g in workers) < needed:
        problems.append(f"worker groups: maxReplicas x GPUs per pod must reach max_replicas x gpus_per_replica = "
                        f"{needed:g}, or the autoscaler cannot start the replicas Serve asks for")
    if sum(g["minReplicas"] * _gpus(g) for _, g in workers) > needed:
        problems.append(f"worker groups: minReplicas hold more GPUs than max_replicas x gpus_per_replica = {needed:g}")
    for name, group in workers:
        if _gpus(group) < fleet.gpus_per_replica or _cpus(group) < fleet.cpus_per_replica:
            problems.append(f"{name}: a pod ({_gpus(group)} GPU, {_cpus(group):g} CPU for Ray) cannot hold an engine "
                            f"replica ({fleet.gpus_per_replica:g} GPU, {fleet.cpus_per_replica:g} CPU)")
        for path in (settings.model, settings.vae):
            if path is not None and not _on_a_claim(group, PurePosixPath(path)):
                problems.append(f"{name}: {path} is not under a PersistentVolumeClaim mounted in the Ray container")
    return problems


def _groups(cluster: dict) -> list[tuple[str, dict]]:
    return [("head", cluster["headGroupSpec"])] + [
        (f"worker group {g['groupName']!r}", g) for g in cluster["workerGroupSpecs"]]


def _ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs `ray start` in the first container


def _gpus(group: dict) -> float:
    limit = _ray_container(group).get("resources", {}).get("limits", {}).get(GPU, 0)
    return float(group["rayStartParams"].get("num-gpus", limit))


def _cpus(group: dict) -> float:
    quantity = str(group["rayStartParams"].get(
        "num-cpus", _ray_container(group).get("resources", {}).get("limits", {}).get("cpu", 0)))
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _on_a_claim(group: dict, path: PurePosixPath) -> bool:
    volumes = {v.get("name"): v for v in group["template"]["spec"].get("volumes", [])}
    return any(path.is_relative_to(m.get("mountPath", "")) and "persistentVolumeClaim" in volumes.get(m.get("name"), {})
               for m in _ray_container(group).get("volumeMounts", []))


def _resolve(import_path: str):
    module, _, name = import_path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        return e


# ---- the shipped manifest ---------------------------------------------------------------------------------
def _documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


def test_the_shipped_rayservice_has_no_problems():
    assert manifest_problems(_documents()["RayService"]) == []


def _worker(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


def _edit_app(doc: dict, edit) -> None:
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    edit(config["applications"][0])
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(config)


MUTATIONS = {  # name -> (how to break a copy, words its problem must contain)
    "GPU limit removed": (lambda d: _ray_container(_worker(d))["resources"]["limits"].pop(GPU),
                          f"resources.limits need {GPU}: 1"),
    "wrong import path": (lambda d: _edit_app(d, lambda app: app.update(import_path="server.ray_app:bulid")),
                          "import_path 'server.ray_app:bulid' does not name server.ray_app:build"),
    "unknown builder argument": (lambda d: _edit_app(d, lambda app: app["args"].update(max_replica=8)),
                                 "max_replica: unknown argument"),
    "too few workers for max_replicas": (lambda d: _worker(d).update(maxReplicas=2), "cannot start the replicas"),
    "replicas above maxReplicas": (lambda d: _worker(d).update(replicas=9), "minReplicas <= replicas <= maxReplicas"),
    "engines may land on the head": (lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
                                     .pop("num-cpus"), "no engine replica lands there"),
    "weights not mounted": (lambda d: _ray_container(_worker(d)).pop("volumeMounts"),
                            "/weights/DiT-XL-2-256 is not under a PersistentVolumeClaim"),
    "two images": (lambda d: _ray_container(_worker(d)).update(image="rayproject/ray:2.60.0"), "one image"),
    "autoscaling off": (lambda d: d["spec"]["rayClusterConfig"].pop("enableInTreeAutoscaling"),
                        "enableInTreeAutoscaling must be true"),
    "a number in rayStartParams": (lambda d: _worker(d)["rayStartParams"].update({"num-gpus": 1}),
                                   "rayStartParams.num-gpus must be a string"),
    "no serveConfigV2": (lambda d: d["spec"].pop("serveConfigV2"), "spec.serveConfigV2: missing"),
    "two front-ends without a shared store": (
        lambda d: _ray_container(d["spec"]["rayClusterConfig"]["headGroupSpec"]).pop("env"),
        "frontend_replicas=2 needs a job store every front-end reaches"),
    "the store's password in the config": (
        lambda d: _edit_app(d, lambda app: app["args"].update(job_store="postgresql+psycopg://u:pw@db/dit")),
        "give it as DIT_JOB_STORE from a Secret"),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_broken_copy_is_named(mutation):
    doc = copy.deepcopy(_documents()["RayService"])
    breaks, expected = MUTATIONS[mutation]
    breaks(doc)
    problems = manifest_problems(doc)
    assert any(expected in problem for problem in problems), problems


def test_the_weights_are_fetched_into_the_volume_the_workers_mount():
    """The Job writes what the Serve args load, into the claim the workers mount, with the same image; the
    workers' init container checks the same names before Ray starts."""
    docs = _documents()
    claim, job, service = docs["PersistentVolumeClaim"], docs["Job"]["spec"]["template"]["spec"], docs["RayService"]
    assert set(claim["spec"]["accessModes"]) & {"ReadWriteMany", "ReadOnlyMany"}  # many pods read it at once
    worker = _worker(service)["template"]["spec"]
    for pod in (job, worker):
        assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]] == [claim["metadata"]["name"]]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    model = PurePosixPath(app["args"]["model"])
    (fetch,), (check,) = job["containers"], worker["initContainers"]
    assert fetch["image"] == check["image"] == _ray_container(_worker(service))["image"]
    for command in (fetch["command"], check["command"]):
        dest = PurePosixPath(command[command.index("--dest") + 1])
        assert command[0] == "dit-fetch" and model.relative_to(dest).parts[0] in command, command
    assert "--verify" in check["command"] and not fetch["volumeMounts"][0].get("readOnly")


def test_prometheus_scrapes_the_fleet_once_as_job_dit_serve():
    """Every proxy answers /metrics with the whole fleet's series, so the ServiceMonitor picks the one Service
    with one pod behind it: the head Service KubeRay labels with this RayService's name."""
    docs = _documents()
    monitor, name = docs["ServiceMonitor"]["spec"], docs["RayService"]["metadata"]["name"]
    assert monitor["selector"]["matchLabels"] == {"ray.io/originated-from-crd": "RayService",
                                                  "ray.io/originated-from-cr-name": name, "ray.io/node-type": "head"}
    (endpoint,) = monitor["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("serve", "/metrics")
    assert {"targetLabel": "job", "replacement": "dit-serve"} in endpoint["relabelings"]  # alerts.yml's job
