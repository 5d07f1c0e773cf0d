"""The overload runs (bench/overload.py) against the default engine process: an open-loop flood at 10x
capacity and a retry storm of 256 connections; the books balance and goodput stays above a loose floor.
The targets themselves (>= 80% / >= 50% goodput) live in the benchmark, not here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import require_installed
from server_harness import ROOT

pytestmark = pytest.mark.slow


def test_flood_and_retry_storm_keep_serving_and_the_books_balance(tmp_path):
    require_installed(shutil.which("wrk") is not None, "wrk", "apt-get install wrk")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "overload.py"), "--engines", "process",
                          "--seconds", "30", "--storm-seconds", "20", "--json", str(tmp_path / "report.json")],
                         capture_output=True, text=True, timeout=600)
    [report] = json.loads((tmp_path / "report.json").read_text())
    assert report["problems"] == [], out.stdout + out.stderr
    assert out.returncode == 0
    assert report["flood"]["codes"].get("200", 0) > 0 and report["flood"]["codes"].get("429", 0) > 0
    assert report["storm"]["goodput"] >= 0.25, out.stdout
