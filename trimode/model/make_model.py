"""Generated NLD models: random weights of a named geometry, a real BPE vocabulary, real keys.

Small geometries get independent Gaussian weights (trimode.model.random_weights), the models
tests run. Full geometries would take minutes to draw and quantize element by element, so
each of their matrices tiles a small quantized random pool of rows instead: the file has
the real size and layout, which is all a benchmark needs, and writes at disk speed.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as GGMLType

from trimode.model.config import GEOMETRIES, ModelConfig, ModelError
from trimode.model.gguf_file import TensorSource, tensor_shapes, write_model, write_tensors
from trimode.model.random_weights import random_weights
from trimode.model.vocab import make_vocab
from trimode.model.weights import Q8Matrix

# Above this many weight elements a model is tiled rather than drawn element by element.
TILE_ABOVE_ELEMENTS = 50_000_000
POOL_ROWS = 256


def make_model(path: str | os.PathLike, geometry: str, seed: int = 0,
               progress: Callable[[int, int], None] | None = None) -> ModelConfig:
    """Write a random-weight model of `geometry` (a GEOMETRIES name) to `path`; `progress`
    (bytes done, bytes total) hears about tiled models, which take a while."""
    if geometry not in GEOMETRIES:
        raise ModelError(f"unknown geometry {geometry!r}; choose from {', '.join(GEOMETRIES)}")
    config = GEOMETRIES[geometry]
    vocab = make_vocab(config.vocab)
    name = f"trimode random {geometry} (seed {seed})"
    if config.weight_elements_per_token() <= TILE_ABOVE_ELEMENTS:
        write_model(path, config, random_weights(config, seed), vocab, name=name)
    else:
        write_tensors(path, config, tiled_sources(config, seed), vocab, name=name, progress=progress)
    return config


def tiled_sources(config: ModelConfig, seed: int) -> dict[str, TensorSource]:
    """Every tensor of `config`: norms near 1, matrices Q8_0 tiled from a random pool of rows
    scaled like random_weights' (so activations stay O(1) through depth)."""
    rng = np.random.default_rng(seed)
    depth_gain = 1.0 / np.sqrt(2 * config.n_layers)
    # By tensor role (the name's second-to-last part), as in random_weights.
    gains = {"attn_q": 2.0, "attn_k": 2.0, "attn_output": depth_gain, "ffn_down": depth_gain,
             "token_embd": np.sqrt(config.hidden), "output": 4.0}
    sources = {}
    for name, shape in tensor_shapes(config).items():
        # Each tensor gets its own generator seed, so data is made lazily in write order.
        tensor_seed = int(rng.integers(2**63))
        if len(shape) == 1:
            sources[name] = TensorSource(shape, GGMLType.F32, _norm_maker(shape[0], tensor_seed))
        else:
            gain = gains.get(name.split(".")[-2], 1.0)
            sources[name] = TensorSource(shape, GGMLType.Q8_0, _tiled_maker(shape, gain, tensor_seed))
    return sources


def _norm_maker(n: int, seed: int) -> Callable[[], np.ndarray]:
    def make() -> np.ndarray:
        return (1.0 + 0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)
    return make


def _tiled_maker(shape: tuple[int, int], gain: float, seed: int) -> Callable[[], np.ndarray]:
    def make() -> np.ndarray:
        n, k = shape
        rng = np.random.default_rng(seed)
        pool_rows = min(n, POOL_ROWS)
        pool = rng.standard_normal((pool_rows, k), dtype=np.float32) * np.float32(gain / np.sqrt(k))
        blocks = Q8Matrix.quantize(pool).to_blocks()  # [pool_rows, k / 32]
        reps = -(-n // pool_rows)
        return np.tile(blocks, (reps, 1))[:n]
    return make
