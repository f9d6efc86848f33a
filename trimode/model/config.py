"""The model's geometry and every constant the engine needs, as read from a GGUF file.

One frozen dataclass: derived sizes are properties, presets for the published geometries
and the tiny test geometry sit at the bottom. Nothing here imports TVM.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np


class ModelError(ValueError):
    """A model file or setting the engine cannot use; the message is one sentence for the user."""


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    context_length: int = 262144
    rope_theta: float = 1e6
    rms_eps: float = 1e-5
    # YaRN (MODEL.md section 1); rope_scaling is "yarn" or "none".
    rope_scaling: str = "yarn"
    yarn_factor: float = 16.0
    yarn_orig_ctx: int = 16384
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    # Long-context query scale q *= 1 + beta * ln(1 + floor(pos / interval)); interval is
    # the YaRN original context (Ministral-3's llama_4_scaling).
    q_scale_beta: float = 0.1
    bos_token_id: int = 1
    eos_token_id: int = 11
    mask_token_id: int = 100
    shift_logits: bool = False

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ModelError(
                f"attention.head_count ({self.n_heads}) is not a multiple of "
                f"attention.head_count_kv ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ModelError(f"attention.key_length {self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling not in ("yarn", "none"):
            raise ModelError(f"rope.scaling.type {self.rope_scaling!r} is not supported (yarn or none)")
        for name in ("hidden", "ffn"):
            if getattr(self, name) % 32:
                raise ModelError(f"{name} {getattr(self, name)} is not a multiple of 32 (Q8_0 block)")
        if (self.n_heads * self.head_dim) % 32:
            raise ModelError("head_count * key_length is not a multiple of 32 (Q8_0 block)")

    # Derived sizes.
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def layer_matrix_shapes(self) -> dict[str, tuple[int, int]]:
        """(out N, in K) of each matrix of one layer as the file holds it (weights.LAYER_MATRICES)."""
        return {"wq": (self.q_dim, self.hidden), "wk": (self.kv_dim, self.hidden),
                "wv": (self.kv_dim, self.hidden), "wo": (self.hidden, self.q_dim),
                "w_gate": (self.ffn, self.hidden), "w_up": (self.ffn, self.hidden),
                "w_down": (self.hidden, self.ffn)}

    def matmul_shapes(self) -> dict[str, tuple[int, int]]:
        """(out N, in K) of every per-layer matmul, after q/k/v and gate/up are fused."""
        return {
            "qkv": (self.q_dim + 2 * self.kv_dim, self.hidden),
            "o": (self.hidden, self.q_dim),
            "gate_up": (2 * self.ffn, self.hidden),
            "down": (self.hidden, self.ffn),
            "head": (self.vocab, self.hidden),
        }

    def weight_elements_per_token(self) -> int:
        """Weights one decoded token reads (the embedding table is gathered, not read)."""
        per_layer = sum(n * k for name, (n, k) in self.matmul_shapes().items() if name != "head")
        return self.n_layers * per_layer + self.vocab * self.hidden

    def kv_bytes_per_token(self, dtype_bytes: float) -> float:
        return 2 * self.n_layers * self.kv_dim * dtype_bytes

    def geometry_key(self) -> str:
        """Everything that changes a compiled module (not weights, not token ids)."""
        return (f"L{self.n_layers}-H{self.hidden}-F{self.ffn}-q{self.n_heads}-kv{self.n_kv_heads}"
                f"-d{self.head_dim}-V{self.vocab}")

    # Rotary tables. Host-side float64, uploaded once per load.
    def inv_freq(self) -> np.ndarray:
        d, base = self.head_dim, self.rope_theta
        freq_extra = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
        if self.rope_scaling == "none":
            return freq_extra
        freq_inter = freq_extra / self.yarn_factor

        def corr(n_rot: float) -> float:
            return d * math.log(self.yarn_orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr(self.yarn_beta_fast)), 0)
        high = min(math.ceil(corr(self.yarn_beta_slow)), d - 1)
        if low == high:
            high += 0.001  # the reference's guard against a zero-width ramp
        ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        return freq_inter * ramp + freq_extra * (1 - ramp)

    def rope_tables(self, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin of shape [n_positions, head_dim // 2] (the halves repeat), float64."""
        angle = np.arange(n_positions, dtype=np.float64)[:, None] * self.inv_freq()[None, :]
        return np.cos(angle), np.sin(angle)

    def q_scale(self, positions: np.ndarray) -> np.ndarray:
        interval = self.yarn_orig_ctx
        return 1.0 + self.q_scale_beta * np.log1p(np.floor(np.asarray(positions, np.float64) / interval))


GEOMETRIES: dict[str, ModelConfig] = {
    # head_dim != hidden / heads and GQA 4:1, like the real models; a short YaRN original
    # context so tests cross the long-context query-scale steps.
    "tiny": ModelConfig(n_layers=2, hidden=96, ffn=192, n_heads=4, n_kv_heads=1, head_dim=32,
                    vocab=2048, context_length=2048, rope_theta=1e6, yarn_orig_ctx=64),
    "3b": ModelConfig(n_layers=26, hidden=3072, ffn=9216, n_heads=32, n_kv_heads=8, head_dim=128,
                  vocab=131072, rope_theta=1e6),
    "8b": ModelConfig(n_layers=34, hidden=4096, ffn=14336, n_heads=32, n_kv_heads=8, head_dim=128,
                  vocab=131072, rope_theta=1e6),
    "14b": ModelConfig(n_layers=40, hidden=5120, ffn=16384, n_heads=32, n_kv_heads=8, head_dim=128,
                   vocab=131072, rope_theta=1e9),
}
