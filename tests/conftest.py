"""Shared fixtures: generated tiny NLD models, made once per test session.

    tiny_gguf            path of a tiny model file (geometry "tiny", seed 0)
    tiny_model           that file loaded (trimode.model.gguf_file.GGUFModel)
    make_tiny_gguf(seed) path of a tiny model file with another seed (each made once)

The tiny geometry (trimode.model.config.GEOMETRIES["tiny"]) has head_dim != hidden / heads,
GQA 4:1, two layers, a 2048-token BPE vocabulary and a YaRN original context of 64, so
tests cross the long-context query-scale steps with short sequences. Files are read-only
by convention: tests that need a broken file copy one into their own tmp_path.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite pins the fp32-activation CPU build to the float64 reference. A build with int8
# activations (the default on x86 processors with AVX2) rounds each activation to 1/127
# of its block's largest, a step the float64 reference cannot follow to the bit: an input
# 1e-7 away now and then rounds the other way (the tiny model's logits then move ~1e-2).
# tests/test_int8_activations.py builds and tests it on its own terms. Set before any build.
os.environ["TRIMODE_INT8"] = "0"

from trimode.model.gguf_file import GGUFModel, load_model
from trimode.model.make_model import make_model


@pytest.fixture(scope="session")
def make_tiny_gguf(tmp_path_factory):
    made: dict[int, Path] = {}

    def make(seed: int = 0) -> Path:
        if seed not in made:
            path = tmp_path_factory.mktemp("models") / f"tiny-seed{seed}.gguf"
            make_model(path, "tiny", seed=seed)
            made[seed] = path
        return made[seed]

    return make


@pytest.fixture(scope="session")
def tiny_gguf(make_tiny_gguf) -> Path:
    return make_tiny_gguf(0)


@pytest.fixture(scope="session")
def tiny_model(tiny_gguf) -> GGUFModel:
    return load_model(tiny_gguf)
