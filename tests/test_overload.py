"""The overload run (bench/overload.py): >= 10x capacity for 60 s, twice; correctness, not speed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from server_harness import ROOT

pytestmark = pytest.mark.slow


def test_overload_accounting_balances_and_memory_is_stable(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "overload.py"), "--seconds", "60",
                          "--json", str(tmp_path / "report.json")], capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["problems"] == [], out.stdout
    assert out.returncode == 0
    for run in report["runs"]:
        assert run["codes"].get("200", 0) > 0 and run["codes"].get("429", 0) > 0  # served and shed
