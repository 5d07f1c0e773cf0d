"""Property-based fuzzing of the live OpenAPI schema with schemathesis: no 5xx, no schema violations."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from server_harness import run_server

pytestmark = pytest.mark.slow


def test_schemathesis_finds_no_server_errors(tmp_path):
    st = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    # Small limits keep every valid case cheap: at most 4 steps and 2 images.
    with run_server(tmp_path, "--max-steps", "4", "--max-images", "2", "--max-queue", "64") as s:
        out = subprocess.run(
            [st, "run", s.url + "/openapi.json", "--checks", "not_a_server_error,response_schema_conformance",
             "--max-examples", "150", "--phases", "examples,coverage,fuzzing", "--seed", "1", "--no-color"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache (.schemathesis/) goes there
        assert out.returncode == 0, out.stdout[-4000:]
        generated = int(re.search(r"(\d+) generated", out.stdout).group(1))
        assert generated >= 1000, out.stdout[-2000:]
        assert "unresolvable" not in out.stdout.lower(), out.stdout[-2000:]
        assert s.metric("dit_requests_total", 'code="500"') == 0
