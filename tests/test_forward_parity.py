"""Forward parity with the original DiT code, for every checkpoint form load_dit accepts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FIXTURES, rel_err
from safetensors.torch import load_file

from model import PRESETS, DiT, load_dit

FORWARD_TOL = 1e-4


def forward_error(model, reference) -> float:
    with torch.no_grad():
        out = model(reference["fwd_x"], reference["fwd_t"], reference["fwd_y"])
    assert out.shape == (4, 8, 8, 8)
    return rel_err(out, reference["fwd_out"])


@pytest.mark.parametrize(
    "form", ["tiny_dit.pt", "tiny_dit.safetensors", "tiny_dit_diffusers", "tiny_dit_diffusers/transformer"]
)
def test_forward_matches_reference(form, reference):
    model = load_dit(FIXTURES / form)
    assert not model.training
    assert model.config.num_heads == 2 and model.config.input_size == 8 and model.config.num_classes == 1000
    assert forward_error(model, reference) <= FORWARD_TOL


def hub_style_copy(tmp_path, *, class_name: str, bin_weights: bool, id2label: bool):
    """The hub's variant of the diffusers layout, made from the fixture: Transformer2DModel, .bin, id2label."""
    root = tmp_path / "pipe"
    shutil.copytree(FIXTURES / "tiny_dit_diffusers", root)
    tdir = root / "transformer"
    cfg = json.loads((tdir / "config.json").read_text())
    cfg["_class_name"] = class_name
    (tdir / "config.json").write_text(json.dumps(cfg))
    if bin_weights:
        sd = load_file(str(tdir / "diffusion_pytorch_model.safetensors"))
        torch.save(sd, tdir / "diffusion_pytorch_model.bin")
        (tdir / "diffusion_pytorch_model.safetensors").unlink()
    if id2label:
        index = json.loads((root / "model_index.json").read_text())
        index["id2label"] = {str(i): f"class {i}, synonym" for i in range(1000)}
        (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.mark.parametrize("class_name", ["Transformer2DModel", "DiTTransformer2DModel"])
def test_hub_layout_with_bin_weights(tmp_path, class_name, reference):
    root = hub_style_copy(tmp_path, class_name=class_name, bin_weights=True, id2label=True)
    assert forward_error(load_dit(root), reference) <= FORWARD_TOL
    assert forward_error(load_dit(root / "transformer"), reference) <= FORWARD_TOL


def test_diffusers_conversion_gives_original_keys():
    ours = load_dit(FIXTURES / "tiny_dit_diffusers").state_dict()
    original = load_file(str(FIXTURES / "tiny_dit.safetensors"))
    assert set(ours) == set(original)
    for k in original:
        assert torch.equal(ours[k], original[k]), k


def test_presets_match_paper():
    assert len(PRESETS) == 12
    with torch.device("meta"):
        xl = DiT(PRESETS["DiT-XL/2"])
    params = sum(p.numel() for p in xl.parameters())
    assert abs(params - 675e6) / 675e6 < 0.01  # the paper's 675 M
    assert (PRESETS["DiT-S/8"].hidden_size, PRESETS["DiT-S/8"].depth, PRESETS["DiT-S/8"].num_heads) == (384, 12, 6)
    assert PRESETS["DiT-XL/2"].head_dim == 72 and PRESETS["DiT-B/4"].head_dim == 64


def test_dtype_and_device_arguments():
    model = load_dit(FIXTURES / "tiny_dit.safetensors", dtype=torch.bfloat16, device="cpu")
    for name, p in model.named_parameters():  # the timestep and class embeddings stay float32
        assert p.dtype == (torch.float32 if name.startswith(("t_embedder", "y_embedder")) else torch.bfloat16), name
    assert not any(p.requires_grad for p in model.parameters())


def test_diffusers_round_trip():
    from model.diffusers_layout import to_diffusers, to_original

    original = load_file(str(FIXTURES / "tiny_dit.safetensors"))
    theirs = load_file(str(FIXTURES / "tiny_dit_diffusers/transformer/diffusion_pytorch_model.safetensors"))
    ours = to_diffusers(original, depth=2)
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    back = to_original(ours, "round trip")
    assert all(torch.equal(back[k], original[k]) for k in back)
