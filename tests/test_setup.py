"""Set-up and configuration as a newcomer meets them: which torch `make install` picks, settings from
the environment, `--help`, a server that cannot load its model, the CI's clean-tree check, packaging."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import get_origin

import pytest
import yaml
from conftest import FIXTURES, require_installed
from server_harness import ROOT, run_server

from dit_fetch.sources import SOURCES
from server.cli import parse_settings, show_default
from server.settings import PROJECT_ROOT, Settings

LIST_SETTINGS = [name for name, f in Settings.model_fields.items() if get_origin(f.annotation) is list]


# --- torch: the Makefile's choice, by dry run --------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_index():
    """A local stand-in for PyTorch's CPU index: answers 200 to anything."""
    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html></html>")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/whl/cpu"
    server.shutdown()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed: connection refused


def make_install_dry_run(tmp_path: Path, gpu: bool, index: str, variables: tuple[str, ...] = ()) -> tuple[str, str]:
    """The torch line `make install` would run in a fresh venv, and the probe's note (stderr)."""
    make = shutil.which("make")
    require_installed(make is not None, "make", "apt-get install make")
    bin_dir = tmp_path / ("gpu-bin" if gpu else "bin")
    bin_dir.mkdir(exist_ok=True)
    if gpu:  # all the Makefile asks of a GPU host is an nvidia-smi on PATH
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    out = subprocess.run(
        [make, "-n", "-B", "-f", str(ROOT / "Makefile"), "install", f"VENV={tmp_path / 'venv'}",
         f"PYTHON={sys.executable}", f"TORCH_CPU_INDEX={index}", *variables],
        cwd=ROOT, env=dict(os.environ, PATH=str(bin_dir)), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    torch_lines = [line for line in out.stdout.splitlines() if "pip install" in line and "torch" in line]
    assert len(torch_lines) == 1, out.stdout
    return torch_lines[0], out.stderr


def test_no_gpu_takes_the_cpu_build_from_the_cpu_index(tmp_path, cpu_index):
    line, note = make_install_dry_run(tmp_path, gpu=False, index=cpu_index)
    assert f"--index-url {cpu_index} --extra-index-url https://pypi.org/simple" in line
    assert '"torch==2.13.0"' in line and "the CPU build" in note


def test_no_gpu_and_no_cpu_index_falls_back_to_pips_index(tmp_path):
    line, note = make_install_dry_run(tmp_path, gpu=False, index=f"http://127.0.0.1:{closed_port()}/whl/cpu")
    assert "--index-url" not in line and '"torch==2.13.0"' in line
    assert "did not answer" in note and "refused" in note.lower()


def test_gpu_host_takes_the_default_build_without_probing(tmp_path, cpu_index):
    line, note = make_install_dry_run(tmp_path, gpu=True, index=cpu_index)
    assert "--index-url" not in line and '"torch>=2.4,<2.15"' in line
    assert "torch:" not in note  # no probe: a CUDA host never asks the CPU index


def test_image_build_on_a_machine_without_gpu_keeps_the_default_build(tmp_path, cpu_index):
    # The Dockerfile builds the CUDA image on a machine that may have no GPU.
    assert "TORCH_BUILD=default" in (ROOT / "Dockerfile").read_text()
    line, _ = make_install_dry_run(tmp_path, gpu=False, index=cpu_index,
                                   variables=("TORCH_BUILD=default", "TORCH_SPEC=torch==2.11.0"))
    assert "--index-url" not in line and '"torch==2.11.0"' in line


def test_cpu_index_that_never_answers_costs_the_timeout_only(tmp_path):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/whl/cpu"
        out = subprocess.run([sys.executable, str(ROOT / ".ci" / "torch_index.py"), url, "--timeout", "1"],
                             capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout == ""
    assert "timed out" in out.stderr


# --- settings from the environment and --help -------------------------------------------------------


def test_list_settings_take_comma_and_json_forms_from_the_environment(monkeypatch):
    assert {"api_keys", "open_paths", "cors_origins", "graph_batch_sizes"} <= set(LIST_SETTINGS)
    for name in LIST_SETTINGS:
        env = f"DIT_{name.upper()}"
        numeric = Settings.model_fields[name].annotation == list[int]
        comma, json_form, want = (("1, 2,8", "[1, 2, 8]", [1, 2, 8]) if numeric else
                                  ("a, b/c,https://d:1", '["a", "b/c", "https://d:1"]', ["a", "b/c", "https://d:1"]))
        for text in (comma, json_form):
            monkeypatch.setenv(env, text)
            assert getattr(parse_settings([]), name) == want, (env, text)
        monkeypatch.delenv(env)
    monkeypatch.setenv("DIT_API_KEYS", '["has,comma", "k2"]')  # JSON for an item that holds a comma
    assert parse_settings([]).api_keys == ["has,comma", "k2"]
    monkeypatch.setenv("DIT_VAE", "")  # empty = unset, as a compose file's ${DIT_VAE:-} gives it
    assert parse_settings([]).vae is None


@pytest.fixture(scope="module")
def help_lines() -> dict[str, str]:
    """`dit-serve --help`, one entry per flag: its line(s) joined (a wide terminal keeps the help unwrapped)."""
    out = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, COLUMNS="1000"), check=True, timeout=120).stdout
    entries = re.split(r"\n(?=  -)", out.split("options:", 1)[1])
    return {m.group(1): " ".join(entry.split()) for entry in entries if (m := re.match(r"\s*--([a-z0-9-]+)", entry))}


def test_help_says_each_default_once_with_readable_placeholders(help_lines):
    assert set(help_lines) >= {name.replace("_", "-") for name in Settings.model_fields}
    for name, field in Settings.model_fields.items():
        line = help_lines[name.replace("_", "-")]
        assert line.count("(default:") == 1 and f"(default: {show_default(field.default)})" in line, line
        assert not re.search(r"null|None|list\[|\{\w+,null\}|\bstr\b|\bint\b|\bfloat\b", line), line
    assert help_lines["vae"].startswith("--vae PATH ") and help_lines["threads"].startswith("--threads N ")
    assert help_lines["api-keys"].startswith("--api-keys KEY,KEY,... ")
    assert "(default: 1,2,4,8,12,16,24,32,48,64,96,128)" in help_lines["graph-batch-sizes"]


def test_readme_configuration_table_matches_the_settings():
    readme = (ROOT / "README.md").read_text()
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^\| `--([a-z0-9-]+)` \| `(DIT_[A-Z0-9_]+)` \| (.*?) \| (.*) \|$", readme, re.M)}
    for name, field in Settings.model_fields.items():
        flag = name.replace("_", "-")
        assert flag in rows, f"README's configuration table has no row for --{flag}"
        env, default, description = rows[flag]
        assert env == f"DIT_{name.upper()}" and description == field.description, flag
        assert default == show_default(field.default).replace(str(PROJECT_ROOT) + os.sep, ""), flag


# --- fail fast: a server that cannot start exits at once, saying why ---------------------------------

# case -> (command-line arguments, extra environment, exit status, what the output must say)
FAILED_STARTS = {
    "missing file": (lambda tmp: ["--model", str(tmp / "nope.pt")], {}, 1, "no such file"),
    "bad checkpoint": (lambda tmp: ["--model", str(truncated(tmp)), "--num-heads", "2"], {}, 1, "truncated"),
    "wrong heads": (lambda tmp: ["--model", str(FIXTURES / "tiny_dit.safetensors"), "--num-heads", "3"], {}, 1,
                    "not divisible by num_heads 3"),
    "bad settings": (lambda tmp: [], {"DIT_GRAPH_BATCH_SIZES": "1,two", "DIT_API_KEYS": '["unclosed'}, 2,
                     "--graph-batch-sizes / DIT_GRAPH_BATCH_SIZES (item 2)"),
}


def truncated(tmp_path: Path) -> Path:
    data = (FIXTURES / "tiny_dit.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.safetensors"


@pytest.fixture(scope="module")
def failed_starts(tmp_path_factory) -> dict[str, tuple[int, str]]:
    """Exit status and output of each case, all started at once (each is mostly interpreter start-up)."""
    tmp = tmp_path_factory.mktemp("failed-starts")
    with contextlib.ExitStack() as stack:
        # The comma form of DIT_API_KEYS rides along: a settings error would exit 2 before the model is tried.
        servers = {case: stack.enter_context(run_server(tmp, *args(tmp), "--log-format", "text", wait_ready=False,
                                                        env={"DIT_API_KEYS": "k1,k2", **env}))
                   for case, (args, env, _, _) in FAILED_STARTS.items()}
        return {case: (s.proc.wait(120), s.logs()) for case, s in servers.items()}  # in practice seconds


@pytest.mark.parametrize("case", FAILED_STARTS)
def test_a_server_that_cannot_start_exits_saying_why(failed_starts, case):
    code, output = failed_starts[case]
    _, _, want_code, reason = FAILED_STARTS[case]
    assert code == want_code and reason in output, f"{case}: exit status {code}; output:\n{output}"
    if want_code == 1:  # the model: logged with the exception, then the exit
        assert "CheckpointError" in output and "exiting with status 1: the server could not start" in output
    else:  # settings: every bad one named, no traceback
        assert "Traceback" not in output and "--api-keys / DIT_API_KEYS" in output and "not a JSON list" in output


# --- compose: the original checkpoint plus the VAE, by variables only -------------------------------


def env_example_block(title: str) -> dict[str, str]:
    """The weights block of .env.example whose comment contains `title`, uncommented."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and title in line)
    block = {}
    for line in lines[start + 1:]:
        key, sep, value = line.lstrip("#").partition("=")
        if not sep or not key.startswith("DIT_") or key in block:
            break
        block[key] = value
    return block


def test_compose_fetches_and_serves_the_original_checkpoint_without_edits(tmp_path):
    compose = shutil.which("docker-compose")
    require_installed(compose is not None, "docker-compose", "apt-get install docker-compose")
    block = env_example_block("the original checkpoint")
    assert set(block) == {"DIT_WEIGHTS", "DIT_MODEL", "DIT_VAE"}, block
    names = block["DIT_WEIGHTS"].split()
    assert names == ["DiT-XL-2-256-original", "sd-vae-ft-ema"] and all(n in SOURCES for n in names)
    # The paths the server is given are the ones dit-fetch says it writes.
    assert f"--model {block['DIT_MODEL'].removeprefix('/')}" in SOURCES[names[0]].note
    assert f"--vae {block['DIT_VAE'].removeprefix('/')}" in SOURCES[names[0]].note
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in block.items()) + "GRAFANA_ADMIN_PASSWORD=x\n")
    out = subprocess.run([compose, "-f", str(ROOT / "docker-compose.yml"), "--env-file", str(env_file), "config"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    command = services["fetch-weights"]["command"]
    assert (shlex.split(command) if isinstance(command, str) else command) == [
        "dit-fetch", *names, "--dest", "/weights", "--quiet"]
    env = services["dit"]["environment"]
    assert env["DIT_MODEL"] == block["DIT_MODEL"] and env["DIT_VAE"] == block["DIT_VAE"]


# --- CI: the clean-tree check after `make test` -----------------------------------------------------


@pytest.mark.parametrize("leftover", [None, "cache/junk.txt"])
def test_ci_fails_when_make_test_leaves_files_behind(tmp_path, leftover):
    git = shutil.which("git")
    require_installed(git is not None, "git", "apt-get install git")
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    (repo / ".gitignore").write_text("ignored/\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # Stand-ins: apt-get does nothing; `make test` writes an ignored file, and the leftover if any.
    script = {"apt-get": "exit 0", "make": "mkdir -p ignored && touch ignored/ok" +
              (f" && mkdir -p cache && echo x > {leftover}" if leftover else "")}
    for name, body in script.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=60)

    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        assert run(git, *cmd).returncode == 0
    out = run("bash", str(repo / ".ci" / "run"))
    if leftover is None:
        assert out.returncode == 0, out.stderr
    else:
        assert out.returncode == 1 and leftover in out.stderr and "changed the checkout" in out.stderr


# --- packaging --------------------------------------------------------------------------------------


def test_package_metadata_builds_without_licence_deprecations(tmp_path):
    build_meta = pytest.importorskip("setuptools.build_meta", reason="setuptools is not in this venv")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tmp_path / name)
    script = ("import os, setuptools.build_meta as b; os.chdir(os.environ['DIR']); os.mkdir('out'); "
              "print(b.prepare_metadata_for_build_wheel('out'))")
    out = subprocess.run([sys.executable, "-W", "error", "-c", script], env=dict(os.environ, DIR=str(tmp_path)),
                         capture_output=True, text=True, timeout=120)
    assert build_meta is not None and out.returncode == 0, out.stderr[-3000:]
    metadata = (tmp_path / "out" / out.stdout.split()[-1] / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
