"""How the K/V cache keeps a row (one token's key or value for one kv head): the cache types.

f16: head_dim fp16 values, as llama.cpp's default cache. q8_0 (CPU builds): as llama.cpp's
`--cache-type-k/v q8_0`, per block of 32 a scale d = max|x| / 127 and values round(x / d);
a row is head_dim int8 values, then its head_dim / 32 scales as fp32 (an fp32 scale is
broadcast straight from memory; an fp16 one took three more instructions a block), so one
int8 tensor holds the cache and its scales: 144 bytes a row at head_dim 128, where f16 takes
256.
"""
from __future__ import annotations

import numpy as np

from trimode.model.config import ModelError
from trimode.model.weights import Q8_BLOCK

KV_CACHE_TYPES = ("f16", "q8_0")


def check_kv_cache(cache_type: str, head_dim: int, target: str) -> None:
    """A clear error for a cache type that does not exist, or does not fit the heads or target."""
    if cache_type not in KV_CACHE_TYPES:
        raise ModelError(f"unknown K/V cache type {cache_type!r} (one of {', '.join(KV_CACHE_TYPES)})")
    if cache_type == "q8_0" and head_dim % Q8_BLOCK:
        raise ModelError(f"a q8_0 K/V cache needs a head size that is a multiple of {Q8_BLOCK}; "
                         f"this model's is {head_dim} (use the f16 cache)")
    if cache_type != "f16" and target != "llvm":
        raise ModelError(f"a {cache_type} K/V cache is built for the CPU (llvm) only; {target} keeps f16")


def kv_dtype(cache_type: str) -> str:
    """The element type of the cache tensor."""
    return "int8" if cache_type == "q8_0" else "float16"


def kv_row(cache_type: str, head_dim: int) -> int:
    """Elements of the cache tensor a row takes (its last dimension)."""
    return head_dim + 4 * (head_dim // Q8_BLOCK) if cache_type == "q8_0" else head_dim


def q8_0_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [..., head_dim] -> (values int8 [..., head_dim / 32, 32], scales fp32 [..., head_dim / 32, 1])
    in the kernel's float32 arithmetic (compiler/kernels/kv_quant.py)."""
    blocks = np.asarray(x, np.float32).reshape(*np.shape(x)[:-1], -1, Q8_BLOCK)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    inverse = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    return np.clip(np.rint(blocks * inverse), -127, 127).astype(np.int8), d


def q8_0_rows(x: np.ndarray) -> np.ndarray:
    """x [..., head_dim] as a q8_0 cache's int8 rows [..., kv_row]: values, then scales' bytes."""
    values, d = q8_0_blocks(x)
    lead = values.shape[:-2]
    scale_bytes = np.ascontiguousarray(d.reshape(*lead, -1)).view(np.int8)
    return np.concatenate([values.reshape(*lead, -1), scale_bytes], axis=-1)


def kv_round(cache_type: str, x: np.ndarray) -> np.ndarray:
    """x [..., head_dim] (float64) as the cache keeps it, back in float64: what attention reads."""
    if cache_type == "f16":
        return np.asarray(x).astype(np.float16).astype(np.float64)
    values, d = q8_0_blocks(x)
    return (values * d.astype(np.float64)).reshape(np.shape(x))
