"""The shipped model, through the real generation path, judged by the shipped independent classifier."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model import Pipeline
from training.classifier import load_classifier

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "weights" / "fashion_dit.safetensors"
CLASSIFIER = Path(__file__).parent.parent / "weights" / "fashion_classifier.safetensors"


def test_shipped_model_generates_the_requested_classes():
    pipe = Pipeline.from_pretrained(WEIGHTS)
    assert pipe.info.space == "pixel" and pipe.info.image_size == 28 and len(pipe.info.class_names) == 10
    labels = [c for c in range(10) for _ in range(2)]
    images = pipe.generate(labels, seeds=list(range(100, 120)))  # the declared defaults
    assert images.shape == (20, 28, 28, 3) and images.dtype == torch.uint8
    x = images[..., 0].float().div(127.5).sub(1).unsqueeze(1)  # grey RGB -> (N, 1, 28, 28) in [-1, 1]
    with torch.no_grad():
        predicted = load_classifier(CLASSIFIER)(x).argmax(1)
    agreement = (predicted == torch.tensor(labels)).float().mean().item()
    assert agreement >= 0.8, f"only {agreement:.0%} of the images were classified as the requested class"


def test_shipped_config_declares_defaults_and_names():
    config = json.loads(WEIGHTS.with_suffix(".json").read_text())
    assert config["class_names"][7] == "Sneaker" and config["space"] == "pixel"
    assert set(config["defaults"]) == {"sampler", "steps", "cfg_scale", "guidance_interval", "cache"}
    assert WEIGHTS.stat().st_size <= 20 * 2**20
