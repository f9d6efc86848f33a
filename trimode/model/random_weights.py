"""Random weights of a given geometry, for generated test and benchmark models."""
from __future__ import annotations

import numpy as np

from trimode.model.config import ModelConfig
from trimode.model.weights import LayerWeights, ModelWeights, Q8Matrix


def random_weights(config: ModelConfig, seed: int = 0, quantized: bool = True) -> ModelWeights:
    """Gaussian weights scaled like a trained network's (activations stay O(1) through depth),
    quantized to Q8_0 unless `quantized` is False (then float32)."""
    rng = np.random.default_rng(seed)
    cfg = config

    def matrix(n: int, k: int, gain: float = 1.0):
        w = (rng.standard_normal((n, k), dtype=np.float32) * (gain / np.sqrt(k))).astype(np.float32)
        return Q8Matrix.quantize(w) if quantized else w

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    depth_gain = 1.0 / np.sqrt(2 * cfg.n_layers)
    layers = [
        LayerWeights(
            attn_norm=norm(cfg.hidden),
            wq=matrix(cfg.q_dim, cfg.hidden, 2.0),
            wk=matrix(cfg.kv_dim, cfg.hidden, 2.0),
            wv=matrix(cfg.kv_dim, cfg.hidden),
            wo=matrix(cfg.hidden, cfg.q_dim, depth_gain),
            ffn_norm=norm(cfg.hidden),
            w_gate=matrix(cfg.ffn, cfg.hidden),
            w_up=matrix(cfg.ffn, cfg.hidden),
            w_down=matrix(cfg.hidden, cfg.ffn, depth_gain),
        )
        for _ in range(cfg.n_layers)
    ]
    return ModelWeights(embed=matrix(cfg.vocab, cfg.hidden, np.sqrt(cfg.hidden)),
                        layers=layers, output_norm=norm(cfg.hidden),
                        output=matrix(cfg.vocab, cfg.hidden, 4.0))
