from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
IN_CI = os.environ.get("CI", "").lower() == "true"


def require_installed(present: bool, what: str, how: str) -> None:
    """Skip with a how-to-install message when a system package is missing; under CI=true, fail."""
    if not present:
        msg = f"{what} is not installed: {how}"
        if IN_CI:
            pytest.fail(msg + " (CI must install it: see .ci/run)")
        pytest.skip(msg)



@pytest.fixture(scope="session")
def reference() -> dict[str, torch.Tensor]:
    """Outputs of the original DiT code on the tiny fixture model (see tests/fixtures/README.md)."""
    return load_file(str(FIXTURES / "tiny_dit_reference.safetensors"))


@pytest.fixture(scope="session")
def tiny_dit():
    from model import load_dit

    return load_dit(FIXTURES / "tiny_dit.safetensors")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| relative to the reference's max |value|."""
    return ((out - ref).abs().max() / ref.abs().max()).item()
