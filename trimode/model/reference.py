"""The float64 numpy reference of the whole network (MODEL.md section 1).

The oracle every compiled path is tested against; never used to serve. `ReferenceForward`
implements the same Forward interface as the compiled runtime, so decode loops can be
tested against it without TVM.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from trimode.model.config import ModelConfig
from trimode.model.kv_cache import kv_round
from trimode.model.weights import Q8_BLOCK, ModelWeights, as_float, quantized_parts
from trimode.runtime.forward import (MASS_CHUNK, TOP_CANDIDATES, ContextFull, StepResult,
                                     mass_chunks)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def swiglu_of_pairs(y: np.ndarray) -> np.ndarray:
    """silu(gate) * up of a gated matmul's output [T, 2F] whose columns alternate gate, up (the
    compiled gate_up's layout, whose kernels end with this)."""
    return silu(y[:, 0::2]) * y[:, 1::2]


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half (NEOX) pairing i <-> i + d/2. x [T, heads, d]; cos/sin [T, d/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def top_candidates(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a GPU build's top_candidates entry returns for these logits [T, V]: each row's
    TOP_CANDIDATES largest (values float32, ids int32), falling, ties by the smaller id;
    past a row shorter than that, id -1 and the lowest float32."""
    logits = np.asarray(logits, np.float32)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :TOP_CANDIDATES]
    values = np.full((len(logits), TOP_CANDIDATES), np.finfo(np.float32).min, np.float32)
    ids = np.full((len(logits), TOP_CANDIDATES), -1, np.int32)
    values[:, :order.shape[1]] = np.take_along_axis(logits, order, 1)
    ids[:, :order.shape[1]] = order
    return values, ids


def chunk_masses(logits: np.ndarray, inv_temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """What a GPU build's chunk_mass entry returns for these logits [T, V] (float64 here):
    per chunk of MASS_CHUNK logits its largest m and its sum of exp((l - m) * inv_temperature)."""
    logits = np.asarray(logits, np.float64)
    t, vocab = logits.shape
    n_chunks = mass_chunks(vocab)
    padded = np.full((t, n_chunks * MASS_CHUNK), -np.inf)
    padded[:, :vocab] = logits
    padded = padded.reshape(t, n_chunks, MASS_CHUNK)
    top = padded.max(axis=2)
    return top, np.exp((padded - top[:, :, None]) * inv_temperature).sum(axis=2)


def int8_rows(x: np.ndarray) -> np.ndarray:
    """x [T, K] as the CPU's int8 matmuls see it (compiler/kernels/q8_matmul.quantize_rows):
    per block of 32, d = max|x| / 127 and values rint(x / d), in the kernel's float32."""
    blocks = np.asarray(x, np.float32).reshape(*x.shape[:-1], -1, Q8_BLOCK)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    inverse = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    return (np.rint(blocks * inverse) * d.astype(np.float64)).reshape(x.shape)


class ReferenceModel:
    """Float64 weights (dequantized once) and the forward pass over an explicit KV cache.

    K and V are rounded as the cache type keeps them (model/kv_cache.py) as they are made: the
    engine keeps them (the cache and a block's own) in fp16 by default on every target, or as
    q8_0 blocks on a CPU build that asks for it, so that rounding is part of the model it
    computes (Engine.kv_cache says which); kv_cache=None is the model without it (float64).
    int8_activations: every Q8_0 matmul's input
    is quantized per 32 first (int8_rows), as a CPU build with int8 matmuls computes it
    (Engine.int8_activations says which a build is)."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, kv_cache: str | None = "f16",
                 int8_activations: bool = False):
        self.config = config
        self.kept = (lambda x: x) if kv_cache is None else (lambda x: kv_round(kv_cache, x))
        quantized = quantized_parts(weights)
        # what each group's matmuls take in: the engine runs a group as Q8_0 or as float whole
        self.layer_input = int8_rows if int8_activations and quantized["layers"] else np.asarray
        self.head_input = int8_rows if int8_activations and quantized["output"] else np.asarray
        self.embed = as_float(weights.embed)
        self.output_norm = np.asarray(weights.output_norm, np.float64)
        self.output = as_float(weights.output)
        self.layers = [
            {name: as_float(getattr(layer, name)) for name in
             ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")}
            for layer in weights.layers
        ]

    def forward(self, tokens: Sequence[int], cache_k: list[np.ndarray], cache_v: list[np.ndarray],
                causal: bool) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """tokens [T] at positions P..P+T-1 where P = len(cache). Returns logits [T, V] and
        each layer's new K, V [T, kv_heads, d] (the caller decides whether to keep them)."""
        cfg = self.config
        tokens = np.asarray(tokens, np.int64)
        t_new, start = len(tokens), cache_k[0].shape[0]
        positions = np.arange(start, start + t_new)
        cos, sin = cfg.rope_tables(start + t_new)
        cos, sin = cos[positions], sin[positions]
        q_scale = cfg.q_scale(positions)[:, None, None]
        # Query t sees all history and, in the block, key j <= t (causal) or every key.
        visible = np.ones((t_new, start + t_new), bool)
        if causal:
            visible[:, start:] = np.tril(np.ones((t_new, t_new), bool))

        x = self.embed[tokens]  # [T, H]
        new_k, new_v = [], []
        for layer, past_k, past_v in zip(self.layers, cache_k, cache_v):
            h = self.layer_input(rmsnorm(x, layer["attn_norm"], cfg.rms_eps))
            q = (h @ layer["wq"].T).reshape(t_new, cfg.n_heads, cfg.head_dim)
            k = (h @ layer["wk"].T).reshape(t_new, cfg.n_kv_heads, cfg.head_dim)
            v = (h @ layer["wv"].T).reshape(t_new, cfg.n_kv_heads, cfg.head_dim)
            q = rope(q, cos, sin) * q_scale
            k = self.kept(rope(k, cos, sin))
            v = self.kept(v)
            new_k.append(k)
            new_v.append(v)
            keys = np.concatenate([past_k, k])      # [S, kv_heads, d]
            values = np.concatenate([past_v, v])
            kv_of_q = np.arange(cfg.n_heads) // cfg.group_size
            scores = np.einsum("thd,shd->hts", q, keys[:, kv_of_q]) / np.sqrt(cfg.head_dim)
            scores = np.where(visible[None], scores, -np.inf)
            attn = np.einsum("hts,shd->thd", softmax(scores), values[:, kv_of_q])
            x = x + self.layer_input(attn.reshape(t_new, cfg.q_dim)) @ layer["wo"].T
            h = self.layer_input(rmsnorm(x, layer["ffn_norm"], cfg.rms_eps))
            gate = h @ layer["w_gate"].T
            x = x + self.layer_input(silu(gate) * (h @ layer["w_up"].T)) @ layer["w_down"].T
        logits = self.head_input(rmsnorm(x, self.output_norm, cfg.rms_eps)) @ self.output.T
        return logits, new_k, new_v


class ReferenceForward:
    """The Forward interface over the float64 reference (a test oracle; slow)."""

    def __init__(self, model: ReferenceModel, n_ctx: int):
        self.model = model
        self.config = model.config
        self.n_ctx = n_ctx
        cfg = self.config
        empty = np.zeros((0, cfg.n_kv_heads, cfg.head_dim))
        self._k = [empty] * cfg.n_layers
        self._v = [empty] * cfg.n_layers

    @property
    def length(self) -> int:
        return self._k[0].shape[0]

    def _check_room(self, n: int) -> None:
        if self.length + n > self.n_ctx:
            raise ContextFull(f"context full: {self.length} + {n} tokens > {self.n_ctx}")

    def causal(self, tokens: Sequence[int], last_only: bool = False) -> StepResult:
        self._check_room(len(tokens))
        logits, k, v = self.model.forward(tokens, self._k, self._v, causal=True)
        self._k = [np.concatenate([a, b]) for a, b in zip(self._k, k)]
        self._v = [np.concatenate([a, b]) for a, b in zip(self._v, v)]
        return StepResult.from_logits(logits[-1:] if last_only else logits)

    def bidirectional(self, tokens: Sequence[int]) -> StepResult:
        self._check_room(len(tokens))
        logits, _, _ = self.model.forward(tokens, self._k, self._v, causal=False)
        return StepResult.from_logits(logits)

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self._k = [a[:n] for a in self._k]
        self._v = [a[:n] for a in self._v]
