"""What the README and the deploy files promise, checked against the real thing: the README's quick-start
commands run as written against a real server, its metrics table against that server's /metrics, the
compose file's settings reaching a real server, Ray Serve's addresses and ports, and `dit-generate --help`
against the embedded model's declared defaults."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from conftest import require_installed
from PIL import Image
from server_harness import ROOT, free_port, run_server, wait_until
from standardwebhooks import Webhook

from server.http.auth import key_owner
from server.http.webhooks import key_secret
from server.settings import Settings

README = (ROOT / "README.md").read_text()
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a Standard Webhooks secret (24 bytes)
COMPOSE_FILE = ROOT / "docker-compose.yml"
VENV_BIN = ROOT / ".venv" / "bin"


def readme_block(containing: str) -> str:
    """The README's one ```sh block that contains `containing`."""
    blocks = [b for b in re.findall(r"```sh\n(.*?)```", README, re.S) if containing in b]
    assert len(blocks) == 1, f"README has {len(blocks)} sh blocks containing {containing!r}"
    return blocks[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The embedded model as `make serve` serves it (no keys, the model's defaults)."""
    with run_server(tmp_path_factory.mktemp("docs")) as s:
        yield s


# ---- item 8: the commands `make` installs, on PATH as the README says ---------------------------------


def run_shell(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """`script` in bash, with a PATH that holds none of the project's commands (a fresh login shell's)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def checkout_copy(tmp_path: Path) -> Path:
    """A folder that looks like the checkout to the README's commands (its .venv), where they may write."""
    if not (VENV_BIN / "dit-generate").exists():
        pytest.skip("no .venv in the checkout: `make install` makes it (these tests run the README's commands)")
    home = tmp_path / "checkout"
    home.mkdir()
    (home / ".venv").symlink_to(ROOT / ".venv")
    return home


def test_the_quick_start_commands_run_as_written(server, tmp_path):
    """The README's second-shell block, as written, bar the server's address (the test server's port):
    after `. .venv/bin/activate` the three commands are found, and dit-generate gets the curl's image."""
    home = checkout_copy(tmp_path)
    assert run_shell("command -v dit-generate", home).returncode != 0  # what the issue saw: not on PATH
    block = readme_block(". .venv/bin/activate")
    assert "dit-generate sneaker" in block and "dit-generate --list-classes" in block
    script = re.sub(r"^dit-generate ", f"dit-generate --url {server.url} ", block, flags=re.M)
    out = run_shell(script + "command -v dit-serve dit-fetch dit-generate\n", home)
    assert out.returncode == 0, out.stderr
    found = out.stdout.strip().splitlines()[-3:]
    assert found == [str(ROOT / ".venv" / "bin" / name) for name in ("dit-serve", "dit-fetch", "dit-generate")]
    assert "7\tSneaker" in out.stdout  # --list-classes

    curl_block = readme_block("-o sneaker.png")  # the quick start's curl, same request
    (tmp_path / "curl").mkdir()
    out = run_shell(curl_block.replace("localhost:8000", server.url.removeprefix("http://")), tmp_path / "curl")
    assert out.returncode == 0, out.stderr
    assert '"class_name"' in out.stdout and '"dit_requests_total' not in out.stdout  # JSON, classes, info...
    pixels = [np.asarray(Image.open(folder / "sneaker.png")) for folder in (home, tmp_path / "curl")]
    assert pixels[0].shape == pixels[1].shape and (pixels[0] == pixels[1]).all()


def test_the_readme_writes_the_commands_bare_only_after_saying_how():
    """Each bare use of a command comes after the README says how to put it on PATH."""
    told = README.index(". .venv/bin/activate")
    for name in ("dit-serve", "dit-generate", "dit-fetch"):
        first = README.index(f"{name} ")
        assert first > told or README[first - len(".venv/bin/"):first] == ".venv/bin/", name


# ---- item 10: the compose file ----------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class ComposeError(Exception):
    pass


def read_env_file(text: str) -> dict[str, str]:
    """A .env file as compose reads it: KEY=VALUE lines; # comments; quotes around a value removed."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = value.split(" #", 1)[0].strip()
        env[key.strip()] = value
    return env


def interpolate(node, env: dict[str, str]):
    """Compose's interpolation (${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $$)
    over every string of the parsed file."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        value = env.get(name)
        missing = value is None or (op is not None and op.startswith(":") and value == "")
        if op in ("-", ":-"):
            return arg if missing else value
        if op in ("?", ":?"):
            if missing:
                raise ComposeError(f"required variable {name} is missing a value: {arg}")
            return value
        return value or ""

    return _VARIABLE.sub(one, node)


def compose(env: dict[str, str]) -> dict:
    """docker-compose.yml with these variables (anchors and merge keys resolved by YAML)."""
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env)


def env_from_example(**changes: str) -> dict[str, str]:
    """.env.example as a user copies it, with the changes they make."""
    return read_env_file((ROOT / ".env.example").read_text()) | changes


GOOD_PASSWORD = "a long and private passphrase"
# What each server service sets itself, not from .env: the image fixes the address and port.
FIXED = {"dit": {"host", "port", "data_dir", "probe_port"},
         "dit-cpu": {"host", "port", "data_dir", "probe_port", "model", "vae", "device"}}


@pytest.mark.parametrize("service", ["dit", "dit-cpu"])
def test_every_setting_in_env_reaches_the_server(service, tmp_path):
    keys = tmp_path / "keys.txt"
    given = {f"DIT_{name.upper()}": f"value-of-{name}" for name in Settings.model_fields}
    given["DIT_API_KEYS_FILE"] = str(keys)
    spec = compose(env_from_example(GRAFANA_ADMIN_PASSWORD=GOOD_PASSWORD, **given))["services"][service]
    environment = spec["environment"]
    for name in Settings.model_fields:
        var = f"DIT_{name.upper()}"
        if name in FIXED[service]:
            assert environment.get(var) != given[var], f"{service}: {var} comes from .env, but the service owns it"
        elif name == "api_keys_file":  # a file on the host, mounted where the variable points
            assert f"{keys}:{environment[var]}:ro" in spec["volumes"], spec["volumes"]
        else:
            assert environment.get(var) == given[var], f"{service}: {var} in .env does not reach the server"
    assert set(environment) <= {f"DIT_{name.upper()}" for name in Settings.model_fields}  # no misspelled name


def test_unset_settings_are_the_servers_defaults():
    """.env.example as copied sets none of them: each arrives empty, which the server reads as unset."""
    spec = compose(env_from_example(GRAFANA_ADMIN_PASSWORD=GOOD_PASSWORD))["services"]["dit-cpu"]
    given = {k: v for k, v in spec["environment"].items() if v not in ("", None)}
    assert given == {"DIT_API_KEYS_FILE": "/run/secrets/dit-api-keys", "DIT_DEVICE": "cpu", "DIT_PROBE_PORT": "8001"}
    assert "/dev/null:/run/secrets/dit-api-keys:ro" in spec["volumes"]  # no file: an empty one, no keys
    # The job store is in the image's /data (DIT_DATA_DIR), which belongs to the server's user, so that
    # Docker gives a new volume there that user's ownership.
    assert "data:/data" in spec["volumes"] and "data" in yaml.safe_load(COMPOSE_FILE.read_text())["volumes"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "chown dit:dit /app /weights /data" in dockerfile and "DIT_DATA_DIR=/data" in dockerfile
    assert "\nUSER dit\n" in dockerfile


class Receiver(http.server.BaseHTTPRequestHandler):
    deliveries: list[tuple[dict, bytes]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.deliveries.append((dict(self.headers), body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_keys_and_webhook_secret_in_env_reach_a_real_server(tmp_path):
    """The compose service's environment, resolved from a .env that sets keys (inline and in a file) and a
    webhook secret, given to the real server with the key file where the compose file mounts it."""
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    keys = tmp_path / "keys.txt"
    keys.write_text("# one key per line\nkey-from-file\n")
    env = env_from_example(GRAFANA_ADMIN_PASSWORD=GOOD_PASSWORD, DIT_API_KEYS="key-inline", DIT_API_KEYS_FILE=str(keys),
                           DIT_WEBHOOK_SECRET=SECRET, DIT_WEBHOOK_ALLOW_HOSTS="127.0.0.1")
    spec = compose(env)["services"]["dit-cpu"]
    mounts = {v.removesuffix(":ro").split(":")[1]: v.split(":")[0] for v in spec["volumes"]}  # target -> source
    server_env = {k: ("" if v is None else str(v)) for k, v in spec["environment"].items()}
    server_env["DIT_API_KEYS_FILE"] = mounts[server_env["DIT_API_KEYS_FILE"]]
    body = {"class_id": 1, "steps": 2, "seed": 5}
    try:
        with run_server(tmp_path, env=server_env) as s, s.client() as c:
            assert c.post("/generate", json=body).status_code == 401
            for key in ("key-inline", "key-from-file"):
                assert c.post("/generate", json=body, headers={"X-API-Key": key}).status_code == 200, key
            hook = f"http://127.0.0.1:{receiver.server_port}/hook"
            job = c.post("/jobs", json=body | {"webhook_url": hook}, headers={"X-API-Key": "key-inline"})
            assert job.status_code == 202, job.text
            wait_until(lambda: Receiver.deliveries, 60, "the webhook delivery")
    finally:
        receiver.shutdown()
    headers, raw = Receiver.deliveries[0]
    Webhook(key_secret(SECRET, key_owner(b"key-inline"))).verify(raw, headers)  # the key's own secret signed it


def published(spec: dict) -> list[str]:
    return [str(p) for p in spec.get("ports", [])]


def test_ports_are_published_on_loopback_unless_env_says_otherwise():
    services = compose(env_from_example(GRAFANA_ADMIN_PASSWORD=GOOD_PASSWORD))["services"]
    assert published(services["dit"]) == ["127.0.0.1:8000:8000"]
    assert published(services["dit-cpu"]) == ["127.0.0.1:8000:8000"]
    assert published(services["prometheus"]) == ["127.0.0.1:9090:9090"]
    assert published(services["grafana"]) == ["127.0.0.1:3000:3000"]
    assert all(published(spec) == [] for name, spec in services.items()
               if name not in ("dit", "dit-cpu", "prometheus", "grafana"))
    exposed = compose(env_from_example(GRAFANA_ADMIN_PASSWORD=GOOD_PASSWORD, PUBLISH_ADDRESS="0.0.0.0",
                                       DIT_PORT="8080"))["services"]
    assert published(exposed["dit"]) == ["0.0.0.0:8080:8000"]
    assert published(exposed["prometheus"]) == ["127.0.0.1:9090:9090"]  # no login: stays on loopback
    for word in ("PUBLISH_ADDRESS", "MONITORING_ADDRESS", "API keys"):
        assert word in README.split("## Deploy on a GPU host")[1].split("## Scale out")[0], word


def test_compose_file_has_no_obsolete_version():
    assert "version" not in yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.mark.parametrize("password", ["change-me", "CHANGE-ME", "admin", "short-pw", ""])
def test_grafana_refuses_a_placeholder_password(password):
    """The check the compose file runs before Grafana's own entrypoint, run here with sh."""
    spec = compose(env_from_example(GRAFANA_ADMIN_PASSWORD=GOOD_PASSWORD))["services"]["grafana"]
    sh, script, entrypoint = spec["entrypoint"]
    assert sh == "sh" and entrypoint == "/run.sh"
    (host_path,) = [v.split(":")[0] for v in spec["volumes"] if v.split(":")[1] == script]
    guard = ROOT / host_path
    refused = subprocess.run(["sh", str(guard), "echo", "started"], capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"], "GF_SECURITY_ADMIN_PASSWORD": password})
    assert refused.returncode == 1 and "started" not in refused.stdout
    assert "GRAFANA_ADMIN_PASSWORD" in refused.stderr
    started = subprocess.run(["sh", str(guard), "echo", "started"], capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"], "GF_SECURITY_ADMIN_PASSWORD": GOOD_PASSWORD})
    assert started.returncode == 0 and started.stdout == "started\n"


def test_env_example_as_copied_stops_compose_until_the_password_is_set():
    with pytest.raises(ComposeError, match="GRAFANA_ADMIN_PASSWORD"):
        compose(env_from_example())
    assert env_from_example()["GRAFANA_ADMIN_PASSWORD"] == ""


def test_the_real_docker_compose_agrees(tmp_path):
    """Where docker-compose is installed: it reads the file and .env the same way."""
    tool = shutil.which("docker-compose")
    require_installed(tool is not None, "docker-compose", "apt-get install docker-compose")
    env_file = tmp_path / ".env"
    env_file.write_text((ROOT / ".env.example").read_text() + f"\nGRAFANA_ADMIN_PASSWORD={GOOD_PASSWORD}\n"
                        "DIT_API_KEYS=k1,k2\nDIT_WEBHOOK_SECRET=s\nDIT_MAX_STEPS=77\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DIT_", "GRAFANA_", "PUBLISH", "MONITORING"))}
    out = subprocess.run([tool, "-f", str(COMPOSE_FILE), "--env-file", str(env_file), "--profile", "cpu", "config"],
                         cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    real = yaml.safe_load(out.stdout)["services"]
    ours = compose(read_env_file(env_file.read_text()))["services"]
    for name in ("dit", "dit-cpu"):
        assert {k: str(v or "") for k, v in real[name]["environment"].items()} == \
               {k: str(v or "") for k, v in ours[name]["environment"].items()}
        assert real[name]["environment"]["DIT_API_KEYS"] == "k1,k2"


# ---- item 11: docs that drifted -----------------------------------------------------------------------


def metrics_table() -> dict[str, str]:
    """The README's Metrics table: {name: type}."""
    section = README.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    table = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip("|").split("|")]
        if row.startswith("| `dit_"):
            for name in re.findall(r"`(dit_\w+)`", cells[0]):
                table[name] = cells[1]
    return table


RAY_ONLY = {"dit_fleet_replicas", "dit_fleet_replicas_target"}
CUDA_ONLY = {"dit_gpu_memory_allocated_bytes", "dit_gpu_memory_reserved_bytes", "dit_gpu_memory_peak_allocated_bytes"}


def test_the_metrics_table_lists_what_the_server_exports(server):
    text = httpx.get(server.url + "/metrics", timeout=10).text
    exported = dict(re.findall(r"^# TYPE (dit_\w+) (\w+)$", text, re.M))
    table = metrics_table()
    for name, kind in exported.items():
        documented = name if name in table else name.removesuffix("_total")  # counters: TYPE drops _total
        documented = documented if documented in table else documented + "_total"
        assert documented in table, f"/metrics exports {name}, which the README's Metrics table lacks"
        assert table[documented].startswith(kind), f"{name}: the README says {table[documented]}, it is a {kind}"
    exported_names = set(exported) | {n + "_total" for n, k in exported.items() if k == "counter"}
    assert set(table) - RAY_ONLY - CUDA_ONLY <= exported_names, "the README lists metrics the server lacks"
    assert {"dit_requests_admitted_total", "dit_engine_up"} <= set(table)


def test_dit_generate_help_states_the_embedded_models_interval(server):
    cli = Path(sys.executable).parent / "dit-generate"
    cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "dit_client"]
    out = subprocess.run([*cmd, "--help"], env=dict(os.environ, COLUMNS="1000"), capture_output=True, text=True,
                         check=True, timeout=60).stdout
    line = " ".join(out.split("\n  --guidance-interval LO HI", 1)[1].split("\n  --seed")[0].split())
    lo, hi = httpx.get(server.url + "/info", timeout=10).json()["defaults"]["guidance_interval"]
    assert f"{lo:g} {hi:g} for the embedded model" in line and "usually" not in line, line


# ---- item 9: Ray Serve, what listens where and how to pick the port ------------------------------------

RAY_SECTION = README.split("\n## Scale out on Ray Serve\n", 1)[1].split("\n## ", 1)[0]


def test_the_port_is_picked_in_a_serve_config_as_the_readme_says():
    """`serve run` has no --port; the README's way, a config file's http_options, passes Ray's schema and
    the builder, and `serve run` of that file is what the README shows."""
    serve_schema = pytest.importorskip("ray.serve.schema", reason="Ray is not installed: make test installs it")
    from click.testing import CliRunner
    from ray.serve.scripts import cli

    from server.transport.ray.args import parse_args

    help_text = CliRunner().invoke(cli, ["run", "--help"]).output
    assert "--port" not in help_text and "--host" not in help_text  # what the README says of `serve run`
    assert "serve run deploy/ray/local.yaml" in RAY_SECTION and "`http_options.port`" in RAY_SECTION
    config = serve_schema.ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy/ray/local.yaml").read_text()))
    assert (config.http_options.host, config.http_options.port) == ("127.0.0.1", 8000)
    (app,) = config.applications
    fleet, settings = parse_args(app.args)
    assert app.import_path == "server.ray_app:build" and fleet.min_replicas == 2 and settings.threads == 1
    edited = yaml.safe_load((ROOT / "deploy/ray/local.yaml").read_text())
    edited["http_options"]["port"] = 8123
    assert serve_schema.ServeDeploySchema.model_validate(edited).http_options.port == 8123


def listening(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket these processes listen on (`ss`)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        address, _, port = fields[3].rpartition(":")
        for name, pid in re.findall(r'\("([^"]*)",pid=(\d+)', line):
            if int(pid) in pids:
                found.append((address.strip("[]").removeprefix("::ffff:"), int(port), name))  # v4-mapped
    return found


EVERYWHERE = {"*", "0.0.0.0", "::"}  # how `ss` writes an address that is every interface


def process_tree(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += children.get(pid, [])
    return tree


@pytest.mark.slow
def test_serve_run_listens_where_the_readme_says(tmp_path):
    """The README's one-machine run, from its config file with the port picked there, under the README's
    variables: the API on 127.0.0.1:PORT, Ray's own services on loopback, and the replicas' gRPC servers on
    every interface, which is why the README says what to firewall."""
    pytest.importorskip("ray", reason="Ray is not installed: make test installs it")
    require_installed(shutil.which("ss") is not None, "ss", "apt-get install iproute2")
    variables = dict(re.findall(r"(RAY_\w+)=(\S+)", readme_block("serve run server.ray_app:build")))
    assert variables == {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    port = free_port()
    config = yaml.safe_load((ROOT / "deploy/ray/local.yaml").read_text())
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["data_dir"] = str(tmp_path / "data")  # not the user's job store
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = dict(os.environ, **variables, RAY_TMPDIR=ray_tmp, RAY_DEDUP_LOGS="0")
    serve = Path(sys.executable).parent / "serve"
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([str(serve), "run", str(tmp_path / "serve.yaml")], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text(errors="replace")[-3000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 240, "`serve run deploy/ray/local.yaml` to answer ready", interval=1)
        # Ready once one engine reports; each replica opens its gRPC server when its constructor is done.
        sockets = wait_until(lambda: (found := listening(process_tree(proc.pid))) and
                             len([s for s in found if "ServeRepl" in s[2] and s[0] in EVERYWHERE]) >= 3 and found,
                             120, "the front-end and both engine replicas to listen", interval=1)
    finally:
        proc.send_signal(2)  # Ctrl-C, as the README says: serve run shuts Serve and its Ray instance down
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert ("127.0.0.1", port) in {(a, p) for a, p, _ in sockets}, sockets  # the API, where the config says
    wide = [(a, p, name) for a, p, name in sockets if a in EVERYWHERE]
    # Frontend + 2 Engines, each with its inter-deployment gRPC server on every interface, and nothing else
    assert len(wide) == 3 and all("ServeRepl" in name for _, _, name in wide), wide
    assert {a for a, _, _ in sockets} - EVERYWHERE == {"127.0.0.1"}, sockets  # everything else on loopback
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names, names  # Ray's own services are among them


def stream_statuses(url: str, body: dict) -> tuple[list[str], str]:
    """The distinct statuses of a stream's progress events, in order, and the name of its last event."""
    statuses, name = [], None
    with httpx.stream("POST", url + "/generate", json=body, headers={"Accept": "text/event-stream"},
                      timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: ") and name == "progress":
                status = json.loads(line.removeprefix("data: "))["status"]
                if not statuses or statuses[-1] != status:
                    statuses.append(status)
    return statuses, name


def test_stream_statuses_come_in_the_readmes_order(server):
    """queued, running, encoding, done, in that order, a stage skipped when the stream did not wake
    during it (as the README says: `encoding` lasts milliseconds); always `done`, then the result."""
    order = ["queued", "running", "encoding", "done"]
    for k in range(12):
        statuses, last = stream_statuses(server.url, {"class_id": k % 10, "steps": 5, "seed": k,
                                                      "num_images": 1 + k % 4})
        assert last == "result" and statuses[-1] == "done", statuses
        assert statuses == sorted(statuses, key=order.index) and len(set(statuses)) == len(statuses), statuses
    section = README.split("- **Progress streaming**", 1)[1].split("\n- **", 1)[0]
    assert all(f"`{status}`" in section for status in order) and "can skip a" in section
