"""Bad checkpoints give errors that name the file, the problem and the fix."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file, save_file

from model import CheckpointError, load_dit


@pytest.fixture()
def original_sd():
    return load_file(str(FIXTURES / "tiny_dit.safetensors"))


def test_truncated_files(tmp_path):
    for name in ("tiny_dit.pt", "tiny_dit.safetensors"):
        data = (FIXTURES / name).read_bytes()
        bad = tmp_path / name
        bad.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated"):
            load_dit(bad, num_heads=2)


def test_wrong_keys(tmp_path, original_sd):
    sd = {k.replace("blocks.", "layers."): v for k, v in original_sd.items()}
    torch.save(sd, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_dit(tmp_path / "renamed.pt", num_heads=2)


def test_extra_key_is_named(tmp_path, original_sd):
    original_sd["blocks.0.attn.q_norm.weight"] = torch.ones(64)
    save_file(original_sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="q_norm"):
        load_dit(tmp_path / "extra.safetensors", num_heads=2)


def test_wrong_shapes(tmp_path, original_sd):
    original_sd["blocks.1.mlp.fc2.weight"] = torch.zeros(128, 256)
    save_file(original_sd, str(tmp_path / "shapes.safetensors"))
    with pytest.raises(CheckpointError, match="fc2"):
        load_dit(tmp_path / "shapes.safetensors", num_heads=2)


def test_pickle_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_dit(tmp_path / "list.pt")


def test_pickle_with_code_is_refused(tmp_path):
    torch.save({"args": argparse.Namespace(lr=1e-4)}, tmp_path / "code.pt")  # like DiT's train.py saves
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_dit(tmp_path / "code.pt")


def test_unknown_head_count_asks_for_num_heads(tmp_path):
    # No sidecar config, and (hidden 128, depth 2, patch 2) matches no preset.
    (tmp_path / "bare.safetensors").write_bytes((FIXTURES / "tiny_dit.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="num_heads"):
        load_dit(tmp_path / "bare.safetensors")
    assert load_dit(tmp_path / "bare.safetensors", num_heads=2).config.num_heads == 2


def test_arch_that_does_not_fit(tmp_path):
    with pytest.raises(CheckpointError, match="DiT-XL/2"):
        load_dit(FIXTURES / "tiny_dit.safetensors", arch="DiT-XL/2")


def test_training_checkpoint_with_ema_entry(tmp_path, original_sd):
    torch.save({"model": original_sd, "ema": original_sd}, tmp_path / "0400000.pt")
    assert load_dit(tmp_path / "0400000.pt", num_heads=2).config.depth == 2


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_dit(tmp_path / "nope.pt")


def test_import_model_pulls_in_no_server_packages():
    code = "import sys, model; print([m for m in ('fastapi', 'uvicorn', 'pydantic', 'server') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
